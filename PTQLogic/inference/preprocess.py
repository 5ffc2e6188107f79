"""Volume (KJI, Slicer) <-> network space (C, I, J, K, MONAI), and back for label maps.

Forward: transpose KJI -> IJK, wrap as a MONAI ``MetaTensor`` whose affine is ``ijk_to_ras``, then
MONAI ``Orientation`` (exact flips/permutations) and ``Spacing`` (bilinear resampling) as the spec asks,
with MONAI's target grid; on axis-aligned grids the resampling runs one axis at a time
(:mod:`PTQLogic.inference.axis_resample`, MONAI's values to float32 rounding), rotated grids and intensity steps
that mask exact zeros use MONAI's own transforms in float64. Then intensity normalization:

- ``"ct"``: clip to ``ct_window`` and scale linearly to [0, 1];
- ``"zscore"``: per channel, ``(x - mean) / std`` with mean/std over the channel's *nonzero* voxels
  (nnU-Net/MONAI ``NormalizeIntensity(nonzero=True)`` convention for MR); zero voxels stay 0;
  a channel with no nonzero voxel is left at 0;
- ``"none"``: unchanged;

then ``preprocessing.steps`` (MONAI bundles): MONAI's own intensity transforms, in order.

Backward (:func:`labels_to_input_grid`): each input voxel takes the label of the network voxel
nearest to its centre, by an exact index mapping through the two affines. When the network grid is
the input grid up to axis permutation/flips (no ``Spacing`` change), it is a pure transpose/flip.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .axis_resample import resample_axis_aligned
from ..core.errors import InputError
from ..core.memory import ENGINE_WORKING_BYTES, MEMORY_ENV, available_memory_bytes
from ..core.spec import INTENSITY_STEPS, ModelSpec, Preprocessing
from ..core.volume import Volume


_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # our affines are RAS


@dataclass
class NetworkGrid:
    """Where the network-space array lies, and the input grid to map results back to."""

    affine: np.ndarray  # 4x4 network ijk -> RAS
    shape: tuple[int, int, int]  # network spatial shape (I, J, K after orientation/spacing)
    input_ijk_to_ras: np.ndarray  # 4x4 of the input Volume
    input_shape: tuple[int, int, int]  # input Volume's spatial shape, KJI order




def network_shape(volume: Volume, spec: ModelSpec) -> tuple[int, int, int]:
    """The network-space shape the resampling will produce (MONAI ``Spacing`` keeps the physical extent)."""
    if spec.preprocessing.spacing is None:
        return tuple(int(s) for s in reversed(volume.spatial_shape))
    extent = np.asarray(volume.spacing) * np.asarray(tuple(reversed(volume.spatial_shape)), dtype=float)
    target = np.asarray(spec.preprocessing.spacing, dtype=float)
    # orientation may permute axes; the product (what memory depends on) does not change
    return tuple(max(1, int(round(e / t))) for e, t in zip(sorted(extent), sorted(target)))


def check_memory(volume: Volume, spec: ModelSpec, what: str = "input volume") -> int:
    """Refuse, before allocating, a volume whose network-space arrays would not fit in memory."""
    shape = network_shape(volume, spec)
    voxels = float(np.prod(shape, dtype=float))
    # the sliding window's class scores span one window's depth of the (padded) grid, a ring: counted as
    # the largest window side across the two largest axes, each padded to that side
    side = max(int(r) for r in spec.patch_size)
    padded = sorted(max(s, side) for s in shape)
    ring = float(side) * padded[1] * padded[2]
    window_logits = 4.0 * spec.num_classes * float(np.prod(spec.patch_size, dtype=float))
    windows = max(1, min(4, int(2**28 // window_logits)))  # the engines' auto batch: 4, or what fits 256 MB
    batch_logits = 2 * windows * window_logits  # a call's logits, and a copy
    # float32 image and its normalized copy, float32 scores of every class, labels; the input's copies;
    # the network's own working memory (measured: 0.1-0.9 GiB for a 96^3 UNet at batch 1-4)
    needed = int(voxels * 4 * 2 * spec.in_channels + voxels + ring * 4 * spec.num_classes + batch_logits
                 + volume.array.nbytes * 2 + ENGINE_WORKING_BYTES)
    available = available_memory_bytes()
    if needed > available:
        spacing = ", ".join(f"{v:g}" for v in volume.spacing)
        raise InputError(
            f"The {what} would need about {needed / 2**30:.1f} GiB to segment (network grid {shape} voxels at "
            f"{spec.preprocessing.spacing} mm from spacing ({spacing}) mm) but about {available / 2**30:.1f} GiB is "
            f"available; check the file's voxel spacing, crop the volume, or raise {MEMORY_ENV}."
        )
    return needed


def resample_to_network(volume: Volume, spec: ModelSpec) -> tuple[torch.Tensor, NetworkGrid]:
    """Geometry only: (C, I, J, K) float32 tensor in network orientation/spacing, raw intensities."""
    volume.validate("input volume")
    check_memory(volume, spec)
    if volume.channels != spec.in_channels:
        raise InputError(
            f"The volume has {volume.channels} channel(s) but model '{spec.name}' expects {spec.in_channels}; "
            "give a volume with matching channels (modalities)."
        )
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    if array.dtype.byteorder == ">" or array.dtype in (np.uint16, np.uint32, np.uint64):
        array = array.astype(np.float32)  # types torch cannot take as they are
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        source = torch.from_numpy(array)  # (C, K, J, I) view of the caller's voxels: read, never written
    else:
        with warnings.catch_warnings():  # read-only is fine: resampling reads it and writes new tensors only
            warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(array)
    return orient_and_resample(source, volume, spec)


def load_transforms() -> None:
    """Import MONAI's transforms now (about 2 s the first time in a process), so that the first volume's
    timings measure segmentation, not library loading: callers run this before starting their clocks."""
    import monai.data  # noqa: F401
    import monai.transforms  # noqa: F401


def target_grid(volume: Volume, prep: Preprocessing) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The network grid's affine and shape, exactly as eager MONAI ``Orientation``/``Spacing`` give them
    (computed lazily: no voxel is touched)."""
    from monai.data import MetaTensor
    from monai.data.utils import AFFINE_TOL
    from monai.transforms import Orientation, Spacing

    shape_ijk = tuple(int(s) for s in reversed(volume.spatial_shape))
    probe = MetaTensor(torch.zeros(1).expand(1, *shape_ijk),
                       affine=torch.as_tensor(np.asarray(volume.ijk_to_ras, dtype=np.float64)))
    if prep.orientation:
        probe = Orientation(axcodes=prep.orientation, labels=_RAS_LABELS, lazy=True)(probe)
    oriented = np.asarray(probe.peek_pending_affine(), dtype=np.float64), tuple(int(s) for s in probe.peek_pending_shape())
    if prep.spacing is None:
        return oriented[0].copy(), oriented[1]
    probe = Spacing(pixdim=prep.spacing, mode="bilinear", padding_mode="border", lazy=True)(probe)
    spaced = np.asarray(probe.peek_pending_affine(), dtype=np.float64), tuple(int(s) for s in probe.peek_pending_shape())
    # eager MONAI leaves the oriented image (and its affine) alone when Spacing's own transform is within
    # AFFINE_TOL of the identity at the same shape (e.g. 2.5015 mm slices for a 2.5 mm target)
    xform = np.linalg.solve(oriented[0], spaced[0])
    if spaced[1] == oriented[1] and (np.allclose(oriented[0], spaced[0], rtol=0, atol=AFFINE_TOL)
                                     or np.allclose(xform, np.eye(4), rtol=0, atol=AFFINE_TOL)):
        return oriented[0].copy(), oriented[1]
    return spaced[0].copy(), spaced[1]


def orient_and_resample(source_kji: torch.Tensor, volume: Volume, spec: ModelSpec) -> tuple[torch.Tensor, NetworkGrid]:
    """MONAI ``Orientation``/``Spacing`` of ``volume``'s voxels given as a (C, K, J, I) tensor (any real dtype,
    any device; never written to): (C, I, J, K) float32 on the tensor's device, and its grid."""
    affine = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    network_affine, shape = target_grid(volume, spec.preprocessing)
    grid = NetworkGrid(affine=network_affine, shape=shape, input_ijk_to_ras=affine.copy(),
                       input_shape=tuple(int(s) for s in volume.spatial_shape))
    image = None
    if not _zero_sensitive(spec.preprocessing):
        image = resample_axis_aligned(source_kji, np.linalg.solve(affine, network_affine), shape)
    if image is None:
        image = _monai_resample(source_kji, affine, spec.preprocessing)
    return image, grid


def _zero_sensitive(prep: Preprocessing) -> bool:
    """Intensity steps that treat exactly-zero voxels apart (nonzero masks). MONAI's float64 grid puts sample
    points ~1e-14 voxel off integer positions, so next to a 0 HU voxel it writes ~1e-11 where the exact
    answer is 0; a nonzero mask then counts those voxels. Such specs (MONAI bundles' ``NormalizeIntensity
    (nonzero=True)``, the ``"zscore"`` mode) keep MONAI's own resampling, so their masks are MONAI's."""
    return prep.intensity == "zscore" or any(bool(step.get("nonzero")) for step in prep.steps)


def _monai_resample(source_kji: torch.Tensor, affine: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """Rotated grids and zero-masking intensity steps: MONAI's transforms themselves, bilinear in float64."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    # KJI -> IJK as a fresh float32 copy; torch's copy_ converts and transposes on all threads
    ijk = torch.empty(source_kji.permute(0, 3, 2, 1).shape, dtype=torch.float32, device=source_kji.device)
    ijk.copy_(source_kji.permute(0, 3, 2, 1))
    image = MetaTensor(ijk, affine=torch.as_tensor(affine, dtype=torch.float64))
    if prep.orientation:
        image = Orientation(axcodes=prep.orientation, labels=_RAS_LABELS)(image)
    if prep.spacing is not None:
        image = Spacing(pixdim=prep.spacing, mode="bilinear", padding_mode="border", dtype=torch.float64)(image)
    return image.as_tensor().to(torch.float32).contiguous()


def normalize_intensity(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Intensity step of :func:`to_network_space` on a (C, ...) tensor (returns a new tensor)."""
    image = _normalize_mode(image, prep)
    if prep.steps:
        import monai.transforms as mt

        for step in prep.steps:
            if step.get("transform") not in INTENSITY_STEPS:
                raise InputError(f"Unknown intensity step {step!r}; known: {sorted(INTENSITY_STEPS)}.")
            transform = getattr(mt, step["transform"])(**{k: v for k, v in step.items() if k != "transform"})
            image = torch.as_tensor(transform(image), dtype=torch.float32)
    return image


def _normalize_mode(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    if prep.intensity == "ct":
        low, high = prep.ct_window
        return (image.clamp(low, high) - low) / (high - low)
    if prep.intensity == "zscore":
        out = torch.zeros_like(image)
        for c in range(image.shape[0]):
            channel = image[c]
            mask = channel != 0
            if mask.any():
                values = channel[mask].double()
                std = float(values.std(unbiased=False)) or 1.0
                out[c][mask] = ((values - values.mean()) / std).to(image.dtype)
        return out
    return image.clone()


def to_network_space(volume: Volume, spec: ModelSpec) -> tuple[torch.Tensor, NetworkGrid]:
    """(C, I, J, K) float32 network input for ``volume`` and the :class:`NetworkGrid` to map results back."""
    image, grid = resample_to_network(volume, spec)
    return normalize_intensity(image, spec.preprocessing), grid


def axis_aligned(linear: np.ndarray, tol: float = 1e-6) -> bool:
    """True when every input axis maps onto exactly one network axis (scaled permutation, no rotation)."""
    nonzero = np.abs(linear) > tol * np.abs(linear).max()
    return bool(np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1))


def labels_to_input_grid(labels_ijk: np.ndarray, grid: NetworkGrid) -> np.ndarray:
    """Network-space labels (I, J, K) -> KJI array exactly on the input grid (nearest neighbour).

    Input voxels whose centre falls outside the network grid get label 0.
    """
    labels_ijk = np.asarray(labels_ijk)
    if tuple(labels_ijk.shape) != tuple(grid.shape):
        raise InputError(f"Labels have shape {labels_ijk.shape}; the network grid is {grid.shape}.")
    # input ijk -> network ijk
    mapping = np.linalg.solve(grid.affine, grid.input_ijk_to_ras)
    size_k, size_j, size_i = grid.input_shape
    if axis_aligned(mapping[:3, :3]):
        return _separable_gather(labels_ijk, mapping, (size_i, size_j, size_k))
    out = np.zeros((size_k, size_j, size_i), dtype=labels_ijk.dtype)
    jj, ii = np.meshgrid(np.arange(size_j, dtype=np.float64), np.arange(size_i, dtype=np.float64), indexing="ij")
    net_shape = np.asarray(grid.shape).reshape(3, 1, 1)
    for k in range(size_k):  # slice by slice keeps index arrays small for big volumes
        offset = mapping[:3, 2] * k + mapping[:3, 3]
        points = mapping[:3, 0, None, None] * ii + mapping[:3, 1, None, None] * jj + offset[:, None, None]
        index = np.floor(points + 0.5).astype(np.int64)
        inside = np.all((index >= 0) & (index < net_shape), axis=0)
        out[k][inside] = labels_ijk[index[0][inside], index[1][inside], index[2][inside]]
    return out


def axis_gather_indices(mapping: np.ndarray, input_shape_ijk: Sequence[int], net_shape: Sequence[int]
                        ) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """For an axis-aligned input-IJK -> network-IJK ``mapping``: per input axis, the network axis it runs
    along, the nearest network index of each input voxel (0 where outside) and whether it is inside."""
    axes, index_lists, valid = [], [], []
    for a in range(3):
        n = int(np.argmax(np.abs(mapping[:3, a])))
        index = np.floor(mapping[n, a] * np.arange(input_shape_ijk[a]) + mapping[n, 3] + 0.5).astype(np.int64)
        ok = (index >= 0) & (index < net_shape[n])
        axes.append(n)
        index_lists.append(np.where(ok, index, 0))
        valid.append(ok)
    return axes, index_lists, valid


def _separable_gather(labels_ijk: np.ndarray, mapping: np.ndarray, input_shape_ijk: tuple[int, int, int]) -> np.ndarray:
    """Axis-aligned grids (flips, permutations, spacing changes): one index list per axis.

    With unchanged spacing the indices are a plain permutation/flip, so the result is bit-exact.
    """
    axes, index_lists, valid = axis_gather_indices(mapping, input_shape_ijk, labels_ijk.shape)
    # reorder the (small) network array into the input's K, J, I axes first, then gather per axis
    result = np.ascontiguousarray(np.transpose(labels_ijk, axes[::-1]))
    for axis, a in enumerate((2, 1, 0)):
        result = np.take(result, index_lists[a], axis=axis)
    if not all(ok.all() for ok in valid):
        inside = valid[2][:, None, None] & valid[1][None, :, None] & valid[0][None, None, :]
        result[~inside] = 0
    return result
