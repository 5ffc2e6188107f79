"""Volumes in and out: NIfTI, NRRD, MetaImage and DICOM series via SimpleITK.

ITK keeps geometry in LPS (direction columns, spacing, origin); a :class:`~PTQLogic.core.volume.Volume`
keeps Slicer's RAS ``ijk_to_ras``. The conversion is ``ijk_to_ras = diag(-1, -1, 1, 1) @ ijk_to_lps``
with ``ijk_to_lps = [[D @ diag(spacing), origin], [0, 0, 0, 1]]``. ``sitk.GetArrayFromImage``
already returns the KJI (slice, row, column) order a Volume uses.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import InputError
from ..core.fileio import atomic_path, atomic_write_text
from ..core.spec import ClassInfo
from ..core.volume import Volume

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
# A 4D file whose 4th axis is at most this long is read as channels (e.g. multi-modal MR);
# longer ones are time series, which a 3D segmentation network cannot take.
MAX_CHANNELS = 8
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume_suffix(path: str | Path) -> str | None:
    """The recognised image suffix of ``path`` (lower case, ``.nii.gz`` as one), or None."""
    name = Path(path).name.lower()
    return next((s for s in READ_SUFFIXES if name.endswith(s)), None)


def sitk_module():
    import SimpleITK as sitk

    return sitk


def dicom_series_ids(folder: str | Path) -> list[str]:
    """Series instance UIDs of the DICOM files directly inside ``folder`` (empty when none)."""
    sitk = sitk_module()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM's "No Series were found": our error says it
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def check_readable(path: Path, what: str = "Input") -> None:
    """Refuse a file (or folder) this user may not read: say so, rather than what a reader makes of it."""
    import os

    needed = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, needed, effective_ids=os.access in os.supports_effective_ids):
        raise InputError(f"Cannot read {what.lower()} '{path}': permission denied; give this user read access "
                         f"to it (e.g. chmod u+r{'X' if path.is_dir() else ''} '{path}').")


def _read_dicom_folder(folder: Path):
    sitk = sitk_module()
    series = dicom_series_ids(folder)
    if not series:
        raise InputError(f"Folder '{folder}' holds no DICOM series; give a NIfTI/NRRD/MHA file or a DICOM folder.")
    if len(series) > 1:
        raise InputError(
            f"Folder '{folder}' holds {len(series)} DICOM series ({', '.join(series)}); "
            "put each series in its own folder and choose one."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _ijk_to_ras(image) -> np.ndarray:
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(image.GetSpacing()[:3])
    ijk_to_lps[:3, 3] = image.GetOrigin()[:3]
    return _LPS_TO_RAS @ ijk_to_lps


def _to_volume(image, source: str) -> Volume:
    size = tuple(image.GetSize())
    if any(s == 0 for s in size):
        raise InputError(f"'{source}' is empty (size {size}).")
    dim = image.GetDimension()
    if dim == 2:
        raise InputError(f"'{source}' is a 2D image (size {size}); a 3D volume is needed.")
    if dim not in (3, 4):
        raise InputError(f"'{source}' has {dim} dimensions (size {size}); a 3D volume is needed.")
    components = image.GetNumberOfComponentsPerPixel()
    if dim == 4 and components > 1:
        raise InputError(f"'{source}' is a 4D vector image (size {size}, {components} components); not supported.")
    array = sitk_module().GetArrayFromImage(image)  # a copy the volume owns
    if dim == 4:  # array is (T, K, J, I)
        if size[3] > MAX_CHANNELS:
            raise InputError(
                f"'{source}' is a 4D series with {size[3]} volumes; a 3D volume (or at most {MAX_CHANNELS} "
                "channels) is needed. Extract the volume to segment first."
            )
        if size[3] == 1:
            array = array[0]
    elif components > 1:  # (K, J, I, C) -> (C, K, J, I)
        if components > MAX_CHANNELS:
            raise InputError(f"'{source}' has {components} components per voxel; at most {MAX_CHANNELS} are supported.")
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    volume = Volume(array=array, ijk_to_ras=_ijk_to_ras(image))
    return volume.validate(f"image '{source}'")


def check_input_path(path: Path) -> None:
    """An input volume path that does not exist or cannot be read fails with that (no SimpleITK needed)."""
    try:
        exists = path.exists()
    except PermissionError:  # a folder above it cannot be entered
        raise InputError(f"Cannot read input '{path}': permission denied on a folder above it; give this user "
                         "access to it.") from None
    if not exists:
        raise InputError(f"Input '{path}' does not exist.")
    check_readable(path)


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI/NRRD/MetaImage file or a folder with exactly one DICOM series as a :class:`Volume`."""
    sitk = sitk_module()
    path = Path(path)
    check_input_path(path)
    if path.is_dir():
        try:
            image = _read_dicom_folder(path)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            raise InputError(f"Could not read the DICOM series in '{path}': {reason}") from None
        return _to_volume(image, str(path))
    _refuse_oversized(path)
    if path.stat().st_size == 0:
        raise InputError(f"'{path}' is an empty file (0 bytes); it may have been cut off while copying.")
    # ITK reads a cut-off, damaged or NaN-holding NIfTI without a word: a second pass over the file checks
    # it, in a thread beside ITK's read (both release the GIL while they decompress)
    if volume_suffix(path) in (".nii", ".nii.gz"):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="ptqseg-nifti-check") as pool:
            checks = pool.submit(_check_nifti, path)
            image = _read_image(sitk, path)
        checks.result()  # the file's own problem (cut off, NaN voxels), once ITK could read it
    else:
        image = _read_image(sitk, path)
    return _to_volume(image, str(path))


def _read_image(sitk, path: Path):
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = next((line for line in reversed(lines) if "ideal" not in line and "actual" not in line), "")
        raise InputError(
            f"Could not read '{path}' as an image ({detail[-160:] or 'unknown reason'}); the file may be damaged "
            f"or truncated. Supported are {', '.join(READ_SUFFIXES)} files and folders holding one DICOM series."
        ) from None


MAX_VOLUME_BYTES_ENV = "PTQSEG_MAX_MEMORY_GB"


def _refuse_oversized(path: Path) -> None:
    """Read only the header; refuse a volume whose voxels would not fit in memory, before allocating them."""
    from ..core.memory import available_memory_bytes

    reader = sitk_module().ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # unreadable headers are reported by the full read with the usual message
    size = [int(s) for s in reader.GetSize()]
    voxels = float(np.prod(size, dtype=float)) * reader.GetNumberOfComponents()
    needed = voxels * 4  # read as-is, then converted to float32 for the network
    available = available_memory_bytes()
    if needed * 2 > available:  # the voxels plus one working copy
        raise InputError(
            f"'{path}' holds {'x'.join(map(str, size))} voxels (about {needed / 2**30:.1f} GiB as float32); "
            f"only about {available / 2**30:.1f} GiB of memory is available. Crop or downsample it first, "
            f"or raise {MAX_VOLUME_BYTES_ENV}."
        )


_CHECK_BLOCK = 1 << 22  # bytes decoded per step of the NIfTI check


def _check_nifti(path: Path) -> None:
    """What ITK reads without a word: a cut-off NIfTI (filled with zeros), a damaged .nii.gz, NaN/infinite
    float voxels (read as 0). One streaming pass over the stored bytes, against the header's sizes."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        # vox_offset 0 in a single-file NIfTI means "right after the header" (352 bytes for NIfTI-1)
        offset = max(int(header["vox_offset"]), int(getattr(header, "single_vox_offset", 0)))
        dtype = header.get_data_dtype()
        expected = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * dtype.itemsize
    except Exception:  # nibabel's opinion on odd headers is not needed: SimpleITK read it
        return
    floating, compressed = np.issubdtype(dtype, np.floating), path.name.lower().endswith(".gz")
    stored, bad, pending = 0, 0, b""
    try:
        if not compressed and not floating:
            stored = path.stat().st_size  # nothing to decode: the size says it all
        else:
            with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
                while block := handle.read(_CHECK_BLOCK):
                    if floating:  # the voxel bytes of this block, whole voxels only; the rest waits for the next
                        voxels = pending + block[max(offset - stored, 0):max(expected - stored, 0)]
                        whole = len(voxels) - len(voxels) % dtype.itemsize
                        bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(voxels[:whole], dtype=dtype))))
                        pending = voxels[whole:]
                    stored += len(block)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"'{path}' is truncated or damaged ({exc}); copy the file again.") from None
    if stored < expected:
        raise InputError(f"'{path}' is truncated: it holds {stored} of the {expected} bytes its header announces; "
                         "copy the file again.")
    if bad:
        raise InputError(f"'{path}' has {bad} NaN/infinite voxels; fix or mask them before segmenting.")


def _label_array(volume: Volume) -> np.ndarray:
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"A label map must be 3D (K, J, I); got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InputError("A label map must hold whole numbers; got fractional values.")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0 or high > 65535:
        raise InputError(f"Label values must lie in 0..65535; got {low}..{high}.")
    return array.astype(np.uint8 if high <= 255 else np.uint16, copy=False)


def to_sitk_image(array_kji: np.ndarray, ijk_to_ras: np.ndarray):
    """A SimpleITK image (LPS geometry) for a KJI array on ``ijk_to_ras``."""
    sitk = sitk_module()
    ijk_to_lps = _LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise InputError("The IJK-to-RAS matrix is sheared (axes not perpendicular); ITK formats cannot store it.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    image.SetOrigin(tuple(float(v) for v in ijk_to_lps[:3, 3]))
    return image


def write_labelmap(volume: Volume, path: str | Path, classes: Sequence[ClassInfo] | None = None) -> None:
    """Write a label map atomically on exactly ``volume``'s grid (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``).

    A ``.seg.nrrd`` file also carries 3D Slicer's segmentation header (one segment per class of
    ``classes`` after the background, with name, color, label value and extent).
    """
    path = Path(path)
    if path.name.lower().endswith(".nhdr") or path.name.lower().endswith(".mhd"):
        raise InputError(f"'{path}': detached-header formats are not written; use .nrrd, .nii.gz or .mha.")
    if volume_suffix(path) is None:
        raise InputError(f"Cannot write label map '{path}': use one of {', '.join(WRITE_SUFFIXES)}.")
    labels = _label_array(volume)
    image = to_sitk_image(labels, volume.ijk_to_ras)
    if path.name.lower().endswith(SEG_NRRD):
        for key, value in slicer_segmentation_header(labels, classes).items():
            image.SetMetaData(key, value)
    tmp = None
    try:
        with atomic_path(path) as tmp:
            sitk_module().WriteImage(image, str(tmp), True)
            _verify_written(tmp, image)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        if tmp is not None:  # the temporary name means nothing to the user
            reason = reason.replace(str(tmp), str(path))
        raise InputError(f"Could not write '{path}': {reason}; check free disk space and permissions.") from None


def _verify_written(tmp: Path, image) -> None:
    """ITK does not notice every failed write (a full disk can leave a cut-off .nii.gz): read it back."""
    sitk = sitk_module()
    try:
        back = sitk.ReadImage(str(tmp))
        same = back.GetSize() == image.GetSize() and np.array_equal(
            sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    except RuntimeError:
        same = False
    if not same:
        raise OSError(28, "the file on disk is incomplete (disk full or write refused)", str(tmp))


def label_table_paths(labelmap_path: str | Path) -> tuple[Path, Path]:
    """``x.nii.gz`` -> (``x.nii.gz.labels.json``, ``x.nii.gz.labels.csv``) next to it.

    Named after the whole file name, so ``x.nrrd`` written next to ``x.nii.gz`` keeps its own tables.
    """
    path = Path(labelmap_path)
    return path.with_name(path.name + ".labels.json"), path.with_name(path.name + ".labels.csv")


def write_label_tables(classes: Sequence[ClassInfo], labelmap_path: str | Path) -> tuple[Path, Path]:
    """Both tables of ``labelmap_path`` (:func:`label_table_paths`); returns their paths."""
    json_path, csv_path = label_table_paths(labelmap_path)
    write_label_table(classes, json_path)
    write_label_table(classes, csv_path)
    return json_path, csv_path


SEG_NRRD = ".seg.nrrd"


def _extent(slices: tuple[slice, ...] | None) -> str:
    """Slicer's ``Segment<N>_Extent``: "i0 i1 j0 j1 k0 k1" (inclusive voxel bounds; empty: "0 -1 0 -1 0 -1")."""
    if slices is None:
        return "0 -1 0 -1 0 -1"
    k, j, i = slices
    return " ".join(str(v) for v in (i.start, i.stop - 1, j.start, j.stop - 1, k.start, k.stop - 1))


def slicer_segmentation_header(labels_kji: np.ndarray, classes: Sequence[ClassInfo] | None) -> dict[str, str]:
    """The key/value fields 3D Slicer reads from a ``.seg.nrrd`` (one layer; segment N has label value N + 1)."""
    from scipy import ndimage

    high = int(labels_kji.max()) if labels_kji.size else 0
    if classes is None:  # no model classes: one unnamed segment per label value present
        classes = [ClassInfo(name="background", color=(0, 0, 0))] + [
            ClassInfo(name=f"Segment_{value}", color=(128, 174, 128)) for value in range(1, high + 1)
        ]
    extents = ndimage.find_objects(labels_kji.astype(np.int32, copy=False))
    header = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, info in enumerate(classes[1:]):
        value = index + 1
        red, green, blue = (int(c) / 255.0 for c in info.color)
        prefix = f"Segment{index}_"
        header.update({
            prefix + "ID": f"Segment_{value}",
            prefix + "Name": info.name,
            prefix + "NameAutoGenerated": "0",
            prefix + "Color": f"{red:.6g} {green:.6g} {blue:.6g}",
            prefix + "ColorAutoGenerated": "0",
            prefix + "LabelValue": str(value),
            prefix + "Layer": "0",
            prefix + "Extent": _extent(extents[value - 1] if value - 1 < len(extents) else None),
            prefix + "Tags": "Segmentation.Status:inprogress|",
        })
    return header


def write_label_table(classes: Sequence[ClassInfo], path: str | Path) -> None:
    """Write label value -> name/color as ``.json`` (``{"labels": [...]}``) or ``.csv`` (value,name,r,g,b)."""
    path = Path(path)
    rows = [(value, c.name, [int(v) for v in c.color]) for value, c in enumerate(classes)]
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = {"labels": [{"value": v, "name": n, "color": col} for v, n, col in rows]}
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    elif suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["value", "name", "r", "g", "b"])
        writer.writerows([v, n, *col] for v, n, col in rows)
        atomic_write_text(path, buffer.getvalue())
    else:
        raise InputError(f"Label table '{path}' must end in .json or .csv.")
