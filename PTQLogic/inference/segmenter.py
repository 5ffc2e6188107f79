"""Whole-volume segmentation: preprocess, sliding window over an Engine, argmax, back to the input grid."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..core.errors import InputError
from ..core.progress import Monitor
from ..core.spec import ModelSpec
from ..core.volume import Volume
from ..engines.base import Engine
from .predictors import STAGE, CountingPredictor, auto_batch_size
from .preprocess import NetworkGrid, labels_to_input_grid, load_transforms, to_network_space
from .resident import segment_volume_resident
from .results import SegmentationResult
from .sliding_window import count_windows, sliding_window_labels


def segment_volume(
    volume: Volume,
    spec: ModelSpec,
    engine: Engine,
    batch_size: int | None = None,
    monitor: Monitor | None = None,
    preprocessed: tuple[torch.Tensor, NetworkGrid] | None = None,
) -> SegmentationResult:
    """Segment ``volume`` with ``engine``; the label map lies on exactly the input grid.

    ``batch_size``: windows per engine call; None lets the engine choose (:func:`auto_batch_size`).
    ``preprocessed``: ``volume``'s :func:`to_network_space` made before (read only; CPU engines skip it then).
    """
    batch_size = auto_batch_size(engine, spec) if batch_size is None else batch_size
    if torch.device(engine.device).type == "cuda":  # GPU engines: the whole pipeline stays on the GPU
        return segment_volume_resident(volume, spec, engine, batch_size=batch_size, monitor=monitor)
    monitor = monitor or Monitor()
    load_transforms()
    started = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"Batch size must be >= 1, got {batch_size}.")
    image, grid = to_network_space(volume, spec) if preprocessed is None else preprocessed
    roi_size = tuple(int(s) for s in spec.patch_size)
    total = count_windows(grid.shape, roi_size, spec.overlap)
    batch_size = min(batch_size, total)
    if hasattr(engine, "prepare"):  # engines compiled per batch shape: compile it outside the timed calls
        engine.prepare(batch_size)
    predictor = CountingPredictor(engine, spec, total, monitor)
    monitor.update(STAGE, 0, total)
    mark = time.perf_counter()
    stages = {"preprocess": mark - started}
    with torch.inference_mode():
        labels_ijk = sliding_window_labels(image, predictor, roi_size, spec.num_classes, overlap=spec.overlap,
                                           mode=spec.blend_mode, batch_size=batch_size,
                                           fixed_batch=bool(getattr(engine, "fixed_batch", False)))
    dtype = np.uint8 if spec.num_classes <= 256 else np.uint16
    labels_ijk = labels_ijk.cpu().numpy().astype(dtype)
    stages["sliding_window"] = time.perf_counter() - mark
    mark = time.perf_counter()
    labels_kji = labels_to_input_grid(labels_ijk, grid)
    stages["resample_back"] = time.perf_counter() - mark
    labels = Volume(array=labels_kji, ijk_to_ras=grid.input_ijk_to_ras.copy())
    return SegmentationResult(labels=labels, seconds=time.perf_counter() - started, network_seconds=predictor.seconds,
                              patches=predictor.patches, stages=stages)
