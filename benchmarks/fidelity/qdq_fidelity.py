"""Which runtime keeps a Q/DQ graph's meaning: logits of each runtime vs the graph run literally.

The reference is ONNX Runtime with graph optimizations off (every QuantizeLinear/DequantizeLinear
executed as written, no integer fusion). Compared: ONNX Runtime fused, OpenVINO with f32 and with bf16
inference precision (the AMX default), and each FP32 file. Patches: a .npy [N, C, *patch] (for example
sampled with PTQLogic.quantization.calibration.sample_calibration_patches).

    python benchmarks/fidelity/qdq_fidelity.py FP32.onnx INT8.onnx patches.npy [--out result.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _ort(path: str, patches: np.ndarray, optimize: bool) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: p[None]})[0] for p in patches])


def _openvino(path: str, patches: np.ndarray, hint: str) -> np.ndarray:
    import openvino as ov

    request = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint}).create_infer_request()
    return np.concatenate([request.infer({0: p[None]})[0].copy() for p in patches])


def compare(fp32: str, int8: str, patches: np.ndarray) -> dict:
    literal, reference = _ort(int8, patches, False), _ort(fp32, patches, False)
    runs = {"onnxruntime int8 (fused)": _ort(int8, patches, True),
            "openvino int8, f32 hint": _openvino(int8, patches, "f32"),
            "openvino int8, bf16 hint": _openvino(int8, patches, "bf16"),
            "openvino fp32, bf16 hint": _openvino(fp32, patches, "bf16")}
    out = {"literal_qdq_vs_fp32": {"argmax_agreement": float(np.mean(literal.argmax(1) == reference.argmax(1))),
                                   "mean_abs_logit": float(np.abs(literal - reference).mean())}}
    for name, logits in runs.items():
        out[name] = {"vs_literal_mean_abs_logit": float(np.abs(logits - literal).mean()),
                     "vs_literal_argmax_agreement": float(np.mean(logits.argmax(1) == literal.argmax(1))),
                     "vs_fp32_argmax_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1)))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32")
    parser.add_argument("int8")
    parser.add_argument("patches", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = compare(args.fp32, args.int8, np.load(args.patches).astype(np.float32))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
