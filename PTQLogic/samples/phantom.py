"""Synthetic abdominal CT phantoms with known organ labels (for demos, tests and sample models).

Each phantom is an ellipsoidal body (fat rim around soft tissue) in air, with liver, spleen, two
kidneys (bright cortex, darker medulla), aorta and a vertebral column drawn as randomly shifted,
scaled, rotated and gently deformed ellipsoids/cylinders, then blurred (partial volume) and given
Gaussian noise. Geometry is defined relative to the field of view, so any grid size gives the same
anatomy; the seed drives every random choice (same seed -> bit-identical phantom).

The grid mimics a DICOM-derived NIfTI: ``ijk_to_ras = diag(-sx, -sy, sz)`` (LPS-like axes) with
the volume centre at RAS (0, 0, 0). Organ sides follow the patient: liver and right kidney on the
patient's right (+x in RAS), spleen and left kidney on the left, spine posterior (-y).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..core.errors import InputError
from ..core.fileio import atomic_path
from ..core.spec import ClassInfo
from ..core.volume import Volume

PHANTOM_CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo("background", (0, 0, 0)),
    ClassInfo("liver", (221, 130, 101)),
    ClassInfo("spleen", (157, 108, 162)),
    ClassInfo("kidney_right", (185, 102, 83)),
    ClassInfo("kidney_left", (212, 126, 151)),
    ClassInfo("aorta", (224, 97, 76)),
    ClassInfo("vertebra", (241, 214, 145)),
)
LABELS = {info.name: value for value, info in enumerate(PHANTOM_CLASSES)}

AIR_HU, FAT_HU, SOFT_TISSUE_HU = -1000.0, -100.0, 30.0
# Portal-venous-phase-like HU. name -> (centre x, y, z as fractions of the body half-axes, half-axes, HU)
_ORGANS = {
    "liver": ((0.42, 0.10, 0.25), (0.42, 0.55, 0.45), 100.0),
    "spleen": ((-0.55, -0.20, 0.25), (0.20, 0.36, 0.35), 90.0),
    "kidney_right": ((0.40, -0.52, -0.35), (0.18, 0.25, 0.35), 170.0),
    "kidney_left": ((-0.40, -0.52, -0.30), (0.18, 0.25, 0.35), 170.0),
}
_KIDNEY_MEDULLA_HU = 60.0
_AORTA = ((-0.08, -0.30), 0.15, 180.0)  # centre x, y; radius (fraction of body half-axis y); HU
_SPINE = ((0.0, -0.70), 0.22, 600.0)  # vertebral body centre x, y; radius; cortical HU (marrow ~250)


def phantom_grid(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """IJK-to-RAS of a phantom: LPS-like axes (like most CT NIfTIs), centred on RAS (0, 0, 0)."""
    size_k, size_j, size_i = (int(v) for v in shape)
    sx, sy, sz = (float(v) for v in spacing)
    matrix = np.diag([-sx, -sy, sz, 1.0])
    matrix[:3, 3] = [sx * (size_i - 1) / 2, sy * (size_j - 1) / 2, -sz * (size_k - 1) / 2]
    return matrix


def _check_args(shape: Sequence[int], spacing: Sequence[float]) -> None:
    if len(shape) != 3 or any(int(v) < 8 for v in shape):
        raise InputError(f"Phantom shape must be 3 sizes (K, J, I) of at least 8 voxels; got {tuple(shape)}.")
    if len(spacing) != 3 or any(not float(v) > 0 for v in spacing):
        raise InputError(f"Phantom spacing must be 3 positive numbers in mm (I, J, K); got {tuple(spacing)}.")


def _ras_coordinates(shape: Sequence[int], matrix: np.ndarray) -> np.ndarray:
    """(3, K, J, I) RAS coordinates of every voxel centre."""
    k, j, i = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    ijk = np.stack([i, j, k])
    return np.tensordot(matrix[:3, :3].astype(np.float32), ijk, axes=1) + matrix[:3, 3, None, None, None].astype(np.float32)


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def _ellipsoid(points: np.ndarray, centre, half_axes, rotation, wobble) -> np.ndarray:
    """Implicit ellipsoid value (< 1 inside) with a smooth low-frequency wobble of its surface."""
    local = np.tensordot(rotation.T, points - np.asarray(centre, np.float32)[:, None, None, None], axes=1)
    scaled = local / np.asarray(half_axes, np.float32)[:, None, None, None]
    radius2 = np.sum(scaled ** 2, axis=0)
    amp, fx, fy, fz, phase = wobble
    return radius2 * (1.0 + amp * np.sin(fx * scaled[0] + fy * scaled[1] + fz * scaled[2] + phase))


def make_phantom(
    seed: int, shape: Sequence[int] = (64, 64, 64), spacing: Sequence[float] = (1.5, 1.5, 1.5)
) -> tuple[Volume, Volume]:
    """A CT-like phantom: (image Volume int16 HU, label Volume uint8) on the same KJI grid.

    ``shape`` is (K, J, I) like ``Volume.array``; ``spacing`` is mm along (I, J, K). Labels follow
    :data:`PHANTOM_CLASSES` (position == label value).
    """
    _check_args(shape, spacing)
    shape = tuple(int(v) for v in shape)
    rng = np.random.default_rng(int(seed))
    matrix = phantom_grid(shape, spacing)
    points = _ras_coordinates(shape, matrix)
    extent = np.array([shape[2] * spacing[0], shape[1] * spacing[1], shape[0] * spacing[2]], np.float32)

    body_half = extent * np.array([0.45, 0.34, 1.0], np.float32) * rng.uniform(0.9, 1.05, 3).astype(np.float32)
    body_half[2] = extent[2] * 10  # the trunk runs through every slice
    body_centre = np.array([*rng.uniform(-0.03, 0.03, 2) * extent[:2], 0.0], np.float32)
    norm_points = points - body_centre[:, None, None, None]
    no_rotation = np.eye(3, dtype=np.float32)
    flat = (0.0, 1.0, 1.0, 1.0, 0.0)
    hu = np.full(shape, AIR_HU, np.float32)
    labels = np.zeros(shape, np.uint8)
    body = _ellipsoid(norm_points, (0, 0, 0), body_half, no_rotation, (0.03, 2.0, 3.0, 0.0, rng.uniform(0, 6.3)))
    hu[body < 1.0] = FAT_HU
    fat = rng.uniform(0.08, 0.14)
    hu[_ellipsoid(norm_points, (0, 0, 0), body_half * (1 - fat), no_rotation, flat) < 1.0] = SOFT_TISSUE_HU

    scale = np.array([body_half[0], body_half[1], extent[2] / 2], np.float32)
    for name, (centre, half, organ_hu) in _ORGANS.items():
        c = (np.asarray(centre) + rng.uniform(-0.05, 0.05, 3)) * scale
        h = np.asarray(half) * rng.uniform(0.85, 1.15, 3) * scale
        wobble = (rng.uniform(0.05, 0.15), *rng.uniform(1.0, 3.0, 3), rng.uniform(0, 6.3))
        rotation = _rotation_z(rng.uniform(-0.3, 0.3))
        inside = _ellipsoid(norm_points, c, h, rotation, wobble)
        mask = inside < 1.0
        labels[mask] = LABELS[name]
        hu[mask] = organ_hu + rng.uniform(-8, 8)
        if name.startswith("kidney"):  # cortex bright (contrast), medulla/sinus darker
            hu[inside < 0.45] = _KIDNEY_MEDULLA_HU + rng.uniform(-5, 5)

    for label, ((cx, cy), radius, tube_hu) in ((LABELS["aorta"], _AORTA), (LABELS["vertebra"], _SPINE)):
        r = radius * body_half[1] * rng.uniform(0.9, 1.1)
        offset = np.array([cx * body_half[0], cy * body_half[1]], np.float32) + rng.uniform(-0.03, 0.03, 2) * body_half[:2]
        tilt = rng.uniform(-0.05, 0.05, 2) * body_half[:2]  # shift from bottom to top slice
        along = norm_points[2] / (extent[2] / 2)
        dist = np.sqrt((norm_points[0] - offset[0] - tilt[0] * along) ** 2 + (norm_points[1] - offset[1] - tilt[1] * along) ** 2)
        mask = dist < r
        labels[mask] = label
        hu[mask] = tube_hu + rng.uniform(-20, 20)
        if label == LABELS["vertebra"]:
            hu[dist < 0.7 * r] = 250.0 + rng.uniform(-30, 30)  # cancellous bone inside the cortex

    hu = ndimage.gaussian_filter(hu, sigma=0.7)  # partial-volume blur
    hu += rng.normal(0.0, rng.uniform(15.0, 25.0), shape).astype(np.float32)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return Volume(image, matrix.copy()), Volume(labels, matrix.copy())


def _write_image(volume: Volume, path: Path) -> None:
    """Write an image atomically via SimpleITK; ``imageio.to_sitk_image`` converts RAS to ITK's LPS."""
    import SimpleITK as sitk

    from ..io.volumes import to_sitk_image

    with atomic_path(path) as tmp:
        sitk.WriteImage(to_sitk_image(volume.array, volume.ijk_to_ras), str(tmp), True)


def write_phantom_set(
    folder: str | Path,
    n: int,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
) -> list[tuple[Path, Path]]:
    """Write ``n`` phantoms (seeds ``seed .. seed+n-1``) as ``phantom_XXX.nii.gz`` + ``phantom_XXX_labels.nii.gz``."""
    from ..io.volumes import write_labelmap

    if int(n) < 1:
        raise InputError(f"Number of phantoms must be at least 1; got {n}.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"'{folder}' exists and is not a folder; choose a folder for the phantoms.")
    pairs = []
    for index in range(int(n)):
        image, labels = make_phantom(int(seed) + index, shape, spacing)
        image_path = folder / f"phantom_{int(seed) + index:03d}.nii.gz"
        label_path = folder / f"phantom_{int(seed) + index:03d}_labels.nii.gz"
        _write_image(image, image_path)
        write_labelmap(labels, label_path)
        pairs.append((image_path, label_path))
    return pairs
