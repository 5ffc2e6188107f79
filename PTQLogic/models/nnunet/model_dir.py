"""A quantized nnU-Net model folder or an original results folder, opened as one :class:`NnUNetModel`.

The quantized folder's layout is in :mod:`PTQLogic.quantization.nnunet`, which writes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ...core.errors import ModelError
from ...core.spec import ModelSpec, load_spec
from .folder import DATASET_JSON, MODEL_DIR_MARKER, PLANS_JSON, class_names, resolve_configuration, validate_plans

__all__ = ["FORMAT_VERSION", "MODEL_DIR_MARKER", "NnUNetModel", "is_nnunet_model_dir", "open_nnunet_model"]
FORMAT_VERSION = 1


def is_nnunet_model_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_DIR_MARKER).is_file()


@dataclass
class NnUNetModel:
    """An nnU-Net model ready to run: a quantized model folder or an original results folder."""

    root: Path
    spec: ModelSpec
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: str
    folds: list[str]
    mirror_axes: list[int] | None
    step_size: float
    quantized: bool
    networks: list[Any] | None = None  # original folders: the PyTorch networks (torch runtime only)

    def fold_dir(self, fold: str) -> Path:
        return self.root / f"fold_{fold}"

    def architecture(self) -> dict[str, Any]:
        return resolve_configuration(self.plans, self.configuration)["architecture"]

    def describe(self) -> str:
        names = self.spec.class_names[1:]
        kind = "quantized nnU-Net model" if self.quantized else "nnU-Net results folder"
        return f"{kind} '{self.spec.name}', {len(names)} classes, folds {', '.join(self.folds)}"


def open_nnunet_model(path: str | Path, folds: Sequence[str] | None = None,
                      checkpoint: str = "checkpoint_final.pth") -> NnUNetModel:
    """A quantized nnU-Net model folder, or an original results folder (loaded for the torch runtime)."""
    from ..sources.nnunet import NnUNetSource

    root = Path(path)
    if is_nnunet_model_dir(root):
        try:
            meta = json.loads((root / MODEL_DIR_MARKER).read_text(encoding="utf-8"))
            plans = json.loads((root / PLANS_JSON).read_text(encoding="utf-8"))
            dataset = json.loads((root / DATASET_JSON).read_text(encoding="utf-8"))
            configuration, saved_folds = meta["configuration"], [str(f) for f in meta["folds"]]
        except KeyError as exc:
            raise ModelError(f"Quantized nnU-Net model folder '{root}' is damaged ({MODEL_DIR_MARKER} lacks {exc}); "
                             "quantize it again.") from None
        except (OSError, ValueError, TypeError) as exc:
            raise ModelError(f"Quantized nnU-Net model folder '{root}' is damaged ({exc}); "
                             "quantize it again.") from None
        class_names(dataset)
        validate_plans(plans, configuration, dataset)
        chosen = [str(f) for f in folds] if folds else saved_folds
        unknown = [f for f in chosen if f not in saved_folds]
        if unknown:
            raise ModelError(f"Quantized nnU-Net model '{root}' has no fold(s) {unknown} (it has {saved_folds}).")
        lost = [f"fold_{f}/fp32.onnx" for f in chosen if not (root / f"fold_{f}" / "fp32.onnx").is_file()]
        if lost:
            raise ModelError(f"Quantized nnU-Net model folder '{root}' is incomplete: {', '.join(lost)} is missing; "
                             "copy the whole folder again, or quantize the original nnU-Net folder again.")
        return NnUNetModel(root, load_spec(root / "spec.json"), plans, dataset, configuration, chosen,
                           meta.get("mirror_axes"), float(meta.get("step_size", 0.5)), quantized=True)
    loaded = NnUNetSource().load(root, folds=list(folds) if folds else None, checkpoint=checkpoint)
    details = loaded.details
    return NnUNetModel(root, loaded.spec, details["plans"], details["dataset"], details["configuration"],
                       details["folds"], details["mirror_axes"], 0.5, quantized=False, networks=loaded.networks)
