"""What this machine offers: CPU features that matter for INT8 (AVX2, AVX512-VNNI, AMX), GPUs, versions."""
from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# module import name -> distribution name (for the version lookup)
PACKAGES = {
    "torch": "torch",
    "monai": "monai",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "modelopt": "nvidia-modelopt",
    "tensorrt": "tensorrt",
    "nnunetv2": "nnunetv2",  # optional: nnU-Net v2 folders (the `nnunet` extra)
    "ray": "ray",  # optional: segment-batch (the `cluster` extra)
}


def _cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
        known = True
    except OSError:  # not Linux: report what we can, flags unknown
        known = False
    return {
        "model": model or "unknown",
        "flags": {name: (name in flags) if known else None for name in CPU_FLAGS},
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def cpu_model() -> str:
    """This CPU's model name (from /proc/cpuinfo where it can be read)."""
    return _cpu_info()["model"]


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None


# Reported from package metadata without importing (import monai alone takes seconds); the others are
# imported because what matters is whether they load (and torch/onnxruntime/openvino are queried below).
METADATA_ONLY = ("monai", "nnunetv2", "ray")


def _version(module_name: str) -> Any:
    if module_name in METADATA_ONLY and module_name not in sys.modules:
        from importlib.metadata import PackageNotFoundError, version
        from importlib.util import find_spec

        try:
            if find_spec(module_name) is not None:
                return version(PACKAGES[module_name])
        except (PackageNotFoundError, ValueError):
            pass
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return {"missing": f"not importable ({type(exc).__name__}: {exc})"}
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(PACKAGES[module_name])
        except Exception:
            version = "unknown"
    return str(version)


def _gpus() -> list[dict[str, Any]] | dict[str, str]:
    try:
        import torch
    except ImportError:
        return {"missing": "torch is not installed"}
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({
            "index": index,
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory),
        })
    return gpus


# ONNX Runtime providers that need a GPU: onnxruntime-gpu lists them as "available" on any machine.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "NvTensorRTRTXExecutionProvider",
                 "ROCMExecutionProvider", "MIGraphXExecutionProvider", "DmlExecutionProvider")


# ONNX Runtime providers that run nothing on this machine (the default wheel lists Azure's on every machine).
REMOTE_PROVIDERS = ("AzureExecutionProvider",)


def _onnxruntime_package() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-openvino", "onnxruntime-directml"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def usable_onnxruntime_providers(has_gpu: bool) -> tuple[list[str], dict[str, str]]:
    """(providers usable here, {provider built in but unusable here: why})."""
    import onnxruntime

    usable, unusable = [], {}
    for name in onnxruntime.get_available_providers():
        if name in GPU_PROVIDERS and not has_gpu:
            unusable[name] = "built into this ONNX Runtime, but there is no GPU here"
        elif name in REMOTE_PROVIDERS:
            unusable[name] = "sends the network's inputs to a cloud endpoint; ptqseg never uses it"
        else:
            usable.append(name)
    return usable, unusable


def system_info() -> dict[str, Any]:
    """CPU, memory, GPUs and the versions of every runtime (a version string or {"missing": reason}).

    Runtime features that need a GPU (ONNX Runtime's CUDA/TensorRT providers, TensorRT) are listed as
    usable only when a GPU is present.
    """
    versions: dict[str, Any] = {"python": platform.python_version()}
    for module_name, dist_name in PACKAGES.items():
        versions[dist_name] = _version(module_name)
    gpus = _gpus()
    has_gpu = isinstance(gpus, list) and bool(gpus)
    if isinstance(versions["tensorrt"], str) and not has_gpu:
        versions["tensorrt"] = {"missing": f"{versions['tensorrt']} is installed but unusable: no NVIDIA GPU here"}
    if isinstance(versions["onnxruntime"], str):
        versions["onnxruntime_package"] = _onnxruntime_package()
        usable, unusable = usable_onnxruntime_providers(has_gpu)
        versions["onnxruntime_providers"] = usable
        if unusable:
            versions["onnxruntime_providers_unusable"] = unusable
    if isinstance(versions["openvino"], str):
        try:
            import openvino

            versions["openvino_devices"] = list(openvino.Core().available_devices)
        except Exception as exc:
            versions["openvino_devices"] = {"missing": f"{type(exc).__name__}: {exc}"}
    torch_mod = sys.modules.get("torch")
    return {
        "platform": platform.platform(),
        "cpu": _cpu_info(),
        "memory_bytes": _memory_bytes(),
        "gpus": gpus,
        "cuda": getattr(getattr(torch_mod, "version", None), "cuda", None),
        "versions": versions,
    }


INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot-product instructions
_CAPS_WITHOUT_INT8_DOT = ("SSE41", "AVX", "AVX2", "AVX512_CORE")  # ONEDNN_MAX_CPU_ISA values below VNNI


def cpu_int8_note() -> str | None:
    """A note for INT8 on this CPU when it has no int8 dot-product instructions (VNNI, AMX), where INT8 is
    not faster than FP32 for most networks (measured with OpenVINO, kernels capped to AVX2)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    flags = _cpu_info()["flags"]
    if cap not in _CAPS_WITHOUT_INT8_DOT and (any(flags[f] is None for f in INT8_DOT_FLAGS)
                                              or any(flags[f] for f in INT8_DOT_FLAGS)):
        return None
    return ("This CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX): INT8 runs about as "
            "fast as FP32 here (1.06-1.15x on OpenVINO for a 96^3 UNet and a SegResNet on an AMD EPYC without "
            "VNNI, measured), and its weights get 7 bits; the INT8 file is still about 3x smaller. Where "
            "FP32's exact answer matters more than ~10%, run the folder with --precision fp32.")


PAYS_OFF_SPEEDUP = 1.1  # a low-precision engine at least this much faster than FP32 pays off in speed


def speed_note(runtime: str, precision: str, latency_ms: float, fp32_latency_ms: float) -> str | None:
    """A note when INT8/FP16 was not clearly faster than FP32 on the same runtime, volume and machine (the
    ``--compare`` run): e.g. a GroupNorm network on ONNX Runtime, or any network on a CPU without VNNI/AMX."""
    if latency_ms <= 0 or fp32_latency_ms <= 0 or fp32_latency_ms / latency_ms >= PAYS_OFF_SPEEDUP:
        return None
    if runtime == "onnxruntime" and precision == "int8":
        advice = ("OpenVINO ran the same INT8 files several times faster than ONNX Runtime in the project's CPU "
                  "benchmarks (benchmarks/README.md): try --runtime openvino")
    else:
        advice = "FP32 is as fast or faster here; the low-precision file is still smaller"
    return (f"{precision.upper()} took {latency_ms:.1f} ms per patch against FP32's {fp32_latency_ms:.1f} ms on "
            f"{runtime} ({fp32_latency_ms / latency_ms:.2f}x): it does not pay off in speed on this machine. {advice}.")


def _numpy_cpu_features() -> dict[str, bool]:
    """numpy's own CPUID probe (any OS): the fallback where /proc/cpuinfo cannot be read."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


def cpu_int8_target() -> str:
    """``"vnni"`` where this CPU's INT8 convolutions accumulate u8 x s8 products exactly in 32 bits
    (AVX512-VNNI, AVX-VNNI, AMX; and CPUs that are not x86), ``"avx2"`` where they do not.

    Without an int8 dot-product instruction, x86 INT8 kernels (oneDNN in OpenVINO, MLAS in ONNX Runtime)
    multiply u8 activations by s8 weights and add pairs of products in 16 bits (``vpmaddubsw``), which
    saturates with full-range 8-bit weights (2 * 255 * 127 > 32767); 7-bit weights fit. ``ONEDNN_MAX_CPU_ISA``
    capped below VNNI counts as ``"avx2"`` (OpenVINO's kernels then run without VNNI). Where the flags cannot
    be read (not Linux), numpy's CPUID probe decides; an x86 CPU still unknown counts as ``"avx2"``: 7-bit
    weights cost little where VNNI exists (FP32 agreement 0.9993 against 0.9994 on the phantom UNet), 8-bit
    ones cost much where it does not.
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _CAPS_WITHOUT_INT8_DOT:
        return "avx2"
    flags = _cpu_info()["flags"]
    if any(flags[f] for f in INT8_DOT_FLAGS):
        return "vnni"
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    if all(flags[f] is not None for f in INT8_DOT_FLAGS):  # read from /proc/cpuinfo: none of them
        return "avx2" if x86 else "vnni"
    features = _numpy_cpu_features()
    if any(features.get(f) for f in ("AVX512VNNI", "AVX512_CLX", "AVX512_ICL", "AVX512_SPR")):
        return "vnni"
    return "avx2" if x86 or features.get("AVX2") else "vnni"


def amx_int8_in_use() -> bool:
    """True where oneDNN (OpenVINO) runs INT8 on AMX: the CPU has it and ONEDNN_MAX_CPU_ISA does not cap it."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap != "ALL" and "AMX" not in cap:
        return False
    return bool(_cpu_info()["flags"].get("amx_int8"))
