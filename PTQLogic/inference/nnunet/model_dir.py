"""Quantize an nnU-Net results folder into a model folder, and open either kind for segmentation.

Model folder layout (``ptqseg quantize`` output for an nnU-Net source)::

    nnunet_model.json      marker + what segment needs: configuration, folds, mirror axes, step size
    spec.json              classes, patch size, channels (for the UI and label tables)
    dataset.json plans.json  copies of the originals (preprocessing is read from them)
    fold_<k>/fp32.onnx     verified against PyTorch
    fold_<k>/int8.onnx     ModelOpt Q/DQ, calibrated on nnU-Net-preprocessed patches
    fold_<k>/weights.pt    the fold's state_dict (the "torch" runtime)
    quantization.json      per-fold quantization reports
    engines/fold_<k>/      engine caches
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...core.errors import InputError, ModelError
from ...core.fileio import staging_dir
from ...pipeline import QuantizeResult
from ...core.progress import Monitor
from ...models.sources.nnunet import MODEL_DIR_MARKER
from ...core.spec import ModelSpec, load_spec
from ...models.nnunet.folder import DATASET_JSON, PLANS_JSON

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

    def runner(self):
        from .predict import NnUNetRunner

        return NnUNetRunner(self.plans, self.dataset, self.configuration, self.mirror_axes, self.step_size)

    def fold_dir(self, fold: str) -> Path:
        return self.root / f"fold_{fold}"

    def describe(self) -> str:
        names = self.spec.class_names[1:]
        kind = "quantized nnU-Net model" if self.quantized else "nnU-Net results folder"
        return f"{kind} '{self.spec.name}', {len(names)} classes, folds {', '.join(self.folds)}"


def open_nnunet_model(path: str | Path, folds: Sequence[str] | None = None,
                      checkpoint: str = "checkpoint_final.pth") -> NnUNetModel:
    """A quantized nnU-Net model folder, or an original results folder (loaded for the torch runtime)."""
    from ...models.sources.nnunet import NnUNetSource
    from ...models.nnunet.folder import class_names, validate_plans

    root = Path(path)
    if is_nnunet_model_dir(root):
        try:
            meta = json.loads((root / MODEL_DIR_MARKER).read_text(encoding="utf-8"))
            plans = json.loads((root / PLANS_JSON).read_text(encoding="utf-8"))
            dataset = json.loads((root / DATASET_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"Quantized nnU-Net model folder '{root}' is damaged ({exc}); quantize it again.") from None
        class_names(dataset)
        validate_plans(plans, meta["configuration"], dataset)
        chosen = [str(f) for f in folds] if folds else list(meta["folds"])
        missing = [f for f in chosen if f not in meta["folds"] or not (root / f"fold_{f}" / "fp32.onnx").is_file()]
        if missing:
            raise ModelError(f"Quantized nnU-Net model '{root}' has no fold(s) {missing} (it has {meta['folds']}).")
        return NnUNetModel(root, load_spec(root / "spec.json"), plans, dataset, meta["configuration"], chosen,
                           meta.get("mirror_axes"), float(meta.get("step_size", 0.5)), quantized=True)
    loaded = NnUNetSource().load(root, folds=list(folds) if folds else None, checkpoint=checkpoint)
    details = loaded.details
    return NnUNetModel(root, loaded.spec, details["plans"], details["dataset"], details["configuration"],
                       details["folds"], details["mirror_axes"], 0.5, quantized=False, networks=loaded.networks)


def open_engines(model: NnUNetModel, runtime: str, precision: str, *, device: str | None = None,
                 monitor: Monitor | None = None) -> tuple[list[Any], str]:
    """One engine per fold (same runtime and precision for all)."""
    from ...engines import choose_runtime, create_engine
    from ...engines.torch_engine import TorchEngine
    from ...models.nnunet.network import build_network, load_weights

    reason = ""
    if not model.quantized:
        if runtime not in ("auto", "torch") or precision != "fp32":
            raise InputError(f"'{model.root}' is an original nnU-Net folder: it runs only with --runtime torch "
                             "--precision fp32. Quantize it first (ptqseg quantize --model FOLDER ...) for other runtimes.")
        return [TorchEngine(net, "fp32", device=device or "cpu") for net in model.networks], \
            "PyTorch FP32: the original nnU-Net weights"
    if runtime == "auto":
        runtime, reason = choose_runtime(precision)
    engines = []
    for fold in model.folds:
        folder = model.fold_dir(fold)
        torch_model = None
        if runtime == "torch":
            import torch

            torch_model = build_network(_architecture(model), model.spec.in_channels, model.spec.num_classes)
            state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
            load_weights(torch_model, state, str(folder / "weights.pt"))
        engines.append(create_engine(
            runtime, precision, fp32_onnx=folder / "fp32.onnx",
            int8_onnx=(folder / "int8.onnx") if (folder / "int8.onnx").is_file() else None,
            torch_model=torch_model, weights_path=(folder / "weights.pt") if runtime == "torch" else None,
            cache_dir=model.root / "engines" / f"fold_{fold}", device=device, monitor=monitor or Monitor()))
    return engines, reason


def _architecture(model: NnUNetModel) -> dict[str, Any]:
    from ...models.nnunet.folder import resolve_configuration

    return resolve_configuration(model.plans, model.configuration)["architecture"]


def calibration_patches(model: NnUNetModel, volumes: Sequence[Any], num_patches: int, seed: int,
                        monitor: Monitor) -> np.ndarray:
    """Patches of nnU-Net-preprocessed calibration volumes (the same sampler as spec models)."""
    from ...quantization.calibration import CT_BODY_HU, OTHER_BODY_PERCENTILE, CalibrationSettings, _patches_from_volume

    settings = CalibrationSettings(num_patches=num_patches, seed=seed)
    runner = model.runner()
    scheme = runner.config.normalization_schemes[0]
    stats = model.plans["foreground_intensity_properties_per_channel"].get("0", {})
    counts = [len(range(v, num_patches, len(volumes))) for v in range(len(volumes))]
    per_volume: list[list[np.ndarray]] = [[] for _ in volumes]
    done = 0

    def on_patch() -> None:
        nonlocal done
        done += 1
        monitor.update("calibration patches", done, num_patches)

    for index, (volume, count) in enumerate(zip(volumes, counts)):
        if count == 0:
            continue
        data, _ = runner.preprocess(volume)
        if scheme == "CTNormalization":
            mask = data[0] > (CT_BODY_HU - stats["mean"]) / max(stats["std"], 1e-8)
        else:
            mask = data[0] > np.percentile(data[0], OTHER_BODY_PERCENTILE)
        mask = mask if mask.any() else np.ones_like(mask, dtype=bool)
        rng = np.random.default_rng([seed, index])
        per_volume[index] = _patches_from_volume(data, mask, model.spec.patch_size, count, settings, rng, on_patch)
    ordered = [per_volume[n % len(volumes)][n // len(volumes)] for n in range(num_patches)]
    return np.stack(ordered).astype(np.float32, copy=False)


def _check_out_dir(out_dir: str | Path, inputs: Sequence[str | Path]) -> Path:
    from ...pipeline import check_out_dir

    out = Path(out_dir).resolve()
    if out.is_dir() and is_nnunet_model_dir(out):  # an earlier quantized nnU-Net model may be replaced
        for item in inputs:
            item = Path(item).resolve()
            if item == out or out in item.parents:
                raise InputError(f"Input '{item}' lies inside the output folder '{out}', which would be replaced.")
        return out
    return check_out_dir(out, inputs)


def quantize_nnunet(model: str | Path, calibration, out_dir: str | Path, *, num_patches: int = 32, seed: int = 0,
                    method: str = "max", exclude_nodes: Sequence[str] = (), folds: Sequence[str] | None = None,
                    checkpoint: str = "checkpoint_final.pth", monitor: Monitor | None = None):
    """nnU-Net results folder + unlabeled volumes -> model folder with per-fold FP32 and INT8 ONNX."""
    import torch

    from ...quantization.calibration import CalibrationSettings, load_calibration_volumes, validate_settings
    from ...models.onnx_export import export_onnx
    from ...core.fileio import publish_dir
    from ...quantization.quantize import QuantizeSettings, quantize_onnx

    monitor = monitor or Monitor()
    started = time.perf_counter()
    if method not in ("max", "entropy"):
        raise InputError(f"Calibration method must be 'max' or 'entropy', got '{method}'.")
    validate_settings(CalibrationSettings(num_patches=num_patches, seed=seed))
    calibration_paths = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    out_dir = _check_out_dir(out_dir, [model, *calibration_paths])
    volumes = load_calibration_volumes(calibration)
    source = open_nnunet_model(model, folds, checkpoint)
    if source.quantized:
        raise InputError(f"'{model}' is already a quantized model folder; quantize the original nnU-Net folder.")
    staging = staging_dir(out_dir)
    try:
        patches = calibration_patches(source, volumes, num_patches, seed, monitor)
        for name in (DATASET_JSON, PLANS_JSON):
            shutil.copyfile(source.root / name, staging / name)
        source.spec.save(staging / "spec.json")
        reports: dict[str, Any] = {}
        settings = QuantizeSettings(method=method, exclude_nodes=tuple(exclude_nodes))
        for fold, network in zip(source.folds, source.networks):
            folder = staging / f"fold_{fold}"
            folder.mkdir()
            torch.save(network.state_dict(), folder / "weights.pt")
            exported = export_onnx(network, source.spec, folder / "fp32.onnx", monitor=monitor)
            report = quantize_onnx(folder / "fp32.onnx", patches, folder / "int8.onnx", settings, monitor)
            reports[fold] = {"export": {"max_abs_error": exported.max_abs_error, "opset": exported.opset},
                             **report.to_dict(), "path": f"fold_{fold}/int8.onnx"}
        meta = {"format": FORMAT_VERSION, "source": "nnunet", "configuration": source.configuration,
                "folds": source.folds, "mirror_axes": source.mirror_axes, "step_size": source.step_size,
                "checkpoint": checkpoint, "original": str(source.root.resolve())}
        (staging / MODEL_DIR_MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        fp32 = sum((staging / f"fold_{f}" / "fp32.onnx").stat().st_size for f in source.folds)
        int8 = sum((staging / f"fold_{f}" / "int8.onnx").stat().st_size for f in source.folds)
        summary = {"model": source.spec.name, "source": "nnunet", "folds": reports,
                   "calibration": {"volumes": len(volumes), "patches": num_patches, "seed": seed, "method": method},
                   "qdq": {"ok": all(r.get("qdq", {}).get("ok") for r in reports.values())}}
        (staging / "quantization.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        monitor.check()
        publish_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return NnUNetQuantizeResult(model_dir=out_dir, fp32_bytes=fp32, int8_bytes=int8,
                                seconds=time.perf_counter() - started, report=summary)


class NnUNetQuantizeResult(QuantizeResult):
    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        folds = self.report.get("folds", {})
        data["fp32_onnx"] = [str(self.model_dir / f"fold_{f}" / "fp32.onnx") for f in folds]
        data["int8_onnx"] = [str(self.model_dir / f"fold_{f}" / "int8.onnx") for f in folds]
        data["source"] = "nnunet"
        return data
