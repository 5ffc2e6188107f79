"""Issue 8 item 10: a CPU install set without GPU packages, a GPU set, the README picking one per machine,
and `ptqseg info` listing only what can run here."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    assert "pip install -c constraints.txt -e" in first  # the versions CI tested
    assert "$constraints -e" in ci and 'constraints="-c constraints.txt"' in ci and "--newest" in ci


def _constraints() -> dict[str, Requirement]:
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# Versions CI tested"), "constraints.txt starts with what it is and how it was made"
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    names = [canonicalize_name(pin.name) for pin in pins]
    assert len(names) == len(set(names)), "a package constrained twice"
    return dict(zip(names, pins))


def test_constraints_pin_every_dependency_of_the_tested_sets():
    pins = _constraints()
    direct = PYPROJECT["project"]["dependencies"] + [r for extra in ("cpu", "nnunet", "cluster", "test")
                                                     for r in EXTRAS[extra]]
    unpinned = {canonicalize_name(Requirement(r).name) for r in direct} - set(pins)
    assert not unpinned, f"constraints.txt misses direct dependencies: {sorted(unpinned)}"
    for name, pin in pins.items():
        operator = "<=" if name in ("onnx", "onnxruntime") else "=="
        assert [s.operator for s in pin.specifier] == [operator], pin
    assert "torch==2.13.0" in {str(pin) for pin in pins.values()}  # the torch the README names
    assert not [name for name in pins if name.startswith(GPU_ONLY)], "GPU-only packages are not tested by CI"


@pytest.mark.parametrize("platform", [{"platform_machine": "x86_64", "platform_system": "Linux"},
                                      {"platform_machine": "aarch64", "platform_system": "Linux"}])
def test_constraints_leave_the_gpu_set_resolvable(platform):
    """Every package the pinned ModelOpt's [onnx] extra asks for (the gpu set) has an allowed version: an
    exact pin of the CPU set's newer onnx or onnxruntime would make `.[gpu]` unresolvable."""
    pins = _constraints()
    modelopt = pins["nvidia-modelopt"]
    metadata = _modelopt_metadata(str(next(iter(modelopt.specifier)).version))
    environment = {"python_version": "3.11", "python_full_version": "3.11.7", **platform, "extra": "onnx"}
    checked = 0
    for requirement in map(Requirement, metadata):
        name = canonicalize_name(requirement.name)
        if not requirement.marker or "extra" not in str(requirement.marker) or name not in pins:
            continue
        if not requirement.marker.evaluate(environment):
            continue
        pinned = pins[name].specifier
        candidates = [str(s.version) for s in pinned] + [str(s.version) for s in requirement.specifier]
        assert any(pinned.contains(v) and requirement.specifier.contains(v) for v in candidates), (
            f"constraints.txt '{pins[name]}' excludes every version nvidia-modelopt[onnx] accepts ({requirement})")
        checked += 1
    assert checked >= 3, "nvidia-modelopt[onnx]'s requirements on onnx, onnx-graphsurgeon, ... not found"


def _modelopt_metadata(version: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("nvidia-modelopt")
    except PackageNotFoundError:
        pytest.skip("nvidia-modelopt is not installed (its metadata holds the gpu set's requirements)")
    if dist.version != version:
        pytest.skip(f"installed nvidia-modelopt {dist.version} is not the constrained {version}")
    return dist.requires or []


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
