"""The one in-memory image type: a KJI-ordered array plus its IJK-to-RAS matrix.

This is exactly what Slicer hands out (``arrayFromVolume`` + ``GetIJKToRASMatrix``), so the module
converts without math. Files on disk (NIfTI/NRRD/DICOM, LPS in ITK) are converted in
:mod:`PTQLogic.io.volumes`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


def axis_codes(ijk_to_ras: np.ndarray) -> str:
    """Where each voxel axis points, e.g. "LPS" (ITK/DICOM default) or "RAS" (NIfTI default)."""
    codes = []
    for column in np.asarray(ijk_to_ras, dtype=float)[:3, :3].T:
        axis = int(np.argmax(np.abs(column)))
        codes.append(("LR", "PA", "IS")[axis][int(column[axis] > 0)])
    return "".join(codes)


@dataclass
class Volume:
    array: np.ndarray  # (K, J, I) or (C, K, J, I): slice, row, column like slicer.util.arrayFromVolume
    ijk_to_ras: np.ndarray  # 4x4 float64; column 0 is the I (fastest, last array axis) direction

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[-3:])

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along I, J, K."""
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        """Same spatial shape and IJK-to-RAS (within ``atol`` mm): voxel i of one is voxel i of the other."""
        return self.spatial_shape == other.spatial_shape and bool(
            np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=atol)
        )

    def require_same_grid(self, other: "Volume", what: str, atol: float = 1e-3) -> None:
        if not self.same_grid(other, atol):
            raise InputError(
                f"{what} is not on the same voxel grid as the image ({other.describe('it')}; "
                f"{self.describe('the image')}); resample it onto the image's grid first."
            )

    def describe(self, name: str) -> str:
        """Geometry in (x, y, z) = (I, J, K) order: shape, spacing, origin and axis directions (RAS codes)."""
        matrix = np.asarray(self.ijk_to_ras, dtype=float)
        shape = tuple(reversed(self.spatial_shape))
        spacing = ", ".join(f"{v:g}" for v in self.spacing)
        origin = ", ".join(f"{v:.4g}" for v in matrix[:3, 3])
        return f"{name}: shape {shape}, spacing ({spacing}) mm, origin ({origin}) RAS, axes {axis_codes(matrix)}"

    def aligned_to(self, target: "Volume", what: str, atol: float = 1e-3) -> tuple["Volume", str | None]:
        """This label map on ``target``'s grid, and a note when that needed a reorientation.

        Only an exact re-indexing is done: the same voxel centres stored with other axis directions or
        order (e.g. LAS vs LPS). Anything else is refused with both geometries in the message.
        """
        if self.same_grid(target, atol):
            return self, None
        mapping = np.linalg.solve(np.asarray(self.ijk_to_ras, float), np.asarray(target.ijk_to_ras, float))
        linear, offset = mapping[:3, :3], mapping[:3, 3]
        is_permutation = np.allclose(np.abs(linear).sum(axis=0), 1, atol=1e-4) and np.allclose(
            np.round(linear), linear, atol=1e-4) and np.allclose(np.round(offset), offset, atol=1e-3)
        if is_permutation and self.array.ndim == 3:
            linear, offset = np.round(linear).astype(int), np.round(offset).astype(int)
            src_shape_ijk = tuple(reversed(self.spatial_shape))
            dst_shape_ijk = tuple(reversed(target.spatial_shape))
            axes = [int(np.argmax(np.abs(linear[:, a]))) for a in range(3)]  # source axis of each target axis
            index = [linear[axes[a], a] * np.arange(dst_shape_ijk[a]) + offset[axes[a]] for a in range(3)]
            inside = all(len(ix) == src_shape_ijk[axes[a]] and ix.min() >= 0 and ix.max() < src_shape_ijk[axes[a]]
                         for a, ix in enumerate(index))
            if inside:
                ijk = np.transpose(self.array, (2, 1, 0))  # KJI -> IJK
                moved = np.transpose(ijk, axes)[np.ix_(*index)]
                array = np.ascontiguousarray(np.transpose(moved, (2, 1, 0)))
                note = (f"{what} is stored with axes {axis_codes(self.ijk_to_ras)}, the image with "
                        f"{axis_codes(target.ijk_to_ras)}; it was reoriented exactly (no interpolation).")
                return Volume(array=array, ijk_to_ras=np.array(target.ijk_to_ras, dtype=float)), note
        self_desc, target_desc = self.describe("it"), target.describe("the image")
        raise InputError(
            f"{what} is not on the same voxel grid as the image ({self_desc}; {target_desc}); "
            "resample it onto the image's grid first (nearest neighbour for label maps)."
        )

    def validate(self, what: str = "volume") -> "Volume":
        """Raise :class:`InputError` unless this is a usable 3D (optionally multi-channel) image."""
        if self.array.ndim not in (3, 4):
            raise InputError(f"The {what} must be 3D (or 4D with channels first); it has shape {self.array.shape}.")
        if min(self.spatial_shape) < 2:
            raise InputError(f"The {what} has shape {self.array.shape}: every spatial axis needs at least 2 voxels.")
        if not np.issubdtype(self.array.dtype, np.number) or np.issubdtype(self.array.dtype, np.complexfloating):
            raise InputError(f"The {what} has voxel type {self.array.dtype}; a real-valued scalar image is needed.")
        matrix = np.asarray(self.ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise InputError(f"The {what} has an invalid IJK-to-RAS matrix:\n{matrix}")
        if np.issubdtype(self.array.dtype, np.floating) and not np.all(np.isfinite(self.array)):
            bad = int(np.count_nonzero(~np.isfinite(self.array)))
            raise InputError(f"The {what} has {bad} NaN/infinite voxels; fix or mask them before segmenting.")
        return self
