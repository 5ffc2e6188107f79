"""system_info(): CPU features, memory, GPUs and runtime versions (or why each is missing)."""
from __future__ import annotations

import importlib.util
import json
import platform

from PTQLogic.core.sysinfo import CPU_FLAGS, system_info


def test_system_info_reports_this_machine():
    info = system_info()
    json.dumps(info)  # the CLI prints it as JSON
    assert {"platform", "cpu", "memory_bytes", "gpus", "versions"} <= set(info)
    cpu = info["cpu"]
    assert set(cpu["flags"]) == set(CPU_FLAGS) and cpu["logical_cores"] >= 1 and cpu["model"]
    assert info["memory_bytes"] > 100 * 2**20
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        cpuinfo = None
    if cpuinfo is not None:
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
        for name in CPU_FLAGS:
            assert cpu["flags"][name] == (name in flags)


def test_versions_match_the_imported_modules():
    import modelopt
    import monai
    import onnx
    import onnxruntime
    import openvino
    import torch

    versions = system_info()["versions"]
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert versions["monai"] == monai.__version__
    assert versions["onnx"] == onnx.__version__
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["openvino"] == openvino.__version__
    assert versions["nvidia-modelopt"] == modelopt.__version__
    assert "CPUExecutionProvider" in versions["onnxruntime_providers"]
    assert "CPU" in versions["openvino_devices"]
    if importlib.util.find_spec("tensorrt") is None:
        missing = versions["tensorrt"]
        assert isinstance(missing, dict) and "tensorrt" in missing["missing"]
    else:
        import tensorrt

        assert versions["tensorrt"] == tensorrt.__version__
    from importlib.metadata import version

    for optional in ("nnunetv2", "ray"):  # the `nnunet` and `cluster` extras, reported without importing them
        if importlib.util.find_spec(optional) is None:
            assert "missing" in versions[optional]
        else:
            assert versions[optional] == version(optional)


def test_gpus_follow_torch_cuda():
    import torch

    gpus = system_info()["gpus"]
    assert isinstance(gpus, list) and len(gpus) == torch.cuda.device_count()
    for gpu in gpus:
        assert gpu["name"] and gpu["memory_bytes"] > 0 and "." in gpu["compute_capability"]


def test_int8_note_on_cpus_without_int8_dot_products(monkeypatch):
    from PTQLogic.core.sysinfo import INT8_DOT_FLAGS, _cpu_info, cpu_int8_note

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # OpenVINO's kernels capped below VNNI: as such a CPU
    assert "no int8 dot-product instructions" in cpu_int8_note()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    flags = _cpu_info()["flags"]
    if any(flags[f] for f in INT8_DOT_FLAGS):
        assert cpu_int8_note() is None
    elif all(flags[f] is False for f in INT8_DOT_FLAGS):
        assert cpu_int8_note() is not None


def test_speed_note_only_when_low_precision_does_not_pay_off():
    from PTQLogic.core.sysinfo import speed_note

    assert speed_note("openvino", "int8", 10.0, 25.0) is None  # 2.5x: pays off
    assert speed_note("openvino", "int8", 10.0, 11.0) is None  # 1.1x: the threshold pays off
    note = speed_note("onnxruntime", "int8", 20.0, 18.4)  # 0.92x (a GroupNorm SegResNet on ONNX Runtime)
    assert "20.0 ms per patch against FP32's 18.4 ms on onnxruntime (0.92x)" in note and "--runtime openvino" in note
    note = speed_note("openvino", "int8", 10.0, 10.5)
    assert "(1.05x)" in note and "--runtime openvino" not in note and "still smaller" in note
    assert "FP16" in speed_note("tensorrt", "fp16", 1.0, 0.9)
    assert speed_note("onnxruntime", "int8", 0.0, 10.0) is None  # no timing, no claim
