"""Activation scales carried from one ModelOpt quantization of a network to the next (the accuracy guard's steps).

Calibration ranges are statistics of the FP32 network's activations, so keeping a layer in FP32 does not change
the range of any tensor that stays quantized. Each guard step after the first therefore hands ModelOpt the first
INT8 model's activation scales as a calibration cache (TensorRT's text format, which ModelOpt reads) instead of
calibrating again: ModelOpt still runs ONNX Runtime's quantizer, but on one patch, and then sets every activation
scale from the cache. :func:`unmatched_scales` says whether that held; the caller calibrates fully where not.
"""
from __future__ import annotations

import struct
from pathlib import Path

import onnx
from onnx import numpy_helper

SUFFIX = "_scale"  # ONNX Runtime's quantizer names a tensor's scale "<tensor>_scale"; ModelOpt's cache reader too
CACHE_HEADER = "TRT-8600-EntropyCalibration2"  # the first line, which ModelOpt skips


def activation_scales(int8_onnx: str | Path) -> dict[str, float]:
    """Scale initializer name -> value of every QuantizeLinear in ``int8_onnx`` (ModelOpt's Q/DQ models quantize
    weights with DequantizeLinear only, so these are the activations)."""
    model = onnx.load(str(int8_onnx))
    values = {init.name: init for init in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in values:
            array = numpy_helper.to_array(values[node.input[1]])
            if array.size == 1:
                scales[node.input[1]] = float(array.reshape(()))
    return scales


def write_calibration_cache(scales: dict[str, float], path: str | Path) -> int:
    """Write ``scales`` as a calibration cache ModelOpt reads; how many scales it holds (names not ending in
    ``_scale`` cannot be expressed and are left out)."""
    lines = [CACHE_HEADER]
    for name, value in sorted(scales.items()):
        if name.endswith(SUFFIX) and ": " not in name:
            lines.append(f"{name[:-len(SUFFIX)]}: {struct.pack('!f', value).hex()}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) - 1


def unmatched_scales(int8_onnx: str | Path, scales: dict[str, float]) -> list[str]:
    """The activation scales of ``int8_onnx`` that did not come from ``scales`` (absent there, or another value)."""
    return sorted(name for name, value in activation_scales(int8_onnx).items()
                  if name not in scales or struct.pack("!f", scales[name]) != struct.pack("!f", value))
