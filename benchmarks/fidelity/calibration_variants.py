"""Calibration variants for ``placement_presets.py``: whole-volume calibration (``--patches windows``: every
sliding window of the calibration volumes, in network space, instead of randomly placed patches; ``quantize``
offers the latter only), and empirical bias correction (``--methods entropy+bias``: the method's folder, then
:func:`PTQLogic.quantization.bias_correction.correct_biases` on ``quantize``'s own calibration patches).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np


def window_patches(volumes: list, spec) -> np.ndarray:
    """Every sliding window (the spec's patch and overlap) of each volume, in network space."""
    from PTQLogic.inference.preprocess import to_network_space
    from PTQLogic.inference.sliding_window import pad_to_roi, window_slices

    roi = tuple(int(s) for s in spec.patch_size)
    windows = []
    for volume in volumes:
        image, _ = to_network_space(volume, spec)
        image, _ = pad_to_roi(image, roi)
        for region in window_slices(tuple(image.shape[1:]), roi, spec.overlap):
            windows.append(image[(slice(None), *region)].numpy())
    return np.stack(windows).astype(np.float32)


def requantize(folder: Path, patches: np.ndarray) -> None:
    """Quantize ``folder``'s FP32 ONNX again, with its recorded settings, on ``patches`` (replaces int8.onnx)."""
    from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx

    recorded = json.loads((folder / "quantization.json").read_text())["settings"]
    names = {f.name for f in fields(QuantizeSettings)}
    settings = QuantizeSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()
                                   if k in names})
    quantize_onnx(folder / "fp32.onnx", patches, folder / "int8.onnx", settings)


def quantize_patches(calibration: list[Path], spec, num_patches: int, seed: int) -> np.ndarray:
    """The calibration patches ``quantize`` drew (it holds the last volume out from 3 volumes on): the same draw."""
    from PTQLogic.quantization.calibration import CalibrationSettings, load_calibration_volumes, \
        sample_calibration_patches
    from PTQLogic.quantization.held_out import HELD_OUT_VOLUMES, WHOLE_VOLUMES_FROM

    held = HELD_OUT_VOLUMES if len(calibration) >= WHOLE_VOLUMES_FROM else 0
    volumes = load_calibration_volumes(calibration[:len(calibration) - held], spec)
    return sample_calibration_patches(volumes, spec, CalibrationSettings(num_patches=num_patches, seed=seed))


def bias_corrected(base: Path, folder: Path, patches: np.ndarray, one_pass: bool = False) -> dict:
    """``folder``: a copy of the model folder ``base`` whose int8.onnx has empirically corrected conv biases."""
    from PTQLogic.quantization.bias_correction import correct_biases

    shutil.copytree(base, folder)
    report = correct_biases(base / "int8.onnx", base / "fp32.onnx", patches, folder / "int8.onnx",
                            one_pass=one_pass)
    return {"convs_corrected": len(report.layers), "convs_skipped": len(report.skipped), "mode": report.mode,
            "passes": report.passes, "residual_per_pass": report.residual_per_pass, "seconds": report.seconds,
            "layers": [{"node": layer.node, "error_before": layer.error_before, "error_after": layer.error_after,
                        "max_abs_shift": layer.max_abs_shift} for layer in report.layers]}
