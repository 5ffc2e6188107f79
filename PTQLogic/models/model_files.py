"""Recognize what the user picked as a model and describe it in one line (no Slicer imports).

Never executes model code: specs are parsed as data, ONNX graphs are read without weights,
TorchScript/state_dict archives are only listed (zip directory); folders that a registered model
source reads (MONAI bundles, nnU-Net results folders: :data:`PTQLogic.models.sources.SOURCES`) are described
by that source's ``describe`` (configs read as data, no weights loaded).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError, PTQError

KINDS = ("spec", "model_dir", "onnx", "torchscript", "state_dict", "monai_bundle", "nnunet")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # one of KINDS
    description: str  # one line for the UI: architecture, classes, patch size, or what is missing
    path: str
    spec_path: str | None = None  # what to pass to `quantize --model`: a spec (or one found next to a file), a source folder
    quantizable: bool = False  # can `quantize` run on it as is
    segmentable: bool = False  # is it already a quantized model folder


def _describe_spec(path: Path) -> str:
    from ..core.spec import load_spec

    spec = load_spec(path)
    names = ", ".join(spec.class_names[1:])
    patch = "x".join(str(v) for v in spec.patch_size)
    return f"{spec.architecture} '{spec.name}', {spec.num_classes - 1} classes ({names}), patch {patch}"


def _sibling_spec(path: Path) -> Path | None:
    for suffix in (".json", ".yaml", ".yml"):
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _onnx_shapes(path: Path) -> str:
    try:
        import onnx
    except ImportError:
        return "ONNX model (install dependencies to inspect it)"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # any parse failure is a user-facing error
        raise InputError(f"'{path}' is not a readable ONNX model: {exc}") from None

    def shape(value) -> str:
        dims = value.type.tensor_type.shape.dim
        return "x".join(d.dim_param or str(d.dim_value) for d in dims)

    inputs = ", ".join(shape(v) for v in model.graph.input[:1])
    outputs = ", ".join(shape(v) for v in model.graph.output[:1])
    return f"ONNX model, input {inputs}, output {outputs}"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _nnunet_folder(path: Path) -> ModelSource | None:
    from .nnunet.model_dir import is_nnunet_model_dir
    from .sources.nnunet import NnUNetSource

    if is_nnunet_model_dir(path) and (path / "spec.json").is_file():
        return ModelSource("model_dir", "Quantized nnU-Net model folder: " + _describe_spec(path / "spec.json"),
                           str(path), str(path / "spec.json"), quantizable=False, segmentable=True)
    if NnUNetSource().can_open(path):
        try:
            # spec_path is what `quantize --model` takes: for nnU-Net the folder itself
            return ModelSource("nnunet", NnUNetSource().describe(path), str(path), str(path), quantizable=True)
        except PTQError as exc:  # say what is wrong in the UI instead of failing the whole dialog
            return ModelSource("nnunet", f"nnU-Net results folder that cannot be used: {exc}", str(path))


def _describe_with_source(path: Path) -> ModelSource | None:
    """A folder a registered source claims: its one-line description, or what is wrong with it (not quantizable)."""
    from .sources import SOURCES

    for source in SOURCES:
        if source.can_open(path):
            try:
                description = source.describe(path)
            except PTQError as exc:
                return ModelSource(source.kind, str(exc), str(path))
            return ModelSource(source.kind, description, str(path), str(path), quantizable=True)
    return None


def _folder(path: Path) -> ModelSource:
    nnunet = _nnunet_folder(path)
    if nnunet is not None:
        return nnunet
    if (path / "spec.json").is_file() and ((path / "fp32.onnx").is_file() or (path / "int8.onnx").is_file()):
        return ModelSource("model_dir", "Quantized model folder: " + _describe_spec(path / "spec.json"),
                           str(path), str(path / "spec.json"), quantizable=False, segmentable=True)
    described = _describe_with_source(path)
    if described is not None:
        return described
    if (path / "dataset.json").is_file() and (path / "plans.json").is_file() and any(path.glob("fold_*")):
        labels = _json(path / "dataset.json").get("labels", {})
        folds = sorted(p.name for p in path.glob("fold_*"))
        names = ", ".join(k for k in labels if str(k).lower() != "background")
        return ModelSource("nnunet", f"nnU-Net results ({len(folds)} folds; classes: {names or 'unknown'}): "
                           "not yet supported for quantization.", str(path))
    raise InputError(f"'{path}' is not a model folder: expected a quantized model folder (spec.json + int8.onnx), "
                     "a MONAI bundle (configs/ + models/) or an nnU-Net results folder (dataset.json + plans.json + "
                     "fold_*)." + nested_results_hint(path))


def nested_results_hint(path: Path, limit: int = 6) -> str:
    """Where ``path`` holds nnU-Net results folders one or two levels down (a Dataset folder, or TotalSegmentator's
    results folder of several), a sentence naming them; else ''."""
    from .nnunet.folder import is_nnunet_folder

    found: list[Path] = []
    try:
        for child in sorted(path.iterdir()):
            if is_nnunet_folder(child):
                found.append(child)
            elif child.is_dir():
                found.extend(sorted(g for g in child.iterdir() if is_nnunet_folder(g)))
    except OSError:  # unreadable: the message above stands
        return ""
    if not found:
        return ""
    names = ", ".join(f"'{f}'" for f in found[:limit])
    if len(found) > limit:
        names += f" and {len(found) - limit} more"
    what = "that folder" if len(found) == 1 else "one of them (or, to segment, repeat --model for each part)"
    return f" It holds nnU-Net results folder(s) {names}: give {what}."


def choose_model_source(path: str | Path) -> ModelSource:
    """Detect what ``path`` is (by extension and folder content) and describe it for the UI."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise InputError(f"Model '{path}' does not exist; choose a model spec, ONNX/TorchScript file or folder.")
    if path.is_dir():
        return _folder(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".yaml", ".yml"):
        try:
            return ModelSource("spec", _describe_spec(path), str(path), str(path), quantizable=True)
        except PTQError as exc:
            raise InputError(f"'{path.name}' is not a usable model spec: {exc}") from None
    spec = _sibling_spec(path)
    spec_note = f"; spec {spec.name}: {_describe_spec(spec)}" if spec else \
        "; add a model spec (.json with classes, patch size, preprocessing) next to it to quantize it"
    if suffix == ".onnx":
        return ModelSource("onnx", _onnx_shapes(path) + spec_note, str(path), str(spec) if spec else None,
                           quantizable=spec is not None)
    if suffix in (".pt", ".pth", ".ts", ".zip"):
        if not zipfile.is_zipfile(path):
            raise InputError(f"'{path.name}' is not a PyTorch archive (legacy pickles are not loaded for safety).")
        with zipfile.ZipFile(path) as archive:
            scripted = any("/code/" in name for name in archive.namelist())
        kind = "torchscript" if scripted else "state_dict"
        what = "TorchScript model" if scripted else "PyTorch weights (state_dict)"
        return ModelSource(kind, what + spec_note, str(path), str(spec) if spec else None,
                           quantizable=spec is not None)
    raise InputError(f"'{path.name}': unknown model type; use a model spec (.json/.yaml), .onnx, a TorchScript/"
                     "weights file (.pt/.pth/.ts), a MONAI bundle folder or an nnU-Net results folder.")


def sample_models(data_dir: str | Path) -> list[Path]:
    """The shipped sample model specs in ``data_dir`` (``PTQLogic/samples/data``): specs with their weights beside them,
    not the other JSON files there (``training_summary.json``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    return [p for p in sorted(data_dir.glob("*.json")) if (p.with_suffix(".pt")).is_file()]
