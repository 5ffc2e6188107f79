"""The one in-memory image type: a KJI-ordered array plus its IJK-to-RAS matrix.

This is exactly what Slicer hands out (``arrayFromVolume`` + ``GetIJKToRASMatrix``), so the module
converts without math. Files on disk (NIfTI/NRRD/DICOM, LPS in ITK) are converted in
:mod:`PTQLogic.imageio`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


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
                f"{what} is not on the same voxel grid (shape {other.spatial_shape} vs {self.spatial_shape}, or a "
                "different IJK-to-RAS matrix); resample it onto the image's grid first."
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
