"""What ONNX Runtime computes for the INT8 file of ``Testing/test_tensorrt.py``'s small InstanceNorm UNet: the
reference for that test's real-TensorRT agreement (0.929 on TensorRT 8.6.0, H100).

Rows, each FP32-vs-INT8 argmax agreement and max |logit difference| on the test's batch, on ONNX Runtime (CPU):
the INT8 file as written; with its weights as Q/DQ and its InstanceNorms decomposed as TensorRT 8.6.0 gets them;
both again with every unquantized tensor in FP16 (ModelOpt's ``convert_to_f16``, as TensorRT's FP16 flag may run
them); and the FP16 graph with and without decomposed norms. Runs anywhere (no GPU).

    python benchmarks/gpu/tiny_unet_reference.py --out results/tiny_unet_reference.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import numpy as np
    import onnx
    import onnxruntime

    from PTQLogic.engines.trt_graphs import decompose_instancenorm, dq_only_to_qdq, make_fp16_onnx, make_int8_fp16_onnx
    from test_engines import tiny_artifacts

    work = Path(tempfile.mkdtemp(prefix="tiny-unet-"))
    artifacts = tiny_artifacts(work)
    batch = artifacts["batch"].numpy()

    def run(path: Path) -> np.ndarray:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: batch})[0]

    def save(model: onnx.ModelProto, name: str) -> Path:
        onnx.save(model, str(work / name))
        return work / name

    qdq_model = dq_only_to_qdq(onnx.load(str(artifacts["int8"])))
    qdq = save(qdq_model, "int8_qdq.onnx")
    decomposed = save(decompose_instancenorm(qdq_model), "int8_qdq_decomposed.onnx")
    fp16 = make_fp16_onnx(artifacts["fp32"], work / "fp16.onnx")
    rows = {
        "int8": artifacts["int8"],
        "int8, Q/DQ weights, norms decomposed": decomposed,
        "int8, FP16 remainder": make_int8_fp16_onnx(qdq, work / "int8_fp16.onnx"),
        "int8, norms decomposed, FP16 remainder": make_int8_fp16_onnx(decomposed, work / "int8_decomposed_fp16.onnx"),
        "fp16": fp16,
        "fp16, norms decomposed": save(decompose_instancenorm(onnx.load(str(fp16))), "fp16_decomposed.onnx"),
    }
    reference = run(artifacts["fp32"])
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "onnxruntime": onnxruntime.__version__},
              "batch_shape": list(batch.shape), "rows": {}}
    for name, path in rows.items():
        out = run(path)
        result["rows"][name] = {"agreement_with_fp32": float((out.argmax(1) == reference.argmax(1)).mean()),
                                "max_abs_diff": float(np.abs(out - reference).max())}
        print(f"{name:42s} {result['rows'][name]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
