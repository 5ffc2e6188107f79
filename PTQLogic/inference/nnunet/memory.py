"""Memory an nnU-Net prediction needs, checked before any engine is built.

nnunetv2's sliding window keeps fp16 logits of every class over the whole network grid; the export
(:mod:`.export`) then brings them to the input grid without a float64 copy of every class. With many classes on a large
CT the logits alone are many GB, so a volume that cannot fit is refused up front, with the numbers,
instead of failing after minutes of work.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ...core.errors import InputError
from ...core.memory import ENGINE_WORKING_BYTES, MEMORY_ENV, available_memory_bytes
from ...core.volume import Volume
from .sparse_export import order_one_kwargs, working_bytes


def network_grid(runner, volume: Volume, cropped: Sequence[int] | None = None) -> tuple[int, ...]:
    """The shape nnU-Net resamples ``volume`` to, in its axis order; ``cropped``: the (K, J, I) shape of its
    nonzero region, which nnU-Net crops to first (default: the whole volume, an upper bound)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    forward = runner.plans_manager.transpose_forward
    kji = volume.spatial_shape if cropped is None else tuple(cropped)
    shape = [kji[i] for i in forward]  # KJI == nnU-Net's (z, y, x)
    spacing = [abs(float(volume.spacing[::-1][i])) for i in forward]
    target = list(runner.config.spacing)
    if len(target) < len(shape):  # 2D configurations keep the first axis
        target = [spacing[0], *target]
    return tuple(int(g) for g in compute_new_shape(shape, spacing, target))


def _sizes(runner, volume: Volume) -> tuple[float, float, bool, int]:
    """Network grid voxels (padded to one patch), input voxels, whether the export resamples, classes."""
    unpadded = network_grid(runner, volume)
    patch = [1] * (len(unpadded) - len(runner.config.patch_size)) + list(runner.config.patch_size)
    grid = float(np.prod([max(g, p) for g, p in zip(unpadded, patch)], dtype=float))
    voxels = float(np.prod(volume.spatial_shape, dtype=float))
    return grid, voxels, sorted(unpadded) != sorted(volume.spatial_shape), runner.label_manager.num_segmentation_heads


def prediction_bytes(runner, volume: Volume, folds: int) -> int:
    """Peak bytes of ``runner.predict`` on ``volume`` (cropping to the nonzero region not counted)."""
    grid, voxels, _, classes = _sizes(runner, volume)
    channels = runner.in_channels
    # the float32 image, its transposed copy and the preprocessed grid
    image = channels * (2 * voxels + grid) * 4
    # Per class and voxel, measured phase by phase (RSS sampled every 5 ms, nnunetv2 2.8): the sliding window
    # holds fp16 logits plus 3 bytes while it divides by the weights and checks for infinities, and with
    # several folds the next fold's fp16 logits before they are added.
    window = classes * grid * (5 + (2 if folds > 1 else 0))
    export = export_bytes(runner, volume)
    return int(image + max(window, export) + ENGINE_WORKING_BYTES)


def export_bytes(runner, volume: Volume) -> int:
    """Peak bytes of ``runner.export`` on ``volume``'s logits, those logits included."""
    grid, voxels, resampled, classes = _sizes(runner, volume)
    # the export (export.py), beside the fp16 logits: order-1 resampling (the plans' usual) takes most labels
    # from the grid (sparse_export.py: its working set, the labels and the uncropped label map); any other
    # resampling runs one class at a time: that class as float64 (float32 for resample_torch_fornnunet) on the
    # grid and on the input grid, its fp16 copy, the running maximum, the labels, the comparison mask and the
    # uncropped label map
    if resampled and order_one_kwargs(runner.config.configuration) is not None:
        return int(classes * grid * 2 + working_bytes(classes, grid) + voxels * (1 + 1))
    torch_fn = runner.config.configuration["resampling_fn_probabilities"] != "resample_data_or_seg_to_shape"
    one_class = (grid * (4 if torch_fn else 8) + voxels * 8) if resampled else 0
    return int(classes * grid * 2 + one_class + voxels * (2 + 2 + 1 + 1 + 1))


def fp32_windows_bytes(runner) -> int:
    """What ``--fp32-windows`` adds while a part runs: the FP32 engine beside the INT8 one (its working memory
    counted twice: float activations), and one window's INT8 copy, FP32 logits and their difference (float32)."""
    window = float(np.prod(runner.config.patch_size, dtype=float))
    return int(2 * ENGINE_WORKING_BYTES + 3 * runner.label_manager.num_segmentation_heads * window * 4)


def _kept_for_later_bytes(runners: Sequence, volume: Volume, index: int) -> int:
    """Preprocessed grids that segment.py keeps while part ``index`` runs: those of other preprocessings that
    an earlier part made and a later part reuses."""
    keys = [r.preprocess_key() for r in runners]
    kept = {k: r for i, (k, r) in enumerate(zip(keys, runners))
            if k != keys[index] and k in keys[:index] and k in keys[index + 1:]}
    return sum(int(r.in_channels * np.prod(network_grid(r, volume), dtype=float) * 4) for r in kept.values())


def peak_bytes_per_part(runners: Sequence, volume: Volume, folds: Sequence[int], overlap: bool = False,
                        fp32_windows: bool = False) -> list[int]:
    """Peak bytes while each part runs (one after another; ``overlap``: with the previous part's export beside it;
    ``fp32_windows``: with ``segment --fp32-windows``); the largest is the run's peak."""
    voxels = float(np.prod(volume.spatial_shape, dtype=float))
    maps = voxels * (len(runners) + 1)  # each part's label map is kept until they are merged
    alone = [int(prediction_bytes(r, volume, f) + maps + volume.array.nbytes
                 + _kept_for_later_bytes(runners, volume, i) + (fp32_windows_bytes(r) if fp32_windows else 0))
             for i, (r, f) in enumerate(zip(runners, folds))]
    if not overlap:
        return alone
    return alone[:1] + [alone[i] + export_bytes(runners[i - 1], volume) for i in range(1, len(runners))]


def overlap_fits(runners: Sequence, volume: Volume, folds: Sequence[int], fp32_windows: bool = False) -> bool:
    """Whether several parts can run with each part's export beside the next part's sliding window: that part's
    peak plus the previous part's export (its logits, its working set) fit in the memory available now."""
    peak = max(peak_bytes_per_part(runners, volume, folds, overlap=True, fp32_windows=fp32_windows))
    return len(runners) > 1 and peak <= available_memory_bytes()


def check_nnunet_memory(runners: Sequence, volume: Volume, folds: Sequence[int], what: str = "input volume",
                        fp32_windows: bool = False) -> int:
    """Refuse a volume whose nnU-Net prediction would not fit; parts run one after another."""
    sizes = peak_bytes_per_part(runners, volume, folds, fp32_windows=fp32_windows)
    runner = runners[int(np.argmax(sizes))]
    needed = max(sizes)
    available = available_memory_bytes()
    if needed > available:
        classes = runner.label_manager.num_segmentation_heads
        spacing = ", ".join(f"{v:g}" for v in volume.spacing)
        raise InputError(
            f"The {what} would need about {needed / 2**30:.1f} GiB to segment with nnU-Net ({classes} classes on a "
            f"network grid of {network_grid(runner, volume)} voxels at {tuple(runner.config.spacing)} mm, from "
            f"spacing ({spacing}) mm) but about {available / 2**30:.1f} GiB is available; check the file's voxel "
            f"spacing, crop the volume, or raise {MEMORY_ENV}."
        )
    return needed
