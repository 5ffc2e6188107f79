"""Network-space preprocessing and the way back, in torch on the engine's device.

Same orientation/spacing code (MONAI's grid, per-axis resampling) and the same intensity step as
:mod:`PTQLogic.inference.preprocess`, applied to a tensor that already lives on the device (only the raw
voxels cross the bus, in their stored dtype); labels go back to the input grid by an index gather
on the device. On a CPU tensor this is exactly the CPU path's code, which is how it is tested.
"""
from __future__ import annotations

import numpy as np
import torch

from ...core.errors import InputError
from ..preprocess import (NetworkGrid, axis_aligned, axis_gather_indices, labels_to_input_grid, normalize_intensity,
                          orient_and_resample)
from ...core.spec import ModelSpec
from ...core.volume import Volume


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """The stored voxels on ``device`` as float32; they cross the bus in their stored (often 16-bit) type."""
    if array.dtype.byteorder == ">" or array.dtype in (np.uint16, np.uint32, np.uint64):
        array = array.astype(np.float32)  # types torch cannot convert on the device
    return torch.from_numpy(np.ascontiguousarray(array)).to(device).to(torch.float32)


def to_network_space_on(volume: Volume, spec: ModelSpec, device: torch.device | str) -> tuple[torch.Tensor, NetworkGrid]:
    """(C, I, J, K) float32 network input on ``device`` and the grid to map results back."""
    device = torch.device(device)
    volume.validate("input volume")
    if volume.channels != spec.in_channels:
        raise InputError(
            f"The volume has {volume.channels} channel(s) but model '{spec.name}' expects {spec.in_channels}; "
            "give a volume with matching channels (modalities)."
        )
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    # the CPU path's own orientation/spacing, here on the device
    tensor, grid = orient_and_resample(_upload(array, device), volume, spec)
    return normalize_intensity(tensor, spec.preprocessing), grid


def labels_to_input_grid_on(labels_ijk: torch.Tensor, grid: NetworkGrid) -> np.ndarray:
    """Network-space labels (I, J, K) on any device -> KJI numpy array on the input grid (nearest neighbour).

    Axis-aligned grids (flips, permutations, spacing changes) gather on the device, one index list per
    axis, like :func:`PTQLogic.inference.preprocess.labels_to_input_grid`; rotated grids use that CPU function.
    """
    if tuple(labels_ijk.shape) != tuple(grid.shape):
        raise InputError(f"Labels have shape {tuple(labels_ijk.shape)}; the network grid is {grid.shape}.")
    mapping = np.linalg.solve(grid.affine, grid.input_ijk_to_ras)
    if not axis_aligned(mapping[:3, :3]):
        return labels_to_input_grid(labels_ijk.cpu().numpy(), grid)
    device = labels_ijk.device
    axes, indices, inside_axis = axis_gather_indices(mapping, tuple(grid.input_shape)[::-1], tuple(labels_ijk.shape))
    index_lists = [torch.from_numpy(index).to(device) for index in indices]
    valid = [torch.from_numpy(ok).to(device) for ok in inside_axis]
    result = labels_ijk.permute(axes[::-1])  # network axes in the input's K, J, I order
    for axis, a in enumerate((2, 1, 0)):
        result = torch.index_select(result, axis, index_lists[a])
    if not all(bool(v.all()) for v in valid):
        inside = valid[2][:, None, None] & valid[1][None, :, None] & valid[0][None, None, :]
        result = result.masked_fill(~inside, 0)
    return result.cpu().numpy()
