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


def nnunet_preparer(model: NnUNetModel):
    """Calibration preprocessing of an nnU-Net model: nnU-Net's own (``NnUNetRunner.preprocess``), with the body
    mask of the spec models' sampler (:mod:`.calibration`) in its normalized units."""
    from ..inference.nnunet.predict import runner_for
    from .calibration import CT_BODY_HU, OTHER_BODY_PERCENTILE, PreparedVolume

    runner = runner_for(model)
    scheme = runner.config.normalization_schemes[0]
    stats = model.plans["foreground_intensity_properties_per_channel"].get("0", {})

    def prepare(volume) -> PreparedVolume:
        data, properties = runner.preprocess(volume)
        if scheme == "CTNormalization":
            mask = data[0] > (CT_BODY_HU - stats["mean"]) / max(stats["std"], 1e-8)
        else:
            mask = data[0] > np.percentile(data[0], OTHER_BODY_PERCENTILE)
        return PreparedVolume(data, mask if mask.any() else np.ones_like(mask, dtype=bool), properties)

    return runner, prepare


def _nnunet_segmenter(runner, monitor: Monitor):
    """Whole held-out volumes through nnU-Net's own prediction, as ``segment`` runs it (no mirroring)."""

    def segmenter(volumes: list, prepared: list):
        def segment(engine, index: int):
            result = runner.predict(volumes[index], [engine], monitor=monitor,
                                    preprocessed=(prepared[index].image, prepared[index].context))
            return result.labels, result.network_seconds, result.patches

        return segment

    return segmenter


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
                    target_cpu: str = "auto", guard: GuardTarget | None = DEFAULT_GUARD,
                    percentile: float | None = None, bias_correction: bool = False, on_miss: str = "fail",
                    equalize: bool = False):
    """nnU-Net results folder + unlabeled volumes -> model folder with per-fold FP32 and INT8 ONNX; each fold's
    INT8 goes through the accuracy guard (``guard=None``: its agreement is measured and recorded only).
    ``on_miss`` "fp32": a fold whose INT8 misses the guard's target leaves the folder without INT8 (every fold:
    ``segment`` then runs this model in FP32 and says why) instead of failing, so that a part of a
    TotalSegmentator-style set that cannot keep FP32's answer in INT8 does not stop the set. ``equalize``: each
    fold's network is channel-equalized on the calibration patches before export (:mod:`.equalize`: the same
    function in FP32, ranges that INT8 keeps better); its FP32 and INT8 files are then the equalized network's."""
    import torch

    from ..models.onnx_export import export_onnx
    from .calibration import CalibrationSettings, calibration_inputs, load_calibration_volumes, validate_settings
    from .guard import GuardMissed, guarded_quantize
    from .held_out import calibration_and_held_out
    from .quantize import QuantizeSettings

    monitor = monitor or Monitor()
    started = time.perf_counter()
    chosen = QuantizeOptions(method=method, percentile=percentile, bias_correction=bias_correction, on_miss=on_miss)
    chosen.validate_method()
    QuantizeSettings(**chosen.calibration_method(), target_cpu=target_cpu).validate()
    calib_settings = CalibrationSettings(num_patches=num_patches, seed=seed)
    validate_settings(calib_settings)
    if guard is not None:
        guard.validate()
    calibration_paths = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    out_dir = _check_out_dir(out_dir, [model, *calibration_paths])
    inputs = calibration_inputs(calibration)
    volumes = load_calibration_volumes(inputs)
    source = open_nnunet_model(model, folds, checkpoint)
    if source.quantized:
        raise InputError(f"'{model}' is already a quantized model folder; quantize the original nnU-Net folder.")
    staging = staging_dir(out_dir)
    try:
        runner, prepare = nnunet_preparer(source)
        patches, held_out = calibration_and_held_out(volumes, [path.name for path in inputs], prepare,
                                                     source.spec.patch_size, calib_settings,
                                                     _nnunet_segmenter(runner, monitor), monitor)
        for name in (DATASET_JSON, PLANS_JSON):
            shutil.copyfile(source.root / name, staging / name)
        source.spec.save(staging / "spec.json")
        reports: dict[str, Any] = {}
        fallback: dict[str, Any] | None = None
        settings = QuantizeSettings(**chosen.calibration_method(), exclude_nodes=tuple(exclude_nodes),
                                    target_cpu=target_cpu)
        for fold, network in zip(source.folds, source.networks):
            folder = staging / f"fold_{fold}"
            folder.mkdir()
            equalized = _equalized(network, patches, monitor) if equalize else None
            torch.save(network.state_dict(), folder / "weights.pt")
            exported = export_onnx(network, source.spec, folder / "fp32.onnx", monitor=monitor)
            export = {"max_abs_error": exported.max_abs_error, "opset": exported.opset,
                      **({"equalize": equalized.to_dict()} if equalized else {})}
            if fallback:  # an earlier fold missed: this model runs in FP32
                reports[fold] = {"export": export, "path": None}
                continue
            try:
                report, checked = guarded_quantize(folder / "fp32.onnx", patches, held_out, folder / "int8.onnx",
                                                   settings, guard, source.spec.num_classes, monitor=monitor)
            except GuardMissed as missed:
                if on_miss != "fp32":
                    raise
                reports[fold] = {"export": export, "guard": missed.report.to_dict(), "path": None}
                fallback = {"precision": "fp32", "fold": fold, "reason": str(missed)}
                continue
            reports[fold] = {"export": export, **report.to_dict(), "guard": checked.to_dict(),
                             "path": f"fold_{fold}/int8.onnx"}
        if fallback:  # a part's folds run as one ensemble, so all in FP32
            for fold in source.folds:
                for name in ("int8.onnx", "int8.modelopt.log"):  # the attempts' (their record: quantization.json)
                    (staging / f"fold_{fold}" / name).unlink(missing_ok=True)
                reports[fold]["path"] = None
        meta = {"format": FORMAT_VERSION, "source": "nnunet", "configuration": source.configuration,
                "folds": source.folds, "mirror_axes": source.mirror_axes, "step_size": source.step_size,
                "checkpoint": checkpoint, "original": str(source.root.resolve())}
        (staging / MODEL_DIR_MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        fp32 = sum((staging / f"fold_{f}" / "fp32.onnx").stat().st_size for f in source.folds)
        int8 = sum(p.stat().st_size for f in source.folds if (p := staging / f"fold_{f}" / "int8.onnx").is_file())
        summary = {"model": source.spec.name, "source": "nnunet", "folds": reports,
                   **({"int8_fallback": fallback} if fallback else {}),
                   "calibration": {"volumes": len(volumes), "inputs": [str(path) for path in inputs],
                                   "patches": num_patches, "seed": seed, "method": method, "equalize": equalize,
                                   **({"percentile": settings.percentile} if method == "percentile" else {})},
                   "qdq": {"ok": None if fallback else all(r.get("qdq", {}).get("ok") for r in reports.values())}}
        (staging / "quantization.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        monitor.check()
        publish_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return NnUNetQuantizeResult(model_dir=out_dir, fp32_bytes=fp32, int8_bytes=int8,
                                seconds=time.perf_counter() - started, report=summary)


EQUALIZE_WINDOWS = 8  # calibration patches the equalization measures channel ranges on (FP32 forward passes)


def _equalized(network, patches, monitor: Monitor):
    """Channel-equalize ``network`` in place on the first calibration patches; its report."""
    import torch

    from .equalize import equalize_plain_unet

    windows = [torch.from_numpy(patches[i:i + 1]) for i in range(min(EQUALIZE_WINDOWS, len(patches)))]
    monitor.update("equalizing channels", 0, len(windows))

    def progress(done: int, total: int) -> None:
        monitor.update("equalizing channels", done, total)
        monitor.check()  # Ctrl-C / Cancel between windows

    return equalize_plain_unet(network, windows, progress=progress)


class NnUNetQuantizeResult(QuantizeResult):
    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        folds = self.report.get("folds", {})
        data["fp32_onnx"] = [str(self.model_dir / f"fold_{f}" / "fp32.onnx") for f in folds]
        data["int8_onnx"] = [str(self.model_dir / f"fold_{f}" / "int8.onnx") for f in folds if folds[f].get("path")]
        if "int8_fallback" in self.report:
            data["int8_fallback"] = self.report["int8_fallback"]
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
                                 guard=options.guard, percentile=options.percentile,
                                 bias_correction=options.bias_correction, on_miss=options.on_miss,
                                 equalize=options.equalize)
        return replace(result, placement={"placement": placement, "activations": activations, "subpixel": subpixel,
                                          "auto": why})
