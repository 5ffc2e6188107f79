"""Runtimes behind one :class:`~PTQLogic.engines.base.Engine` protocol, and how to pick one.

Runtime modules are imported lazily: a missing TensorRT or OpenVINO only matters when requested.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

import torch

from ..core.errors import EngineUnavailable, InputError, ModelError
from ..core.progress import Monitor
from .base import PRECISIONS, RUNTIMES, Engine, EngineInfo

__all__ = ["Engine", "EngineInfo", "RUNTIMES", "PRECISIONS", "available_runtimes", "choose_precision", "choose_runtime",
           "create_engine"]

INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime",
    "openvino": "pip install openvino",
    "tensorrt": "pip install tensorrt",
}
# which runtimes can run which precision at all (fp16 needs an NVIDIA GPU)
SUPPORTED_PRECISIONS = {
    "torch": ("fp32", "fp16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "int8"),
    "tensorrt": ("fp32", "fp16", "int8"),
}


def _importable(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:
        return f"not installed ({type(exc).__name__}: {exc}); try: {INSTALL_HINTS.get(module, 'pip install ' + module)}"


def available_runtimes() -> dict[str, str | None]:
    """runtime -> None when usable here, else the reason it is not."""
    status: dict[str, str | None] = {"torch": None}
    status["onnxruntime"] = _importable("onnxruntime")
    status["openvino"] = _importable("openvino")
    if status["openvino"] is None:
        import openvino

        if "CPU" not in openvino.Core().available_devices:
            status["openvino"] = "OpenVINO finds no CPU device here"
    status["tensorrt"] = _importable("tensorrt")
    if status["tensorrt"] is None and not torch.cuda.is_available():
        status["tensorrt"] = "no CUDA GPU usable by PyTorch here (TensorRT needs an NVIDIA GPU)"
    return status


def choose_runtime(precision: str) -> tuple[str, str]:
    """The fastest usable runtime for ``precision`` here, with a one-line reason."""
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
    status = available_runtimes()
    if status["tensorrt"] is None:
        return "tensorrt", "TensorRT: fastest runtime on this NVIDIA GPU"
    if precision == "fp16":
        if torch.cuda.is_available():
            return "torch", f"PyTorch CUDA: FP16 without TensorRT ({status['tensorrt']})"
        raise EngineUnavailable("FP16 needs an NVIDIA GPU (TensorRT or PyTorch CUDA); use fp32 or int8 on this CPU.")
    if status["openvino"] is None:
        return "openvino", "OpenVINO: fastest CPU runtime (no NVIDIA GPU/TensorRT here)"
    if status["onnxruntime"] is None:
        return "onnxruntime", f"ONNX Runtime: portable CPU runtime (OpenVINO {status['openvino']})"
    if precision == "fp32":
        return "torch", "PyTorch: the only runtime installed (no OpenVINO, ONNX Runtime or TensorRT)"
    raise EngineUnavailable("INT8 needs OpenVINO, ONNX Runtime or TensorRT; install one (pip install openvino).")


# Measured with TensorRT 8.6.0 on an H200 (benchmarks/results/h200-trt86/): ModelOpt's INT8 Q/DQ UNet ran at
# 0.95x FP16's latency at batch 1 and 1.10x at batch 4, with a plan as large as FP16's, so INT8 buys nothing there.
TENSORRT_AUTO_PRECISION = ("fp16", "TensorRT: FP16 (on TensorRT 8.6.0, H200, INT8 took 0.95-1.07x FP16's time at "
                           "batch 1 and 1.10-1.13x at batch 4, with a plan as large; other versions not measured; "
                           "--precision int8 runs INT8)")


# Measured with TensorRT 8.6.0 on an H100 (benchmarks/results/h100-trt86/2026-12-05-run4/): without a native
# InstanceNormalization the norms run as elementary ops; FP16 and INT8 plans need an overflow guard (a ReduceMax
# per norm) that took 38.6 of FP16's 55.7 ms and 491 of INT8's 592 ms (SegResNet, batch 4), so FP32 is fastest there.
TENSORRT_DECOMPOSED_NORM_PRECISION = (
    "fp32", "TensorRT: FP32 (this TensorRT has no native InstanceNormalization, so the model's norms run as "
    "elementary ops, and in FP16 and INT8 plans their overflow guard dominates: SegResNet on TensorRT 8.6.0, H100, "
    "batch 1 / 4: FP32 10.7 / 24.4 ms, FP16 41.0 / 55.4 ms, INT8 303 / 591 ms; TensorRT 8.6.1 or newer has a "
    "native one; --precision fp16|int8 runs them)")


def choose_precision(runtime: str, onnx_files: Sequence[str | Path] = ()) -> tuple[str, str]:
    """Precision for ``--precision auto`` on ``runtime`` ("auto" resolved as :func:`choose_runtime` would),
    with a one-line reason: FP16 on TensorRT (FP32 where ``onnx_files``, the model's ONNX, have InstanceNorms
    this TensorRT would decompose), INT8 on the CPU runtimes, FP32 for the PyTorch reference."""
    if runtime == "auto":
        runtime, _ = choose_runtime("int8")
    if runtime == "tensorrt":
        from .tensorrt_engine import decomposes_instancenorm

        if onnx_files and decomposes_instancenorm(onnx_files):
            return TENSORRT_DECOMPOSED_NORM_PRECISION
        return TENSORRT_AUTO_PRECISION
    if runtime == "torch":
        return "fp32", "PyTorch: the FP32 reference (it has no INT8 engine)"
    return "int8", f"{runtime}: INT8 (the quantized model)"


def _artifact(path: str | Path | None, what: str, hint: str) -> Path:
    if path is None:
        raise ModelError(f"No {what} was given; {hint}")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} '{path}' does not exist; {hint}")
    return path


def create_engine(
    runtime: str,
    precision: str,
    *,
    fp32_onnx: str | Path | None = None,
    int8_onnx: str | Path | None = None,
    torch_model: torch.nn.Module | None = None,
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    threads: int | None = None,
    max_batch: int = 4,
    monitor: Monitor | None = None,
    torch_compile: str | None = None,
    float_precision: str | None = None,
) -> Engine:
    """An engine for ``runtime`` ("auto" picks one) at ``precision``, from the matching artifact.
    ``float_precision`` (OpenVINO): what layers left in floating point run in, for FP32 engines too (default:
    f32 for FP32, ``$PTQSEG_CPU_FLOAT`` or f32 for INT8's remainder).

    fp32 runs ``fp32_onnx`` (or ``torch_model`` for "torch"), int8 runs ``int8_onnx``; TensorRT plans
    (and the FP16 ONNX TensorRT needs) are built once and kept in ``cache_dir``.
    """
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
    if runtime == "auto":
        runtime, _ = choose_runtime(precision)
    if runtime not in RUNTIMES:
        raise InputError(f"Unknown runtime {runtime!r}; choose one of {('auto',) + RUNTIMES}.")
    if torch_compile is not None and runtime != "torch":
        raise InputError(f"torch.compile (--torch-compile) is for the PyTorch runtime, not '{runtime}'; "
                         "add --runtime torch or leave --torch-compile out.")
    reason = available_runtimes()[runtime]
    if reason is not None:
        raise EngineUnavailable(f"Runtime '{runtime}' cannot run here: {reason}.")
    if precision not in SUPPORTED_PRECISIONS[runtime]:
        raise EngineUnavailable(
            f"Runtime '{runtime}' does not run {precision}; it runs {SUPPORTED_PRECISIONS[runtime]}."
        )
    if runtime in ("torch", "onnxruntime") and device is not None:
        device = device.lower()  # torch device names
    if runtime == "torch":
        if torch_model is None:
            raise ModelError("The 'torch' runtime needs the PyTorch model (a spec with weights), not only ONNX files.")
        from .torch_engine import TorchEngine

        return TorchEngine(torch_model, precision, device=device, weights_path=weights_path, compile=torch_compile)

    if precision == "int8":
        onnx_path = _artifact(int8_onnx, "INT8 ONNX", "quantize the model first (ptqseg quantize) or pick fp32.")
    else:
        onnx_path = _artifact(fp32_onnx, "FP32 ONNX", "export the model first (ptqseg quantize writes fp32.onnx).")
    if runtime == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(onnx_path, precision, device=device, threads=threads)
    if runtime == "openvino":
        from .openvino_engine import OpenVINOEngine

        ov_cache = None if cache_dir is None else Path(cache_dir) / "openvino"
        ov_device = "CPU" if device in (None, "cpu", "CPU") else device  # OpenVINO device names
        return OpenVINOEngine(onnx_path, precision, device=ov_device, threads=threads, cache_dir=ov_cache,
                              float_precision=float_precision)
    return _tensorrt_engine(onnx_path, precision, cache_dir, device, max_batch, monitor or Monitor())


def _tensorrt_engine(onnx_path: Path, precision: str, cache_dir, device, max_batch: int, monitor: Monitor) -> Engine:
    if precision == "int8":  # refuse before a build of minutes fails inside TensorRT's parser
        from ..onnx_graph.qdq_check import uint8_quantizers

        uint8 = uint8_quantizers(onnx_path)
        if uint8:
            raise InputError(f"This INT8 model was quantized for ONNX Runtime (uint8 activations, {len(uint8)} "
                             "quantizers); TensorRT runs int8 Q/DQ only. Quantize it again on this computer "
                             "(ptqseg quantize --placement auto or modelopt), or run it with --runtime onnxruntime.")
    from .tensorrt_engine import tensorrt_engine_for

    return tensorrt_engine_for(onnx_path, precision, cache_dir, device, max_batch, monitor)
