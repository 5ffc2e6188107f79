"""Whole-volume segmentation that stays on the engine's device (the GPU path of ``segment_volume``).

Preprocessing (orientation, spacing, intensity), windows, blending and the way back to the input
grid all run in torch on ``engine.device``; only the stored voxels go up and the uint8 labels come
back. Blending is :func:`..sliding_window.sliding_window_labels`, the CPU path's own loop, with its ring
channels-first on the device, so memory does not grow with classes x volume. On a CPU device the same code
runs, which is how it is tested against the CPU path.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ...engines.base import Engine
from ...core.errors import InputError
from ..preprocess import load_transforms
from ...core.progress import Monitor
from ...core.spec import ModelSpec
from ...core.volume import Volume
from ..predictors import STAGE, QueuedPredictor
from ..results import SegmentationResult
from ..sliding_window import count_windows, sliding_window_labels
from .geometry import labels_to_input_grid_on, to_network_space_on

__all__ = ["blending_dtype", "segment_volume_resident", "labels_to_input_grid_on", "to_network_space_on"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def blending_dtype(engine_precision: str, ring_bytes_fp32: int, device: torch.device) -> torch.dtype:
    """float16 for FP16 engines (their logits are FP16 anyway) or when an fp32 slab buffer would take more
    than a quarter of the GPU (8-12 GB cards with 100+ classes); float32 otherwise and on CPUs."""
    if device.type != "cuda":
        return torch.float32
    if engine_precision == "fp16":
        return torch.float16
    total = torch.cuda.get_device_properties(device).total_memory
    return torch.float16 if ring_bytes_fp32 > total // 4 else torch.float32


def segment_volume_resident(
    volume: Volume,
    spec: ModelSpec,
    engine: Engine,
    batch_size: int = 1,
    monitor: Monitor | None = None,
    accumulate: torch.dtype | None = None,
):
    """Like :func:`PTQLogic.inference.segmenter.segment_volume`, every step on ``engine.device``; result has ``stages``.

    ``accumulate``: blending precision; by default chosen by :func:`blending_dtype`.
    """
    monitor = monitor or Monitor()
    if batch_size < 1:
        raise InputError(f"Batch size must be >= 1, got {batch_size}.")
    device = torch.device(engine.device)
    stages: dict[str, float] = {}
    load_transforms()
    started = time.perf_counter()
    with torch.inference_mode():
        image, grid = to_network_space_on(volume, spec, device)
        _sync(device)
        stages["preprocess"] = time.perf_counter() - started
        roi = tuple(int(s) for s in spec.patch_size)
        if accumulate is None:
            plane = max(grid.shape[1], roi[1]) * max(grid.shape[2], roi[2])
            accumulate = blending_dtype(engine.info.precision, 4 * spec.num_classes * roi[0] * plane, device)
        total = count_windows(grid.shape, roi, spec.overlap)
        predictor = QueuedPredictor(engine, spec, total, monitor)
        monitor.update(STAGE, 0, total)
        mark = time.perf_counter()
        labels_ijk = sliding_window_labels(
            image, predictor, roi, spec.num_classes, overlap=spec.overlap, mode=spec.blend_mode,
            batch_size=batch_size, fixed_batch=bool(getattr(engine, "fixed_batch", False)),
            accumulate=accumulate, channels_last=False,
        )
        del image
        network_seconds = predictor.finish()
        _sync(device)
        stages["sliding_window"] = time.perf_counter() - mark
        mark = time.perf_counter()
        labels_kji = labels_to_input_grid_on(labels_ijk, grid)
        stages["resample_back"] = time.perf_counter() - mark
    dtype = np.uint8 if spec.num_classes <= 256 else np.uint16
    labels = Volume(array=labels_kji.astype(dtype, copy=False), ijk_to_ras=grid.input_ijk_to_ras.copy())
    return SegmentationResult(
        labels=labels, seconds=time.perf_counter() - started, network_seconds=network_seconds,
        patches=predictor.patches, stages=stages,
    )
