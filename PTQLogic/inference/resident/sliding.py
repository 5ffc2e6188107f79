"""Sliding-window inference whose blending buffer is one slab of windows deep, not the whole volume.

Windows are MONAI's (same padding, scan interval, positions and importance map as
``sliding_window_inference``) and run in batches cut from the device-resident image. They are
visited in order of their start along the first axis; the weighted logits sum lives in a ring
buffer of ``roi[0]`` rows of that axis. Once no later window can reach a row, its argmax is taken
and the row is cleared for reuse. The argmax of the weighted sum equals the argmax of MONAI's
weighted average (the weights are positive), so labels agree up to float rounding, while memory is
``classes x roi[0] x H x W`` instead of ``2 x classes x D x H x W``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..sliding_window import Predictor, pad_to_roi
from ..sliding_window import window_slices as monai_windows


def window_slices(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> list[tuple[slice, ...]]:
    """MONAI's window positions over ``shape`` (already padded to at least ``roi``), sorted by first-axis start."""
    return sorted(monai_windows(shape, roi, overlap), key=lambda s: s[0].start)


class _RingArgmax:
    """Weighted logit sums for ``roi0`` rows of axis 0 (row r lives at r % roi0), finalized into labels."""

    def __init__(self, classes: int, roi0: int, plane: tuple[int, int], rows: int, dtype: torch.dtype,
                 device: torch.device, label_dtype: torch.dtype):
        self.acc = torch.zeros((classes, roi0, *plane), dtype=dtype, device=device)
        self.roi0, self.base = roi0, 0  # rows below base are final
        self.labels = torch.zeros((rows, *plane), dtype=label_dtype, device=device)

    def _parts(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(first row, ring index, length) pieces of rows [start, stop) that do not wrap around the ring."""
        parts, row = [], start
        while row < stop:
            ring = row % self.roi0
            length = min(stop - row, self.roi0 - ring)
            parts.append((row, ring, length))
            row += length
        return parts

    def finalize(self, stop: int) -> None:
        for row, ring, length in self._parts(self.base, min(stop, self.labels.shape[0])):
            self.labels[row:row + length] = self.acc[:, ring:ring + length].argmax(0).to(self.labels.dtype)
            self.acc[:, ring:ring + length].zero_()
        self.base = max(self.base, stop)

    def add(self, window: tuple[slice, ...], logits: torch.Tensor, weight: torch.Tensor) -> None:
        """Accumulate ``weight * logits`` (C, roi...) of the window at ``window`` (spatial slices)."""
        start = window[0].start
        if start > self.base:
            self.finalize(start)
        rest = window[1:]
        for row, ring, length in self._parts(start, window[0].stop):
            offset = row - start
            target = self.acc[(slice(None), slice(ring, ring + length), *rest)]
            target.addcmul_(logits[:, offset:offset + length].to(target.dtype),
                            weight[offset:offset + length].to(target.dtype))


def sliding_window_argmax(
    image: torch.Tensor,
    roi: tuple[int, ...],
    predictor: Predictor,
    *,
    num_classes: int,
    overlap: float,
    blend_mode: str,
    batch_size: int = 1,
    accumulate: torch.dtype = torch.float32,
    fixed_batch: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Labels (spatial shape of ``image``, uint8/int16) for a (C, *spatial) image on its own device.

    ``fixed_batch``: pad the last, partial batch with empty windows so every engine call has the same
    shape (compiled engines and CUDA graphs recompile or re-record for a new shape).
    """
    from monai.data.utils import compute_importance_map

    padded, pads = pad_to_roi(image, roi)
    shape = tuple(int(s) for s in padded.shape[1:])
    slices = window_slices(shape, roi, overlap)
    weight = compute_importance_map(roi, mode=blend_mode, sigma_scale=0.125, device=image.device,
                                    dtype=torch.float32)
    label_dtype = torch.uint8 if num_classes <= 256 else torch.int16
    ring = _RingArgmax(num_classes, roi[0], shape[1:], shape[0], accumulate, image.device, label_dtype)
    for first in range(0, len(slices), batch_size):
        chunk = slices[first:first + batch_size]
        batch = torch.stack([padded[(slice(None), *window)] for window in chunk])  # device-side copies only
        if fixed_batch and len(chunk) < batch_size:
            batch = torch.cat([batch, batch.new_zeros((batch_size - len(chunk), *batch.shape[1:]))])
        logits = predictor(batch)
        for window, window_logits in zip(chunk, logits):
            ring.add(window, window_logits, weight)
        del logits, batch
        if on_batch is not None:
            on_batch(first + len(chunk), len(slices))
    ring.finalize(shape[0])
    crop = tuple(slice(before, size - after) for (before, after), size in zip(pads, shape))
    return ring.labels[crop]
