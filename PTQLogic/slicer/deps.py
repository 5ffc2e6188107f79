"""Which Python packages the Slicer module must install, and how big they are (no Slicer imports)."""
from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Iterable, Mapping

# Packages Slicer itself ships: never installed, upgraded or replaced by this extension.
SLICER_SHIPPED = frozenset({
    "numpy", "scipy", "simpleitk", "pydicom", "requests", "urllib3", "certifi", "idna", "charset-normalizer",
    "packaging", "pip", "setuptools", "wheel", "six", "vtk", "ctk", "qt", "pythonqt", "dicomweb-client",
})
REQUIRED = ("torch", "monai", "onnx", "onnxruntime", "openvino", "nvidia-modelopt")
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
MODELOPT_MIN_PYTHON = (3, 10)
QUANTIZE_NEEDS_NEWER_PYTHON = (
    "Quantization uses NVIDIA ModelOpt, which needs Python 3.10 or newer (3D Slicer 5.10 or newer); this Slicer "
    "can still segment with a model folder quantized elsewhere (`ptqseg quantize` on any Python 3.10+)."
)


def quantization_supported(python_version: tuple[int, int] | None = None) -> bool:
    return (python_version or tuple(sys.version_info[:2])) >= MODELOPT_MIN_PYTHON
# Approximate download sizes in MB (wheels plus the dependencies they pull in).
SIZES_MB = {
    "torch": 200, "torch-cuda": 2500, "monai": 5, "onnx": 17, "onnxruntime": 15, "onnxruntime-gpu": 280,
    "openvino": 45, "nvidia-modelopt[onnx]": 420, "nvidia-modelopt": 5, "tensorrt": 1100,
}
REQUIREMENTS = {
    "torch": "torch>=2.1", "monai": "monai>=1.3", "onnx": "onnx>=1.15", "onnxruntime": "onnxruntime>=1.17",
    "onnxruntime-gpu": "onnxruntime-gpu>=1.17", "openvino": "openvino>=2024.4",
    "nvidia-modelopt": "nvidia-modelopt>=0.40", "nvidia-modelopt[onnx]": "nvidia-modelopt[onnx]>=0.40",
    "tensorrt": "tensorrt>=10",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Distribution name -> installed version (None when missing), via importlib.metadata."""
    versions = {}
    for name in names:
        try:
            versions[canonical(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[canonical(name)] = None
    return versions


@dataclass
class DependencyPlan:
    to_install: list[str]  # pip requirement strings, in install order
    skipped_shipped: list[str]  # asked for but shipped by Slicer: left alone
    message: str  # what will be installed and roughly how big, for the confirmation dialog
    to_uninstall: list[str] = field(default_factory=list)  # conflicting distributions to remove first
    constraints: list[str] = field(default_factory=list)  # "numpy==1.26.4": pins pip may not change
    download_mb: int = 0

    @property
    def needed(self) -> bool:
        return bool(self.to_install or self.to_uninstall)


def dependency_plan(installed: Mapping[str, str | None], has_nvidia_gpu: bool,
                    requested: Iterable[str] = REQUIRED, system: str | None = None,
                    machine: str | None = None, python_version: tuple[int, int] | None = None) -> DependencyPlan:
    """Decide what to install so quantization and all available runtimes work.

    ``installed`` maps distribution names to versions (None = missing), e.g. from
    :func:`installed_versions`. TensorRT is only planned with an NVIDIA GPU. On x86-64 Linux
    ``nvidia-modelopt[onnx]`` brings ``onnxruntime-gpu`` (it includes the CPU provider), so the plain
    ``onnxruntime`` is neither installed next to it nor kept (both install the same module); on Windows
    x86-64 it does the same, and elsewhere it brings the plain ``onnxruntime``. ModelOpt needs Python
    3.10+: on older Pythons (Slicer < 5.10) it is left out and the message says quantization needs a
    newer Slicer, while segmentation with existing model folders still works.
    """
    have = {canonical(k): v for k, v in installed.items() if v}
    system = (system or platform.system()).lower()
    machine = (machine or platform.machine()).lower()
    linux_x86 = system == "linux" and machine in ("x86_64", "amd64")
    ort_gpu_with_modelopt = system in ("linux", "windows") and machine in ("x86_64", "amd64")
    notes: list[str] = []
    wanted, skipped = _wanted(requested, has_nvidia_gpu, python_version, notes)
    items, to_uninstall = _items_to_install(wanted, have, has_nvidia_gpu, ort_gpu_with_modelopt, notes)
    cuda_torch = "torch" in items and (has_nvidia_gpu or linux_x86)  # PyPI's Linux torch carries CUDA
    sizes = {item: SIZES_MB["torch-cuda" if item == "torch" and cuda_torch else item] for item in items}
    total = sum(sizes.values())
    constraints = [f"{name}=={version}" for name, version in sorted(have.items()) if name in SLICER_SHIPPED]
    return DependencyPlan(
        to_install=[REQUIREMENTS[i] for i in items], skipped_shipped=skipped,
        message=_plan_message(items, sizes, to_uninstall, notes, constraints),
        to_uninstall=to_uninstall, constraints=constraints, download_mb=total,
    )


def _wanted(requested: Iterable[str], has_nvidia_gpu: bool, python_version: tuple[int, int] | None,
            notes: list[str]) -> tuple[list[str], list[str]]:
    """(the canonical names to plan for, in order and once each; those asked for that Slicer ships). ModelOpt is
    dropped on too old a Python (a note says why); TensorRT is added with an NVIDIA GPU."""
    wanted = [canonical(n) for n in requested]
    if not quantization_supported(python_version) and "nvidia-modelopt" in wanted:
        wanted.remove("nvidia-modelopt")
        notes.append(QUANTIZE_NEEDS_NEWER_PYTHON.rstrip("."))
    if has_nvidia_gpu and "tensorrt" not in wanted:
        wanted.append("tensorrt")
    skipped = sorted({n for n in wanted if n in SLICER_SHIPPED})
    return [n for n in dict.fromkeys(wanted) if n not in SLICER_SHIPPED], skipped


def _items_to_install(wanted: list[str], have: Mapping[str, str], has_nvidia_gpu: bool, ort_gpu_with_modelopt: bool,
                      notes: list[str]) -> tuple[list[str], list[str]]:
    """(keys of SIZES_MB / REQUIREMENTS to install, distributions to uninstall first); ONNX Runtime is decided
    together with ModelOpt, which brings its own."""
    items: list[str] = []
    to_uninstall: list[str] = []
    has_ort = any(have.get(d) for d in ORT_DISTRIBUTIONS)
    for name in wanted:
        if name == "onnxruntime":
            continue  # decided together with modelopt below
        if name == "tensorrt" and not has_nvidia_gpu:
            continue
        if have.get(name):
            continue
        if name == "nvidia-modelopt":
            items.append("nvidia-modelopt[onnx]")
        elif name == "torch":
            items.append("torch")
        else:
            items.append(name)
    if "onnxruntime" in wanted or "nvidia-modelopt" in wanted:
        if "nvidia-modelopt[onnx]" in items:  # it brings its own ONNX Runtime on every platform
            if ort_gpu_with_modelopt:
                notes.append("onnxruntime-gpu comes with nvidia-modelopt[onnx] and includes the CPU provider")
            if ort_gpu_with_modelopt and have.get("onnxruntime") and not have.get("onnxruntime-gpu"):
                to_uninstall.append("onnxruntime")
                notes.append("the plain onnxruntime is removed first: both provide the same 'onnxruntime' module")
        elif not has_ort and "onnxruntime" in wanted:
            items.append("onnxruntime-gpu" if ort_gpu_with_modelopt and have.get("nvidia-modelopt") else "onnxruntime")
    return items, to_uninstall


def _plan_message(items: list[str], sizes: dict[str, int], to_uninstall: list[str], notes: list[str],
                  constraints: list[str]) -> str:
    """What the confirmation dialog says: what is installed or removed, roughly how big, and why."""
    if not items and not to_uninstall:
        return "All required Python packages are installed." + ("".join(" " + n + "." for n in notes))
    listing = ", ".join(f"{REQUIREMENTS[i]} (~{_size(sizes[i])})" for i in items)
    message = f"PTQSegmentation needs to install: {listing}. Total download about {_size(sum(sizes.values()))}."
    if to_uninstall:
        message += f" It will first uninstall: {', '.join(to_uninstall)}."
    if notes:
        message += " Note: " + "; ".join(notes) + "."
    if "torch" in items:
        message += (" Tip: the PyTorch Slicer extension can install a torch build that matches your GPU/CPU.")
    if constraints:
        message += " Packages that Slicer ships (" + ", ".join(c.split("==")[0] for c in constraints) + \
                   ") are kept at their current versions."
    return message


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is present (nvidia-smi on PATH or the Linux driver's proc entry)."""
    import os
    import shutil

    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")


def _size(mb: int) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb} MB"


def versions_report(names: Iterable[str] = REQUIRED + ("onnxruntime-gpu", "tensorrt")) -> str:
    """One line per package: its installed version or 'not installed'."""
    return "\n".join(f"{name}: {version or 'not installed'}" for name, version in installed_versions(names).items())
