"""Quantize an nnU-Net results folder into a quantized nnU-Net model folder.

Layout (``ptqseg quantize`` output for an nnU-Net source)::

    nnunet_model.json      marker + what segment needs: configuration, folds, mirror axes, step size
    spec.json              classes, patch size, channels (for the UI and label tables)
    dataset.json plans.json  copies of the originals (preprocessing is read from them)
    fold_<k>/fp32.onnx     verified against PyTorch
    fold_<k>/int8.onnx     ModelOpt Q/DQ, calibrated on nnU-Net-preprocessed patches
    fold_<k>/weights.pt    the fold's state_dict (the "torch" runtime)
    quantization.json      per-fold quantization reports
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.fileio import publish_dir, staging_dir
from ..core.progress import Monitor
from .interface import DEFAULT_GUARD, DEFAULT_METHOD, Calibration, GuardTarget, QuantizeOptions
from ..models.model_folder import check_out_dir
from ..models.nnunet.folder import DATASET_JSON, PLANS_JSON, is_nnunet_folder
from ..models.nnunet.model_dir import (FORMAT_VERSION, MODEL_DIR_MARKER, NnUNetModel, is_nnunet_model_dir,
                                       open_nnunet_model)
from .result import QuantizeResult


def calibration_patches(model: NnUNetModel, volumes: Sequence[Any], num_patches: int, seed: int,
                        monitor: Monitor) -> np.ndarray:
    """Patches of nnU-Net-preprocessed calibration volumes (the same sampler as spec models)."""
    from ..inference.nnunet.predict import runner_for
    from .calibration import CT_BODY_HU, OTHER_BODY_PERCENTILE, CalibrationSettings, patches_from_volume

    settings = CalibrationSettings(num_patches=num_patches, seed=seed)
    runner = runner_for(model)
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
        per_volume[index] = patches_from_volume(data, mask, model.spec.patch_size, count, settings, rng, on_patch)
    ordered = [per_volume[n % len(volumes)][n // len(volumes)] for n in range(num_patches)]
    return np.stack(ordered).astype(np.float32, copy=False)


def _check_out_dir(out_dir: str | Path, inputs: Sequence[str | Path]) -> Path:
    out = Path(out_dir).resolve()
    if out.is_dir() and is_nnunet_model_dir(out):  # an earlier quantized nnU-Net model may be replaced
        for item in inputs:
            item = Path(item).resolve()
            if item == out or out in item.parents:
                raise InputError(f"Input '{item}' lies inside the output folder '{out}', which would be replaced.")
        return out
    return check_out_dir(out, inputs)


def quantize_nnunet(model: str | Path, calibration, out_dir: str | Path, *, num_patches: int = 32, seed: int = 0,
                    method: str = DEFAULT_METHOD, exclude_nodes: Sequence[str] = (), folds: Sequence[str] | None = None,
                    checkpoint: str = "checkpoint_final.pth", monitor: Monitor | None = None,
                    target_cpu: str = "auto", guard: GuardTarget | None = DEFAULT_GUARD):
    """nnU-Net results folder + unlabeled volumes -> model folder with per-fold FP32 and INT8 ONNX; each fold's
    INT8 goes through the accuracy guard (``guard=None``: its agreement is measured and recorded only)."""
    import torch

    from ..models.onnx_export import export_onnx
    from .calibration import CalibrationSettings, load_calibration_volumes, validate_settings
    from .guard import guarded_quantize, held_out_split
    from .quantize import QuantizeSettings

    monitor = monitor or Monitor()
    started = time.perf_counter()
    if method not in ("max", "entropy"):
        raise InputError(f"Calibration method must be 'max' or 'entropy', got '{method}'.")
    validate_settings(CalibrationSettings(num_patches=num_patches, seed=seed))
    if guard is not None:
        guard.validate()
    calibration_paths = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    out_dir = _check_out_dir(out_dir, [model, *calibration_paths])
    volumes = load_calibration_volumes(calibration)
    source = open_nnunet_model(model, folds, checkpoint)
    if source.quantized:
        raise InputError(f"'{model}' is already a quantized model folder; quantize the original nnU-Net folder.")
    staging = staging_dir(out_dir)
    try:
        calib_volumes, held_volumes, held_count, note = held_out_split(volumes, num_patches)
        patches = calibration_patches(source, calib_volumes, num_patches, seed, monitor)
        held_out = calibration_patches(source, held_volumes, held_count, seed + 1, monitor)
        for name in (DATASET_JSON, PLANS_JSON):
            shutil.copyfile(source.root / name, staging / name)
        source.spec.save(staging / "spec.json")
        reports: dict[str, Any] = {}
        settings = QuantizeSettings(method=method, exclude_nodes=tuple(exclude_nodes), target_cpu=target_cpu)
        for fold, network in zip(source.folds, source.networks):
            folder = staging / f"fold_{fold}"
            folder.mkdir()
            torch.save(network.state_dict(), folder / "weights.pt")
            exported = export_onnx(network, source.spec, folder / "fp32.onnx", monitor=monitor)
            report, checked = guarded_quantize(folder / "fp32.onnx", patches, held_out, folder / "int8.onnx", settings,
                                               guard, source.spec.num_classes, note, monitor)
            reports[fold] = {"export": {"max_abs_error": exported.max_abs_error, "opset": exported.opset},
                             **report.to_dict(), "guard": checked.to_dict(), "path": f"fold_{fold}/int8.onnx"}
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


class NnUNetQuantizer:
    """nnU-Net v2 results folders: nnU-Net's preprocessing for calibration, one ONNX pair per fold."""

    def can_open(self, model: str | Path) -> bool:
        return is_nnunet_folder(model)

    def quantize(self, model: str | Path, calibration: Calibration, out_dir: str | Path, options: QuantizeOptions,
                 monitor: Monitor) -> QuantizeResult:
        from .presets import resolve_placement

        placement, activations, subpixel, why = resolve_placement(**options.requested_placement(), nnunet=True)
        if placement != "modelopt" or subpixel or activations != "s8":
            raise InputError("nnU-Net folders are quantized with ModelOpt's Q/DQ placement only; drop --placement, "
                             "--activations and --subpixel.")
        result = quantize_nnunet(model, calibration, out_dir, num_patches=options.num_patches, seed=options.seed,
                                 method=options.method, exclude_nodes=options.exclude_nodes, folds=options.folds,
                                 checkpoint=options.checkpoint, monitor=monitor, target_cpu=options.target_cpu,
                                 guard=options.guard)
        return replace(result, placement={"placement": placement, "activations": activations, "subpixel": subpixel,
                                          "auto": why})
