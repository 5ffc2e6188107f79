"""Whole-volume segmentation: preprocess, sliding window over an Engine, argmax, back to the input grid."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engines.base import Engine
from ..core.errors import InputError, ModelError, PTQError
from .preprocess import labels_to_input_grid, load_transforms, to_network_space
from ..core.progress import Monitor
from .sliding_window import padded_size, sliding_window_labels, window_slices
from ..core.spec import ModelSpec
from ..core.volume import Volume

STAGE = "sliding window"


@dataclass
class SegmentationResult:
    labels: Volume  # KJI uint8/uint16 label map on exactly the input volume's grid
    seconds: float  # total wall time (preprocessing, network, blending, resampling back)
    network_seconds: float  # time spent inside the engine
    patches: int  # number of windows the engine ran
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, where measured


def count_windows(image_shape: tuple[int, ...], roi_size: tuple[int, ...], overlap: float) -> int:
    """Number of windows the sliding window (MONAI's windows) runs for one image of ``image_shape``."""
    return len(window_slices(padded_size(image_shape, roi_size), roi_size, overlap))


def auto_batch_size(engine: Engine, spec: ModelSpec) -> int:
    """The engine's preferred windows per call for ``spec`` (``engine.preferred_batch``), else 1."""
    preferred = getattr(engine, "preferred_batch", None)
    return max(1, int(preferred(spec.num_classes, spec.patch_size))) if preferred else 1


def run_engine(engine: Engine, batch: torch.Tensor, spec: ModelSpec, method: str = "__call__") -> torch.Tensor:
    """``engine.<method>(batch)`` with one-line errors and the logits' shape checked against ``spec``."""
    try:
        logits = getattr(engine, method)(batch)
    except PTQError:
        raise
    except Exception as exc:  # an engine failing mid-run is a model/runtime problem, said in one line
        raise ModelError(f"The engine failed on a batch of shape {tuple(batch.shape)}: {exc}") from exc
    expected = (batch.shape[0], spec.num_classes, *batch.shape[2:])
    if tuple(logits.shape) != expected:
        raise ModelError(
            f"The engine returned logits of shape {tuple(logits.shape)} for a batch of {tuple(batch.shape)}; "
            f"expected {expected} ({spec.num_classes} classes in the spec). "
            "Check that the spec's classes match the network's output channels."
        )
    return logits


class _CountingPredictor:
    """Calls the engine, checks its output, times it and reports progress per batch."""

    def __init__(self, engine: Engine, spec: ModelSpec, total: int, monitor: Monitor, native: bool = False):
        self.engine, self.spec, self.total, self.monitor = engine, spec, total, monitor
        # native: keep the engine's own output precision (FP16) when it offers that, instead of float32 copies
        self.native = native and hasattr(engine, "forward_native")
        # the sliding window blends each batch's logits before it asks for the next: no copy out needed
        self.transient = not self.native and hasattr(engine, "forward_transient")
        self.patches = 0
        self.seconds = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.monitor.check()
        batch = batch.to(device=self.engine.device, dtype=torch.float32).contiguous()
        started = time.perf_counter()
        method = "forward_native" if self.native else "forward_transient" if self.transient else "__call__"
        logits = run_engine(self.engine, batch, self.spec, method)
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.seconds += time.perf_counter() - started
        self.patches = min(self.patches + batch.shape[0], self.total)  # padded windows are not counted
        self.monitor.update(STAGE, self.patches, self.total)
        return logits if self.native else logits.float()


def segment_volume(
    volume: Volume,
    spec: ModelSpec,
    engine: Engine,
    batch_size: int | None = None,
    monitor: Monitor | None = None,
) -> SegmentationResult:
    """Segment ``volume`` with ``engine``; the label map lies on exactly the input grid.

    ``batch_size``: windows per engine call; None lets the engine choose (:func:`auto_batch_size`).
    """
    batch_size = auto_batch_size(engine, spec) if batch_size is None else batch_size
    if torch.device(engine.device).type == "cuda":  # GPU engines: the whole pipeline stays on the GPU
        from .resident import segment_volume_resident

        return segment_volume_resident(volume, spec, engine, batch_size=batch_size, monitor=monitor)
    monitor = monitor or Monitor()
    load_transforms()
    started = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"Batch size must be >= 1, got {batch_size}.")
    image, grid = to_network_space(volume, spec)
    roi_size = tuple(int(s) for s in spec.patch_size)
    total = count_windows(grid.shape, roi_size, spec.overlap)
    if hasattr(engine, "prepare"):  # engines compiled per batch shape: compile it outside the timed calls
        engine.prepare(min(batch_size, total))
    predictor = _CountingPredictor(engine, spec, total, monitor)
    monitor.update(STAGE, 0, total)
    with torch.inference_mode():
        labels_ijk = sliding_window_labels(image, predictor, roi_size, spec.num_classes, overlap=spec.overlap,
                                           mode=spec.blend_mode, batch_size=batch_size,
                                           fixed_batch=bool(getattr(engine, "fixed_batch", False)))
    dtype = np.uint8 if spec.num_classes <= 256 else np.uint16
    labels_ijk = labels_ijk.cpu().numpy().astype(dtype)
    labels_kji = labels_to_input_grid(labels_ijk, grid)
    labels = Volume(array=labels_kji, ijk_to_ras=grid.input_ijk_to_ras.copy())
    return SegmentationResult(
        labels=labels,
        seconds=time.perf_counter() - started,
        network_seconds=predictor.seconds,
        patches=predictor.patches,
    )
