"""Calibration patches for post-training quantization: label-free, foreground-aware, deterministic.

Strategy (no labels needed):

1. Each volume goes through exactly the inference preprocessing (:func:`preprocess.to_network_space`),
   so patches have the statistics the quantized network will see.
2. A *body mask* is computed from the raw (resampled, not yet normalized) first channel:
   CT (``intensity == "ct"``): voxels above -500 HU (tissue, not air);
   otherwise: voxels above the 10th percentile (MR background is dark). An empty mask means "everywhere".
3. Patches are assigned to volumes round-robin (patch n -> volume n mod V). For each patch, with
   probability ``foreground_fraction`` its centre is a uniformly random voxel of the body mask,
   otherwise a uniformly random voxel of the whole volume. The patch is then shifted to lie inside the
   volume. Volumes smaller than the patch are zero-padded symmetrically, like MONAI's sliding window does
   at inference (``cval=0``).
4. Randomness comes from ``numpy.random.default_rng([seed, volume_index])``: same inputs + seed ->
   same patches, independent of how many volumes are processed before.
5. Each volume is preprocessed once (:class:`PreparedVolumes`); the accuracy guard's held-out patches are drawn
   from the same preprocessed volumes, away from the calibration patches (:func:`draw_patches` ``avoid``).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..core.errors import InputError, InputWarning
from ..io.volumes import dicom_series_ids, read_volume, volume_suffix
from ..inference.input_checks import intensity_mismatch, looks_like_label_map, sample_values
from ..inference.preprocess import normalize_intensity, resample_to_network
from ..core.progress import Monitor
from ..core.spec import ModelSpec
from ..core.volume import Volume

CT_BODY_HU = -500.0
OTHER_BODY_PERCENTILE = 10.0
STAGE = "calibration patches"
PREPROCESS_STAGE = "calibration preprocessing"  # one step per volume preprocessed
APART_TRIES = 16  # draws per held-out patch looking for a place that no calibration patch covers
# Input checks: a label map has few distinct whole values; a CT in Hounsfield units has air (about -1000 HU).


@dataclass(frozen=True)
class CalibrationSettings:
    num_patches: int = 32
    seed: int = 0
    foreground_fraction: float = 0.75  # share of patches centred inside the body mask


def validate_settings(settings: CalibrationSettings) -> None:
    if settings.num_patches < 1:
        raise InputError(f"Number of calibration patches must be >= 1, got {settings.num_patches}.")
    if settings.seed < 0:
        raise InputError(f"The calibration seed must be a non-negative integer, got {settings.seed}.")
    if not 0.0 <= settings.foreground_fraction <= 1.0:
        raise InputError(f"Foreground fraction must be in [0, 1], got {settings.foreground_fraction}.")


def body_mask(raw: torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """Boolean (I, J, K) mask of likely body voxels from the raw first channel."""
    first = raw[0].numpy()
    if spec.preprocessing.intensity == "ct":
        mask = first > CT_BODY_HU
    else:
        mask = first > np.percentile(first, OTHER_BODY_PERCENTILE)
    return mask if mask.any() else np.ones_like(mask, dtype=bool)


def _pad_to_patch(image: np.ndarray, mask: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    pads = []
    for size, want in zip(image.shape[1:], patch):
        diff = max(want - size, 0)
        pads.append((diff // 2, diff - diff // 2))
    if not any(p != (0, 0) for p in pads):
        return image, mask
    return np.pad(image, [(0, 0)] + pads), np.pad(mask, pads)


def _random_mask_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shape = np.asarray(mask.shape)
    for _ in range(1000):  # rejection sampling: exact and cheap unless the body is tiny
        point = (rng.random(3) * shape).astype(np.int64)
        if mask[tuple(point)]:
            return point
    flat = np.flatnonzero(mask)
    return np.asarray(np.unravel_index(flat[rng.integers(flat.size)], mask.shape))


def _draw_start(mask: np.ndarray, patch: np.ndarray, settings: CalibrationSettings,
                rng: np.random.Generator) -> np.ndarray:
    """The first corner of one patch: centred in the body mask (``foreground_fraction``) or anywhere."""
    shape = np.asarray(mask.shape)
    if rng.random() < settings.foreground_fraction:
        centre = _random_mask_voxel(mask, rng)
    else:
        centre = (rng.random(3) * shape).astype(np.int64)
    return np.clip(centre - patch // 2, 0, shape - patch)


def _largest_overlap(start: np.ndarray, others: np.ndarray, patch: np.ndarray) -> float:
    """The largest share of a patch at ``start`` that one patch at ``others`` (M, 3) covers."""
    if not len(others):
        return 0.0
    sides = np.clip(patch - np.abs(others - start), 0, None)
    return float(np.prod(sides, axis=1).max() / np.prod(patch))


def _start_apart(mask, patch, settings, rng, avoid: np.ndarray) -> tuple[np.ndarray, float]:
    """A start overlapping none of ``avoid``, else the least overlapping of :data:`APART_TRIES` draws."""
    best, least = None, 2.0
    for _ in range(APART_TRIES):
        start = _draw_start(mask, patch, settings, rng)
        overlap = _largest_overlap(start, avoid, patch)
        if overlap < least:
            best, least = start, overlap
        if overlap == 0.0:
            break
    return best, least


@dataclass
class PreparedVolume:
    """One calibration volume preprocessed as the network sees it."""

    image: np.ndarray  # (C, *network axes) float32, normalized
    mask: np.ndarray  # likely body voxels on the same axes (:func:`body_mask`)
    context: Any = None  # what maps results back: the NetworkGrid (spec models), nnU-Net's properties


def prepare_volume(volume: Volume, spec: ModelSpec) -> PreparedVolume:
    """``volume`` through the inference preprocessing (:func:`preprocess.to_network_space`) and its body mask."""
    raw, grid = resample_to_network(volume, spec)
    mask = body_mask(raw, spec)
    return PreparedVolume(normalize_intensity(raw, spec.preprocessing).numpy(), mask, grid)


class PreparedVolumes:
    """Volumes preprocessed on first use, each reported as a step of :data:`PREPROCESS_STAGE`. Those in ``keep``
    stay after use (drawn from again, or segmented whole); of the others only the last one used is held."""

    def __init__(self, volumes: Sequence[Any], prepare: Callable[[Any], PreparedVolume],
                 monitor: Monitor | None = None, keep: Iterable[int] = ()):
        self.volumes, self.prepare = list(volumes), prepare
        self.monitor, self.keep = monitor or Monitor(), set(keep)
        self.preprocessed = 0  # preprocessing runs so far
        self._held: dict[int, PreparedVolume] = {}

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> PreparedVolume:
        if index not in self._held:
            if not self.preprocessed:
                self.monitor.update(PREPROCESS_STAGE, 0, len(self.volumes))
            prepared = self.prepare(self.volumes[index])
            self.preprocessed += 1
            self.monitor.update(PREPROCESS_STAGE, self.preprocessed, len(self.volumes))
            self._held = {i: v for i, v in self._held.items() if i in self.keep}
            self._held[index] = prepared
        return self._held[index]


@dataclass
class PatchDraw:
    """Patches drawn from prepared volumes, and where: ``volume`` index and first corner (padded axes) of each."""

    patches: np.ndarray  # (N, C, *patch) float32
    volume: np.ndarray  # (N,)
    start: np.ndarray  # (N, 3)
    overlap: np.ndarray  # (N,) with ``avoid``: the largest share of each patch that one avoided patch covers


def draw_patches(volumes: PreparedVolumes, patch_size: Sequence[int], settings: CalibrationSettings,
                 monitor: Monitor | None = None, indices: Sequence[int] | None = None,
                 avoid: PatchDraw | None = None, stage: str = STAGE) -> PatchDraw:
    """``settings.num_patches`` patches, round-robin over ``indices`` (default: all) of ``volumes``; with ``avoid``,
    each placed apart from those patches of the same volume where it can be (else as little over them as it can)."""
    monitor = monitor or Monitor()
    validate_settings(settings)
    indices = list(range(len(volumes))) if indices is None else list(indices)
    if not indices:
        raise InputError("No calibration volumes were given; give at least one image like those you will segment.")
    total, patch = settings.num_patches, np.asarray(patch_size, dtype=np.int64)
    drawn: list[list[tuple]] = [[] for _ in indices]
    monitor.update(stage, 0, total)
    done = 0
    for slot, index in enumerate(indices):
        count = len(range(slot, total, len(indices)))
        if count == 0:
            continue
        prepared = volumes[index]
        image, mask = _pad_to_patch(prepared.image, prepared.mask, patch)
        rng = np.random.default_rng([settings.seed, index])
        taken = np.zeros((0, 3), dtype=np.int64) if avoid is None else avoid.start[avoid.volume == index]
        for _ in range(count):
            if avoid is None:
                start, overlap = _draw_start(mask, patch, settings, rng), 0.0
            else:
                start, overlap = _start_apart(mask, patch, settings, rng, taken)
            region = tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch))
            drawn[slot].append((np.array(image[(slice(None),) + region], dtype=np.float32), index, start, overlap))
            done += 1
            monitor.update(stage, done, total)
    ordered = [drawn[n % len(indices)][n // len(indices)] for n in range(total)]  # patch n: volume n mod V
    return PatchDraw(np.stack([o[0] for o in ordered]).astype(np.float32, copy=False),
                     np.asarray([o[1] for o in ordered]), np.stack([o[2] for o in ordered]),
                     np.asarray([o[3] for o in ordered], dtype=np.float64))


def sample_calibration_patches(
    volumes: Sequence[Volume],
    spec: ModelSpec,
    settings: CalibrationSettings = CalibrationSettings(),
    monitor: Monitor | None = None,
) -> np.ndarray:
    """``settings.num_patches`` preprocessed patches, shape (N, C, *spec.patch_size), float32."""
    validate_settings(settings)
    prepared = PreparedVolumes(volumes, lambda volume: prepare_volume(volume, spec), monitor)
    return draw_patches(prepared, spec.patch_size, settings, monitor).patches


@contextlib.contextmanager
def _quiet_itk():
    """GDCM warns "No Series were found" on stderr for every non-DICOM folder it is asked about."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _is_dicom_series(folder: Path) -> bool:
    with _quiet_itk():
        return bool(dicom_series_ids(folder))


def _expand(entry: Path) -> list[Path]:
    """Files and DICOM-series folders to read for one user-given path."""
    if not entry.exists():
        raise InputError(f"Calibration input '{entry}' does not exist.")
    if entry.is_file():
        return [entry]
    if _is_dicom_series(entry):
        return [entry]
    found = []
    for child in sorted(entry.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and volume_suffix(child):
            found.append(child)
        elif child.is_dir() and _is_dicom_series(child):
            found.append(child)
    return found


def calibration_inputs(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """The files and DICOM-series folders that calibration will read, in order (folders expanded)."""
    entries = [paths] if isinstance(paths, (str, Path)) else list(paths)
    targets = [target for entry in entries for target in _expand(Path(entry))]
    if not targets:
        raise InputError(
            f"No calibration volumes found in {[str(e) for e in entries]}; give NIfTI/NRRD/MHA files "
            "or a folder of them (or of DICOM series)."
        )
    return targets


def load_calibration_volumes(paths: Sequence[str | Path] | str | Path, spec: ModelSpec | None = None) -> list[Volume]:
    """Read calibration volumes from files and/or folders (a folder: its image files and DICOM-series
    subfolders, sorted by name; a folder holding DICOM files is one volume). With ``spec``, each volume is
    checked against it (:func:`check_calibration_volume`)."""
    volumes = []
    for target in calibration_inputs(paths):
        volume = read_volume(target)
        if spec is not None:
            check_calibration_volume(volume, spec, str(target))
        volumes.append(volume)
    return volumes

def check_calibration_volume(volume: Volume, spec: ModelSpec, name: str) -> None:
    """Refuse a label map as calibration input; warn (:class:`InputWarning`) about an image unlike the model's."""
    if looks_like_label_map(volume):
        count = np.unique(sample_values(volume.array)).size
        raise InputError(
            f"Calibration input '{name}' looks like a label map ({count} distinct whole values), not an image; "
            "calibration needs unlabeled images like those you will segment. Remove it from --calibration."
        )
    reason = intensity_mismatch(volume, spec)
    if reason:
        warnings.warn(f"calibration input '{name}': {reason}; calibrate with images like those you will segment.",
                      InputWarning, stacklevel=2)

