"""TensorRT runner: a serialized plan run on torch CUDA tensors, on its own CUDA stream.

I/O addresses must be 256-byte aligned (a batch slice need not be: :func:`aligned` copies it), every
``set_tensor_address`` result is checked, and work is enqueued on a dedicated stream and waited for.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..core.errors import EngineUnavailable, ModelError
from .base import EngineInfo

ALIGNMENT = 256  # bytes; TensorRT's required alignment of I/O tensor addresses


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EngineUnavailable("TensorRT is not installed (pip install tensorrt; needs an NVIDIA GPU).") from None
    return tensorrt


def torch_dtype(trt, dtype) -> torch.dtype:
    """torch dtype of a TensorRT I/O tensor type; a clear error for types torch cannot hold."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
             "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}
    for name, torch_type in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return torch_type
    raise ModelError(f"The TensorRT engine has an input/output of type {getattr(dtype, 'name', dtype)}, which this runner cannot pass; "
                     "export the model with float32/float16 inputs and outputs.")


def aligned(tensor: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """``tensor`` if contiguous at an ``alignment``-byte address, else a copy that is (TensorRT needs 256)."""
    if tensor.is_contiguous() and tensor.data_ptr() % alignment == 0:
        return tensor
    extra = alignment // tensor.element_size()
    buffer = torch.empty(tensor.numel() + extra, dtype=tensor.dtype, device=tensor.device)
    offset = (-buffer.data_ptr() % alignment) // tensor.element_size()
    out = buffer[offset:offset + tensor.numel()].view(tensor.shape)
    out.copy_(tensor)
    return out


def bind(context, name: str, tensor: torch.Tensor) -> None:
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise ModelError(f"TensorRT rejected the address of tensor '{name}' (it must be {ALIGNMENT}-byte aligned "
                         "device memory); see the TensorRT log.")


def enqueue(context, stream) -> None:
    """Run on ``stream`` (a dedicated stream: enqueueing on the legacy default stream makes TensorRT add
    synchronizations) and wait for it, so outputs are ready on return."""
    if not stream.cuda_stream:
        raise ModelError("TensorRT must not run on the legacy default CUDA stream; use a dedicated stream.")
    if not context.execute_async_v3(stream.cuda_stream):
        raise ModelError("TensorRT execution failed (see the TensorRT log).")
    stream.synchronize()


# float32 logits of one call at most: batch 4 of a 118-class 128^3 network would need 4 GB of GPU memory for them
LOGITS_BYTES_PER_CALL = 1 << 30


def windows_per_call(opt_batch: int, num_classes: int, patch_size) -> int:
    """``opt_batch``, or fewer (at least 1) so that one call's float32 logits stay within LOGITS_BYTES_PER_CALL."""
    per_window = 4 * int(num_classes) * math.prod(int(s) for s in patch_size)
    return max(1, min(int(opt_batch), LOGITS_BYTES_PER_CALL // max(per_window, 1)))


def _opt_batch(engine, input_name: str) -> int:
    """The opt batch of the plan's first optimization profile; 1 where it cannot be read."""
    try:
        return max(1, int(engine.get_tensor_profile_shape(input_name, 0)[1][0]))
    except Exception:  # noqa: BLE001 - older plans / stand-ins: one window per call
        return 1


class TensorRTEngine:
    """Runs a serialized plan on its own CUDA stream; inputs and outputs are torch CUDA tensors."""

    def __init__(self, plan_path: str | Path, precision: str, device: str | torch.device | None = None,
                 build: dict[str, Any] | None = None):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineUnavailable("TensorRT needs an NVIDIA GPU with CUDA; none is usable here.")
        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise ModelError(f"TensorRT engine '{plan_path}' does not exist; build it first.")
        self.device = torch.device(device or "cuda")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                raise EngineUnavailable(
                    f"'{plan_path.name}': engine built for another TensorRT version or GPU, rebuild it."
                )
            self.context = self.engine.create_execution_context()
            self._stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name, self.output_name = inputs[0], outputs[0]
        self._input_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self._output_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        self.precision = precision
        self._opt_batch = _opt_batch(self.engine, self.input_name)
        self.info = EngineInfo(
            runtime="tensorrt",
            precision=precision,
            device=f"{self.device} ({torch.cuda.get_device_name(self.device)})",
            runtime_version=trt.__version__,
            bytes_on_disk=plan_path.stat().st_size,
            path=str(plan_path),
            build=build,
        )

    def preferred_batch(self, num_classes: int, patch_size) -> int:
        """Windows per call: the opt batch the plan's kernels were tuned for, fewer where the logits would be large."""
        return windows_per_call(self._opt_batch, num_classes, patch_size)

    def layer_summary(self, detail: bool = False) -> dict[str, Any] | None:
        """What the plan runs per precision (:func:`.trt_layers.layer_report`); None without an inspector."""
        from .trt_layers import layer_report

        report = layer_report(self._trt, self.engine)
        if report is not None and not detail:
            report.pop("detail", None)
        return report

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = aligned(batch.detach().to(self.device, self._input_dtype).contiguous())
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ModelError(f"TensorRT engine does not accept input shape {tuple(x.shape)} (outside its batch profile).")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self._output_dtype,
                          device=self.device)  # fresh allocations are 256-byte aligned
        bind(self.context, self.input_name, x)
        bind(self.context, self.output_name, out)
        with torch.cuda.device(self.device):
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # x was written on the caller's stream
            enqueue(self.context, self._stream)
        return out.float()
