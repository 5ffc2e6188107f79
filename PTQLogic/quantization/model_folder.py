"""Quantize a spec model (MONAI network + weights, TorchScript, ONNX, or a MONAI bundle) into a model folder:
spec + weights, verified FP32 ONNX, calibrated INT8 Q/DQ ONNX and ``quantization.json``."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..core.errors import InputError, ModelError
from ..core.fileio import publish_dir, staging_dir
from ..core.progress import Monitor
from ..core.spec import ModelSpec
from ..models.model_folder import (FP32_NAME, INT8_NAME, REPORT_NAME, SPEC_NAME, check_out_dir, load_from_source,
                                   load_model_spec)
from .interface import Calibration, QuantizeOptions
from .result import QuantizeResult


@dataclass
class _Plan:
    """Everything checked before the long work: the model, its volumes, the settings and where it goes."""

    spec: ModelSpec
    torch_model: Any  # None for ONNX models
    volumes: list
    inputs: list[Path]
    out_dir: Path
    settings: Any  # QuantizeSettings
    calib_settings: Any  # CalibrationSettings
    chosen: dict[str, Any]  # the placement used, and why "auto" chose it

    @property
    def is_onnx(self) -> bool:
        return self.torch_model is None


class SpecQuantizer:
    """Any model that is not another kind's: a spec, a model file with a spec beside it, or a bundle."""

    def can_open(self, model: str | Path) -> bool:
        return True

    def quantize(self, model: str | Path, calibration: Calibration, out_dir: str | Path, options: QuantizeOptions,
                 monitor: Monitor) -> QuantizeResult:
        started = time.perf_counter()
        plan = _plan(model, calibration, out_dir, options)
        staging = staging_dir(plan.out_dir)
        try:
            export_info = _export(plan, staging, monitor)
            report, guard_info = _quantize(plan, staging, options, monitor)
            summary = _summary(plan, options, export_info, report, guard_info)
            (staging / REPORT_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
            monitor.check()
            publish_dir(staging, plan.out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return QuantizeResult(
            model_dir=plan.out_dir, fp32_bytes=(plan.out_dir / FP32_NAME).stat().st_size,
            int8_bytes=(plan.out_dir / INT8_NAME).stat().st_size, seconds=time.perf_counter() - started,
            report=summary, placement=plan.chosen)


def _plan(model: str | Path, calibration: Calibration, out_dir: str | Path, options: QuantizeOptions) -> _Plan:
    """Validate every input and setting before the long work (a wrong path fails before heavy imports)."""
    from .presets import resolve_placement

    loaded = load_from_source(model)  # a MONAI bundle (or another registered source), else a spec
    spec = loaded.spec if loaded is not None else load_model_spec(model)
    from ..models.torch_models import load_torch_model
    from .calibration import CalibrationSettings, calibration_inputs, load_calibration_volumes, validate_settings

    options.validate_method()
    if options.equalize:
        raise InputError("--equalize is for nnU-Net folders (their PlainConvUNet's blocks); leave it out for this "
                         "model.")
    if options.on_miss != "fail":
        raise InputError("--on-miss fp32 is for nnU-Net folders, whose parts must all run in a set; to run this model "
                         "in FP32, segment it without quantizing (ptqseg segment --model MODEL --precision fp32).")
    placement, activations, subpixel, why = resolve_placement(**options.requested_placement(),
                                                              architecture=spec.architecture)
    chosen = {"placement": placement, "activations": activations, "subpixel": subpixel, "auto": why}
    calib_settings = CalibrationSettings(num_patches=options.num_patches, seed=options.seed)
    validate_settings(calib_settings)
    settings = _settings(spec, options, placement, activations, subpixel)
    if options.guard is not None:
        options.guard.validate()
    calibration_paths = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    weights = [spec.weights_path()] if spec.weights_path() else []
    out = check_out_dir(out_dir, [model, *weights, *calibration_paths])
    inputs = calibration_inputs(calibration)
    volumes = load_calibration_volumes(inputs, spec)
    is_onnx = "onnx" in (spec.architecture, spec.weights_format)
    if is_onnx and spec.weights_path() is None:
        raise ModelError(f"Model spec '{spec.name}' is an ONNX model but names no 'weights' file (the .onnx).")
    torch_model = None if is_onnx else loaded.networks[0] if loaded is not None else load_torch_model(spec)
    return _Plan(spec, torch_model, volumes, inputs, out, settings, calib_settings, chosen)


def _settings(spec: ModelSpec, options: QuantizeOptions, placement: str, activations: str, subpixel: bool):
    """QuantizeSettings for the placement; with ModelOpt's, the architecture's own high-precision parts too."""
    from .quantize import QuantizeSettings, quantize_settings_for

    settings = QuantizeSettings(**options.calibration_method(), exclude_nodes=tuple(options.exclude_nodes),
                                placement=placement, activations=activations, subpixel=subpixel,
                                target_cpu=options.target_cpu)
    settings.validate()
    if placement == "modelopt":  # e.g. attention MatMuls
        settings = replace(quantize_settings_for(spec.architecture, method=options.method,
                                                 exclude_nodes=tuple(options.exclude_nodes)),
                           placement=placement, target_cpu=options.target_cpu, **options.calibration_method())
    return settings


def _stage_weights(spec: ModelSpec, staging: Path) -> ModelSpec:
    """Copy the weights next to the staged spec so the model folder is self-contained."""
    source = spec.weights_path()
    if source is None:
        if spec.architecture in ("onnx", "torchscript"):
            raise ModelError(f"Model spec '{spec.name}' has architecture '{spec.architecture}' but no 'weights' file.")
        return replace(spec, base_dir=str(staging))
    if not source.is_file():
        raise ModelError(f"Model weights '{source}' (from spec '{spec.name}') do not exist.")
    target = staging / ("weights" + (source.suffix or ".bin"))
    shutil.copyfile(source, target)
    return replace(spec, weights=target.name, base_dir=str(staging))


def _export(plan: _Plan, staging: Path, monitor: Monitor) -> dict[str, Any]:
    """The FP32 ONNX (exported and verified against PyTorch, or the user's ONNX copied) and the staged spec."""
    from ..models.onnx_export import copy_onnx_model, export_onnx

    monitor.update("export", 0, 1)
    spec = plan.spec
    if plan.is_onnx:
        copy_onnx_model(spec.weights_path(), staging / FP32_NAME)
        staged_spec = replace(spec, weights=FP32_NAME, base_dir=str(staging))
        export_info: dict[str, Any] = {"source": "onnx"}
    else:
        staged_spec = _stage_weights(spec, staging)
        exported = export_onnx(plan.torch_model, spec, staging / FP32_NAME, monitor=monitor)
        export_info = {"source": "torch", "max_abs_error": exported.max_abs_error, "opset": exported.opset}
    staged_spec.save(staging / SPEC_NAME)
    monitor.update("export", 1, 1)
    return export_info


def _quantize(plan: _Plan, staging: Path, options: QuantizeOptions, monitor: Monitor):
    """The INT8 Q/DQ ONNX through the accuracy guard: agreement with FP32 is always measured, and enforced
    when the options hold a target."""
    from .guard import guarded_quantize_volumes

    return guarded_quantize_volumes(staging / FP32_NAME, staging / INT8_NAME, plan.volumes, plan.spec,
                                    plan.calib_settings, plan.settings, options.guard, monitor,
                                    names=[path.name for path in plan.inputs])


def _method(settings) -> dict[str, Any]:
    """The calibration method for ``quantization.json`` (with its percentile when it has one)."""
    return {"method": settings.method, **({"percentile": settings.percentile} if settings.method == "percentile"
                                          else {})}


def _summary(plan: _Plan, options: QuantizeOptions, export_info: dict[str, Any], report, guard_info) -> dict[str, Any]:
    why = plan.chosen["auto"]
    return {
        "model": plan.spec.name,
        "export": export_info,
        "calibration": {"volumes": len(plan.volumes), "patches": options.num_patches, "seed": options.seed,
                        **_method(plan.settings), "inputs": [str(path) for path in plan.inputs]},
        **report.to_dict(),
        "guard": guard_info.to_dict(),
        **({"placement_auto": why} if why else {}),
        "path": INT8_NAME,  # relative: the staging folder is renamed into place
    }
