"""The model folder ``quantize`` writes (spec + weights, FP32 ONNX, INT8 Q/DQ ONNX, quantization report),
and how a model given on the command line becomes a :class:`~PTQLogic.core.spec.ModelSpec`."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import InputError, ModelError
from ..core.fileio import check_writable_dir
from ..core.spec import ModelSpec, load_spec

SPEC_NAME = "spec.json"
FP32_NAME = "fp32.onnx"
INT8_NAME = "int8.onnx"
REPORT_NAME = "quantization.json"


@dataclass(frozen=True)
class ModelDir:
    """A folder produced by :func:`quantize_model`."""

    root: Path

    @property
    def spec_path(self) -> Path:
        return self.root / SPEC_NAME

    @property
    def fp32_onnx(self) -> Path:
        return self.root / FP32_NAME

    @property
    def int8_onnx(self) -> Path:
        return self.root / INT8_NAME

    @property
    def report_path(self) -> Path:
        return self.root / REPORT_NAME

    def spec(self) -> ModelSpec:
        return load_spec(self.spec_path)

    def report(self) -> dict[str, Any]:
        return json.loads(self.report_path.read_text(encoding="utf-8")) if self.report_path.is_file() else {}


def _readable(path: Path) -> bool:
    import os

    needed = os.R_OK | (os.X_OK if path.is_dir() else 0)  # a folder: list and enter it
    return os.access(path, needed, effective_ids=os.access in os.supports_effective_ids)


def check_model_path(path: str | Path) -> None:
    """A --model that does not exist or cannot be read fails with that, not with what a model folder needs."""
    import os

    root = Path(path)
    try:
        exists = root.exists()
    except PermissionError:  # a folder above it cannot be entered
        exists, root = True, next((p for p in reversed(root.parents) if not os.access(p, os.X_OK)), root)
    if not exists:
        raise InputError(f"Model '{path}' does not exist; give a model folder from `ptqseg quantize`, a model spec "
                         "(.json/.yaml), a MONAI bundle or an nnU-Net results folder.")
    unreadable = root if not _readable(root) else next(
        (child for child in (root.iterdir() if root.is_dir() else ()) if not _readable(child)), None)
    if unreadable is not None:
        raise InputError(f"Cannot read model '{unreadable}': permission denied; give this user read access to it "
                         f"(e.g. chmod -R u+rX '{root}').")


def is_unquantized_model(path: str | Path) -> bool:
    """A model `quantize` takes that is not a quantized model folder: a spec, a model file with a spec beside
    it, a MONAI bundle (it can run in FP32 as it is)."""
    from .model_files import choose_model_source

    root = Path(path)
    if root.is_dir() and ((root / SPEC_NAME).is_file() or not any(root.iterdir())):
        return False
    try:
        source = choose_model_source(root)
    except InputError:
        if root.is_dir():
            return False  # open_model_dir says what a model folder needs
        raise
    return source.quantizable and source.kind in ("spec", "onnx", "torchscript", "state_dict", "monai_bundle")


def open_model_dir(path: str | Path) -> ModelDir:
    check_model_path(path)
    root = Path(path)
    if (root / "nnunet_model.json").is_file():
        raise InputError(f"'{path}' is a quantized nnU-Net model folder (one ONNX per fold); this command does not take "
                         "it yet: use `ptqseg segment --model FOLDER --compare` (sizes, latency, FP32-vs-INT8 agreement).")
    if not (root / SPEC_NAME).is_file() or not (root / FP32_NAME).is_file():
        from .model_files import nested_results_hint

        raise InputError(
            f"'{path}' is not a quantized model folder (it needs {SPEC_NAME} and {FP32_NAME}); "
            "create one with `ptqseg quantize --model SPEC --calibration VOLUMES --out FOLDER`."
            + nested_results_hint(root)
        )
    return ModelDir(root)


def load_from_source(model: str | Path):
    """The :class:`~PTQLogic.models.sources.LoadedModel` of a folder a registered source reads (MONAI bundle, ...), else None."""
    from .sources import SOURCES

    path = Path(model)
    if path.is_dir() and not (path / SPEC_NAME).is_file():
        for source in SOURCES:
            if source.can_open(path):
                return source.load(path)
    return None


def load_model_spec(model: str | Path) -> ModelSpec:
    """A spec file, a model folder, a source folder (bundle, ...), or a model file with a spec beside it."""
    from .model_files import choose_model_source

    path = Path(model)
    if path.is_dir() and (path / SPEC_NAME).is_file():
        return load_spec(path / SPEC_NAME)
    loaded = load_from_source(path)
    if loaded is not None:
        return loaded.spec
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return load_spec(path)
    source = choose_model_source(path)
    if source.spec_path is None:
        raise ModelError(f"'{path}' needs a model spec: {source.description}.")
    spec = load_spec(source.spec_path)
    if spec.weights is None:  # the spec describes the file it sits next to
        fmt = "state_dict" if source.kind == "state_dict" else source.kind
        spec = replace(spec, weights=str(path.resolve()), weights_format=fmt)
    return spec


def check_out_dir(out_dir: str | Path, inputs: Sequence[str | Path]) -> Path:
    """The folder ``quantize`` may (re)place: new, empty, or an earlier model folder holding no input."""
    out_dir = Path(out_dir).resolve()
    if out_dir.parent == out_dir:
        raise InputError(f"'{out_dir}' cannot be a model folder; choose a new folder such as ./my-model-int8.")
    check_writable_dir(out_dir.parent, "quantized model folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"Output '{out_dir}' is a file; give a folder for the quantized model.")
        is_model_dir = (out_dir / SPEC_NAME).is_file() and (out_dir / FP32_NAME).is_file()
        if any(out_dir.iterdir()) and not is_model_dir:
            raise InputError(
                f"Output folder '{out_dir}' already holds other files; choose a new or empty folder "
                "(only an earlier quantized model folder is replaced)."
            )
        for item in inputs:
            item = Path(item).resolve()
            if item == out_dir or out_dir in item.parents:
                raise InputError(f"Input '{item}' lies inside the output folder '{out_dir}', which would be replaced.")
    return out_dir
