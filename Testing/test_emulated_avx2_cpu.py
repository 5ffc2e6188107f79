"""An AVX2-only CPU emulated for real (issue 22): ``qemu-x86_64 -cpu Haswell`` runs this Python with the CPUID of a
Haswell (AVX2, no AVX-512, no VNNI), so ONNX Runtime's and OpenVINO's own dispatch pick the kernels such a machine
runs, not only oneDNN's (``ONEDNN_MAX_CPU_ISA`` reaches oneDNN alone; ONNX Runtime has no such switch).

The network is one worst-case INT8 convolution: activations and weights near the ends of their 8-bit ranges, where
CPUs without int8 dot products sum u8 x s8 pairs in 16 bits and saturate. Skips where qemu-user is not installed
(``.ci/run`` installs it where it can)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                                reason="qemu-user (qemu-x86_64) is not installed: apt-get install qemu-user")

WORKER = r'''
import json, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from PTQLogic.onnx_graph.weight_range import narrow_model

runtime, bits, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
C, K = 64, 32
w = (rng.integers(100, 128, (K, C, 3, 3, 3)) * rng.choice([-1, 1], (K, C, 3, 3, 3))).clip(-127, 127).astype(np.int8)
nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
         helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
         helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1] * 6)]
inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
         numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "ws"),
         numpy_helper.from_array(np.array(0, np.int8), "wz")]
graph = helper.make_graph(nodes, "worst", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 9
if bits == 7:
    narrow_model(model)  # the remedy quantize applies for AVX2 targets
x = rng.integers(225, 256, (1, C, 8, 8, 8)).astype(np.float32)
if runtime == "onnxruntime":
    import onnxruntime as ort
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
else:
    import openvino as ov
    core = ov.Core()
    y = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                           {"INFERENCE_PRECISION_HINT": "f32"})([x])[0]
np.save(out, y)
features = np._core._multiarray_umath.__cpu_features__
print(json.dumps({k: bool(features.get(k)) for k in ("AVX2", "AVX512F", "AVX512VNNI")}))
'''


def _run(tmp_path: Path, runtime: str, bits: int, emulate: str | None, env: dict | None = None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{runtime}-{bits}-{emulate}.npy"
    command = ([QEMU, "-cpu", emulate] if emulate else []) + [sys.executable, str(script), runtime, str(bits), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)


def _reference(tmp_path: Path, bits: int) -> np.ndarray:
    """The exact integer convolution (float64), from the worker's own graph run on ONNX Runtime natively."""
    return _run(tmp_path, "onnxruntime", bits, None)[1].astype(np.float64)


def _relative_error(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(y - reference).max() / np.abs(reference).max())


def test_the_emulated_cpu_is_avx2_only(tmp_path):
    features, _ = _run(tmp_path, "onnxruntime", 8, "Haswell")
    assert features == {"AVX2": True, "AVX512F": False, "AVX512VNNI": False}


def test_onnxruntime_int8_convolution_is_exact_on_an_avx2_only_cpu(tmp_path):
    """ONNX Runtime's AVX2 kernels do not saturate, even on the worst case: 8-bit weights are safe for it."""
    reference = _reference(tmp_path, 8)
    _, emulated = _run(tmp_path, "onnxruntime", 8, "Haswell")
    assert _relative_error(emulated, reference) < 1e-6


def test_openvino_saturates_eight_bit_weights_there_and_seven_bit_weights_do_not(tmp_path):
    """The reason INT8 folders record the CPU they target: OpenVINO on an AVX2-only CPU loses most of the worst
    case's value with 8-bit weights, and nothing with the 7-bit weights quantize writes for AVX2 targets."""
    _, eight = _run(tmp_path, "openvino", 8, "Haswell")
    assert _relative_error(eight, _reference(tmp_path, 8)) > 0.1
    _, seven = _run(tmp_path, "openvino", 7, "Haswell")
    assert _relative_error(seven, _reference(tmp_path, 7)) < 1e-6


def test_onednn_isa_cap_gives_openvino_the_same_numbers_as_the_emulated_cpu(tmp_path):
    """What the faster emulation elsewhere in the suite relies on: ONEDNN_MAX_CPU_ISA=AVX2 (OpenVINO in f32) computes
    exactly what OpenVINO computes on the emulated AVX2-only CPU."""
    _, emulated = _run(tmp_path, "openvino", 8, "Haswell")
    _, capped = _run(tmp_path, "openvino", 8, None, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    np.testing.assert_array_equal(capped, emulated)
