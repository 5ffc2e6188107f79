"""Issue 8 item 10: a CPU install set without GPU packages, a GPU set, the README picking one per machine,
and `ptqseg info` listing only what can run here."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from PTQLogic.core.sysinfo import GPU_PROVIDERS, system_info, usable_onnxruntime_providers

from conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
GPU_ONLY = ("onnxruntime-gpu", "cupy", "nvidia-modelopt[onnx]", "tensorrt")


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[<>=~!; ]", r, maxsplit=1)[0].lower() for r in requirements]


def test_cpu_set_has_no_gpu_packages_and_what_int8_quantization_imports():
    cpu = _names(EXTRAS["cpu"])
    assert not [name for name in cpu if name.startswith(GPU_ONLY)], cpu
    # modelopt.onnx.quantization imports these at module level (found in a clean venv without [onnx])
    assert {"nvidia-modelopt", "onnx-graphsurgeon", "onnxslim", "onnxscript", "lief", "ml_dtypes",
            "onnxruntime", "openvino"} <= set(cpu)


def test_gpu_set_brings_modelopt_onnx_and_tensorrt():
    gpu = _names(EXTRAS["gpu"])
    assert {"nvidia-modelopt[onnx]", "openvino", "tensorrt"} <= set(gpu)
    assert "onnxruntime" not in gpu  # it comes as onnxruntime-gpu with ModelOpt; both own one module


BLOCK_AND_QUANTIZE = """
import sys
import numpy as np
for name in ("cupy", "cupy_backends", "polygraphy", "cppimport", "onnxconverter_common"):
    sys.modules[name] = None  # importing them now raises ImportError, as on a machine without them
from PTQLogic.quantization.quantize import quantize_onnx
from PTQLogic.models.onnx_export import onnx_io_names
src, dst = sys.argv[1], sys.argv[2]
_, _, shape = onnx_io_names(src)
calibration = np.random.default_rng(0).random((2, *shape[1:]), dtype=np.float32)
report = quantize_onnx(src, calibration, dst)
assert report.qdq.ok and report.ratio < 0.35, report
print("ok")
"""


def test_int8_quantization_runs_without_the_gpu_only_packages(quantized_unet, tmp_path):
    """ModelOpt's [onnx] extras that the CPU set leaves out (cupy: INT4 only; polygraphy, cppimport,
    onnxconverter-common) are not needed to quantize to INT8 on the CPU."""
    proc = subprocess.run([sys.executable, "-c", BLOCK_AND_QUANTIZE, str(quantized_unet / "fp32.onnx"),
                           str(tmp_path / "int8.onnx")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_readme_first_command_picks_the_set_for_the_machine():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = next(line for line in readme.splitlines() if line.startswith("pip install"))
    assert "nvidia-smi" in first and "echo gpu" in first and "echo cpu" in first and "ptqseg demo" in first
    assert ".[all" not in first
    assert "`.[cpu]`" in readme and "`.[gpu]`" in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "set_name=cpu" in ci and '".[$set_name,nnunet,cluster,test]" torch==2.13.0' in ci
    assert first.count("torch==2.13.0") == 2  # named again: keeps the CPU torch while nnunet brings torchvision


def test_info_lists_no_gpu_provider_without_a_gpu():
    import torch

    usable, unusable = usable_onnxruntime_providers(has_gpu=False)
    assert "CPUExecutionProvider" in usable and not set(usable) & set(GPU_PROVIDERS)
    info = system_info()
    if not torch.cuda.is_available():
        providers = info["versions"]["onnxruntime_providers"]
        assert not set(providers) & set(GPU_PROVIDERS), providers
        assert set(info["versions"].get("onnxruntime_providers_unusable", {})) == set(unusable)
        tensorrt = info["versions"]["tensorrt"]
        assert isinstance(tensorrt, dict)  # missing, or installed but unusable without a GPU
