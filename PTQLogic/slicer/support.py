"""Slicer-free helpers for the PTQSegmentation Slicer module: geometry, label tables, results.

The module (PTQSegmentation/PTQSegmentation.py) keeps only MRML glue; everything that can be
decided without Slicer lives here and in :mod:`slicer_process`, :mod:`slicer_deps` and
:mod:`slicer_models` (re-exported below) so it is tested with plain pytest. Never import slicer,
qt, vtk or ctk here. SimpleITK (which Slicer ships) is imported lazily.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..core.errors import InputError, PTQError
from ..core.fileio import atomic_path
from ..core.volume import Volume
from .deps import (  # noqa: F401  (re-export)
    QUANTIZE_NEEDS_NEWER_PYTHON, REQUIRED, DependencyPlan, dependency_plan, has_nvidia_gpu, installed_versions,
    quantization_supported, versions_report,
)
from ..models import model_files
from ..models.model_files import ModelSource, sample_models  # noqa: F401  (re-export)
from .process import (  # noqa: F401  (re-export)
    BackgroundProcess, RunProgress, default_python, engine_environment, info_command, parse_error, parse_estimate,
    fp32_windows_for, parse_progress, parse_result, ptqlogic_parent_dir, quantize_command, runtime_choice_text,
    segment_command,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse

# ---------------------------------------------------------------- the model to segment with


def choose_model_source(path: str | Path) -> ModelSource:
    """What the Model field shows: a TotalSegmentator-style parts file (``{"parts": [...], "labels": ...}``,
    segmented as it is), else what :func:`PTQLogic.models.model_files.choose_model_source` finds."""
    from ..inference.nnunet.segment import expand_models, is_parts_file

    if not is_parts_file(path):
        return model_files.choose_model_source(path)
    try:
        parts, labels = expand_models([path])
    except PTQError as exc:  # say what is wrong in the UI
        return ModelSource("nnunet_parts", str(exc), str(path))
    names = ", ".join(p.parent.name if p.name.startswith("nnUNetTrainer") else p.name for p in parts)
    described = f"nnU-Net parts file: {len(parts)} parts ({names})" + (f", {len(labels)} labels" if labels else "")
    return ModelSource("nnunet_parts", described, str(path), segmentable=True)


def check_segment_model(model: str | Path, reference: bool = False) -> None:
    """Refuse, before a job starts, what Segment cannot run: no quantized model folder or parts file chosen yet, or
    a reference segmentation with a parts file (a reference is matched to one model's classes)."""
    from ..inference.nnunet.segment import is_parts_file

    if str(model) not in ("", ".") and is_parts_file(model):
        if reference:
            raise PTQError("A reference segmentation is matched to one model's classes; leave it empty with an "
                           "nnU-Net parts file.")
        return
    if str(model) in ("", ".") or not (Path(model) / "spec.json").is_file():
        raise PTQError("Quantize a model first (or choose a quantized model folder or an nnU-Net parts file as the "
                       "model).")

# ---------------------------------------------------------------- geometry (vtkMRMLVolumeNode)


def ijk_to_ras_from_geometry(origin_ras: Sequence[float], spacing: Sequence[float],
                             directions_ras: np.ndarray) -> np.ndarray:
    """4x4 IJK-to-RAS like ``vtkMRMLVolumeNode`` builds it from SetOrigin/SetSpacing/SetIJKToRASDirections.

    ``directions_ras`` is 3x3 with column c the unit RAS direction of axis c (I, J, K), i.e. the
    node's ``IJKToRASDirections[row][col]`` layout: ``M[r, c] = spacing[c] * directions[r, c]``.
    """
    directions = np.asarray(directions_ras, dtype=float).reshape(3, 3)
    spacing = np.asarray(spacing, dtype=float).reshape(3)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise InputError(f"Voxel spacing must be 3 positive numbers, got {spacing.tolist()}.")
    if abs(np.linalg.det(directions)) < 1e-6:
        raise InputError(f"The IJK-to-RAS directions are degenerate:\n{directions}")
    matrix = np.eye(4)
    matrix[:3, :3] = directions * spacing[np.newaxis, :]
    matrix[:3, 3] = np.asarray(origin_ras, dtype=float).reshape(3)
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`ijk_to_ras_from_geometry`: (origin_ras, spacing, directions_ras)."""
    matrix = _checked_matrix(matrix)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    return matrix[:3, 3].copy(), spacing, matrix[:3, :3] / spacing[np.newaxis, :]


def lps_to_ras(matrix_or_point: np.ndarray) -> np.ndarray:
    """A 4x4 IJK-to-LPS matrix -> IJK-to-RAS, or a 3-point LPS -> RAS (flip the first two axes)."""
    value = np.asarray(matrix_or_point, dtype=float)
    if value.shape == (4, 4):
        return LPS_TO_RAS @ value
    if value.shape == (3,):
        return value * np.array([-1.0, -1.0, 1.0])
    raise InputError(f"Expected a 4x4 matrix or a 3-vector, got shape {value.shape}.")


ras_to_lps = lps_to_ras  # the flip is its own inverse


def ijk_to_ras_from_itk(origin_lps: Sequence[float], spacing: Sequence[float],
                        direction_lps: Sequence[float]) -> np.ndarray:
    """IJK-to-RAS for an ITK/SimpleITK image (origin, spacing, row-major 3x3 direction, all LPS)."""
    return lps_to_ras(ijk_to_ras_from_geometry(origin_lps, spacing, np.reshape(direction_lps, (3, 3))))


def _checked_matrix(matrix: np.ndarray) -> np.ndarray:
    matrix = np.array(matrix, dtype=float, copy=True)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise InputError(f"Invalid IJK-to-RAS matrix (need a finite, invertible 4x4):\n{matrix}")
    if not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise InputError(f"IJK-to-RAS matrix must have last row [0, 0, 0, 1], got {matrix[3].tolist()}.")
    return matrix


def volume_from_slicer_arrays(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
    """A validated :class:`Volume` from ``slicer.util.arrayFromVolume`` + ``GetIJKToRASMatrix`` (copied)."""
    array = np.array(array_kji, copy=True)
    return Volume(array=array, ijk_to_ras=_checked_matrix(ijk_to_ras)).validate("Slicer volume")


def same_grid(a: Volume, b: Volume, atol: float = 1e-4) -> bool:
    """True when both volumes have the same spatial shape and IJK-to-RAS (within ``atol`` mm)."""
    return a.same_grid(b, atol)


def save_volume_file(volume: Volume, path: str | Path) -> Path:
    """Write a scalar volume (NRRD/NIfTI/MHA by suffix) atomically, geometry in ITK's LPS.

    Used instead of ``slicer.util.saveNode`` so the scene node's storage settings stay untouched.
    """
    import SimpleITK as sitk

    volume.validate("volume to export")
    if volume.array.ndim != 3:
        raise InputError(f"Only single-channel volumes can be exported, got shape {volume.array.shape}.")
    origin, spacing, directions = geometry_from_ijk_to_ras(LPS_TO_RAS @ volume.ijk_to_ras)
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-6):
        raise InputError("The volume's axes are not perpendicular (sheared); harden or resample it first.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in directions.ravel()))
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), False)
    return path


def load_volume_file(path: str | Path) -> Volume:
    """Read a 3D scalar image written by the engine (labels or image) as a :class:`Volume` in RAS."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"The engine did not produce '{path}'.")
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"'{path}' is not a 3D scalar image.")
    matrix = ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(array=sitk.GetArrayFromImage(image), ijk_to_ras=matrix).validate(f"image '{path}'")


# ---------------------------------------------------------------- label table -> segments

_DICOM = "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
_ANATOMIC = "~Anatomic codes - DICOM master list~^^~^^"
_RIGHT, _LEFT = "SCT^24028007^Right", "SCT^7771000^Left"
# normalized class name -> (SNOMED CT code, meaning, modifier); Slicer's 7-part terminology entry format.
_TERMS: dict[str, tuple[str, str, str]] = {
    "liver": ("10200004", "Liver", "^^"),
    "spleen": ("78961009", "Spleen", "^^"),
    "kidney_right": ("64033007", "Kidney", _RIGHT),
    "kidney_left": ("64033007", "Kidney", _LEFT),
    "gallbladder": ("28231008", "Gallbladder", "^^"),
    "stomach": ("69695003", "Stomach", "^^"),
    "pancreas": ("15776009", "Pancreas", "^^"),
    "aorta": ("15825003", "Aorta", "^^"),
    "inferior_vena_cava": ("64131007", "Inferior vena cava", "^^"),
    "esophagus": ("32849002", "Esophagus", "^^"),
    "adrenal_gland_right": ("23451007", "Adrenal gland", _RIGHT),
    "adrenal_gland_left": ("23451007", "Adrenal gland", _LEFT),
    "brain": ("12738006", "Brain", "^^"),
    "heart": ("80891009", "Heart", "^^"),
}
_ALIASES = {"right_kidney": "kidney_right", "left_kidney": "kidney_left", "kidney_r": "kidney_right",
            "kidney_l": "kidney_left", "ivc": "inferior_vena_cava", "gall_bladder": "gallbladder",
            "oesophagus": "esophagus"}


def normalize_name(name: str) -> str:
    key = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    return _ALIASES.get(key, key)


def terminology_for(name: str) -> str | None:
    """Slicer terminology entry string for a common organ name, or None when not in the small table."""
    entry = _TERMS.get(normalize_name(name))
    if entry is None:
        return None
    code, meaning, modifier = entry
    return f"{_DICOM}SCT^{code}^{meaning}~{modifier}{_ANATOMIC}"


@dataclass(frozen=True)
class SegmentSpec:
    value: int  # label value in the label map
    name: str
    color_rgb_float: tuple[float, float, float]  # 0..1 like vtkSegment.SetColor
    terminology: str | None = None


def _color01(color: Sequence[Any]) -> tuple[float, float, float]:
    values = [float(c) for c in color]
    if len(values) != 3 or any(v < 0 for v in values):
        raise InputError(f"A label color must be 3 non-negative numbers, got {list(color)!r}.")
    integral = all(isinstance(c, (int, np.integer)) for c in color)
    if integral or any(v > 1.0 for v in values):
        values = [v / 255.0 for v in values]
    return tuple(min(v, 1.0) for v in values)


def _label_rows(table: Any) -> list[tuple[int, str, Sequence[Any] | None]]:
    if isinstance(table, (str, Path)):
        path = Path(table)
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"Cannot read the label table '{path}': {exc}") from None
    if isinstance(table, Mapping) and "labels" in table:
        table = table["labels"]
    elif isinstance(table, Mapping) and "classes" in table:
        table = table["classes"]
    if isinstance(table, Mapping):  # {"1": "liver", ...} or {"1": {"name":..., "color":...}}
        items = [(int(k), v) for k, v in table.items()]
    elif isinstance(table, Iterable):  # position == value unless an item says otherwise
        items = list(enumerate(table))
    else:
        raise InputError(f"Unrecognized label table: {type(table).__name__}.")
    rows = []
    for position, item in items:
        if isinstance(item, str):
            rows.append((position, item, None))
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            rows.append((int(item.get("value", position)), item["name"], item.get("color")))
        elif hasattr(item, "name") and hasattr(item, "color"):  # spec.ClassInfo
            rows.append((position, item.name, item.color))
        else:
            raise InputError(f"Label table entry {position} has no name: {item!r}.")
    return rows


def segments_from_label_table(table: Any) -> list[SegmentSpec]:
    """Segments to create, one per non-background label, from a label table in any shape the engine uses.

    Accepts a path to the ``labels.json`` the engine writes, its parsed ``{"labels": [...]}``, a spec's
    ``classes`` (ClassInfo or dicts; position == value) or a ``{value: name}`` mapping.
    """
    from ..core.spec import DEFAULT_COLORS

    segments = []
    for value, name, color in _label_rows(table):
        if value == 0 or normalize_name(name) == "background":
            continue
        color = color if color is not None else DEFAULT_COLORS[value % len(DEFAULT_COLORS)]
        segments.append(SegmentSpec(value, name, _color01(color), terminology_for(name)))
    values = [s.value for s in segments]
    if len(set(values)) != len(values):
        raise InputError(f"The label table repeats label values: {sorted(values)}.")
    if not segments:
        raise InputError("The label table lists no foreground classes.")
    return sorted(segments, key=lambda s: s.value)


def reference_label_array(masks_by_name: Mapping[str, np.ndarray],
                          class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """A label array (class position = value) from reference segments matched to classes by name.

    Returns (uint16 KJI array, names of the classes that found a reference segment).
    """
    by_key = {normalize_name(k): v for k, v in masks_by_name.items()}
    shapes = {np.shape(m) for m in masks_by_name.values()}
    if len(shapes) != 1:
        raise InputError("The reference segments do not share one grid; export them on the input volume.")
    labels = np.zeros(shapes.pop(), dtype=np.uint16)
    matched = []
    for value, name in enumerate(class_names):
        mask = by_key.get(normalize_name(name)) if value > 0 else None
        if mask is not None:
            labels[np.asarray(mask) > 0] = value
            matched.append(name)
    if not matched:
        raise InputError(f"No reference segment is named like a model class ({', '.join(class_names[1:])}).")
    return labels, matched


# ---------------------------------------------------------------- results table

_RESULT_ROWS = (  # key, label, format
    ("estimate", "Expected", "{}"),
    ("runtime", "Runtime", "{}"),
    ("precision", "Precision", "{}"),
    ("engine_size_mb", "Engine size", "{:.2f} MB"),
    ("build_seconds", "Engine build/load time", "{:.2f} s"),
    ("latency_ms", "Latency per patch", "{:.1f} ms"),
    ("seconds", "Total time", "{:.2f} s"),
    ("fp32_windows", "Windows from FP32", "{}"),
    ("agreement_dice", "Agreement Dice (vs FP32)", "{:.4f}"),
    ("agreement", "INT8-vs-FP32 agreement (held out)", "{:.4f}"),
    ("guard", "Accuracy guard", "{}"),
    ("reference_dice", "Dice vs reference", "{:.4f}"),
    ("fp32_mb", "FP32 ONNX size", "{:.2f} MB"),
    ("int8_mb", "INT8 ONNX size", "{:.2f} MB"),
    ("size_ratio", "INT8/FP32 size", "{:.3f}"),
    ("placement", "Q/DQ placement", "{}"),
    ("qdq_ok", "TensorRT Q/DQ rules", "{}"),
)


def results_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for the module's results table from a CLI ``--json`` result (quantize or segment)."""
    rows = []
    fallback = result.get("int8_fallback")  # quantize --on-miss fp32 kept no INT8
    for key, label, fmt in _RESULT_ROWS:
        value = result.get(key)
        if value is None or (fallback and key in ("int8_mb", "size_ratio")):
            continue
        placement = result.get("placement") or {}
        if key == "placement":
            value = placement.get("auto", "").removeprefix("Q/DQ placement: ") or \
                f"{value.get('placement')} ({value.get('activations')})"
        elif key == "qdq_ok":
            value = "pass" if value else ("not met: u8 activations are for ONNX Runtime"
                                          if placement.get("activations") == "u8" else "FAIL (see quantization.json)")
        elif key == "guard":
            value = _guard_row(value)
        elif key == "fp32_windows":  # nnU-Net --fp32-windows
            value = f"{value.get('windows')} of {value.get('of')} (where INT8 was least sure)"
        elif key == "estimate":  # nnU-Net: said before the run (e.g. "Expected: 5 parts, 320 windows, ...")
            value = str(value.get("text", "")).removeprefix("Expected: ")
        elif key == "runtime" and result.get("runtime_reason"):
            value = f"{value} ({result['runtime_reason']})"
        rows.append((label, fmt.format(value)))
    if fallback:
        rows.append(("INT8", "not kept (it missed the accuracy target): this model runs in FP32"))
    return rows


def _guard_row(guard: Mapping[str, Any]) -> str:
    """What the accuracy guard measured on and decided, in one line."""
    where = f"on {guard.get('runtime')} ({guard.get('isa')})"
    if not guard.get("enforced"):
        return f"off: measured {where}, not enforced"
    kept = guard.get("kept") or []
    if guard.get("met") is False:
        return (f"target {guard.get('threshold'):.3f} missed {where}: agreement {guard.get('agreement'):.4f} with "
                f"{len(kept)} layer(s) kept in FP32")
    return (f"target {guard.get('threshold'):.3f} met {where}; "
            + (f"{len(kept)} layer(s) kept in FP32" if kept else "no layer kept in FP32"))
