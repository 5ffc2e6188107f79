"""Whole-volume calibration for ``placement_presets.py --patches windows``: every sliding window of the
calibration volumes, in network space, instead of randomly placed patches (``quantize`` offers the latter only).
"""
from __future__ import annotations

import json
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
