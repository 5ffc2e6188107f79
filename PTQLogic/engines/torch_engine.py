"""PyTorch runtime: the reference FP32 engine (CPU or CUDA) and FP16 on CUDA."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import EngineUnavailable, InputError
from .base import EngineInfo


class TorchEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        precision: str = "fp32",
        device: str | torch.device | None = None,
        weights_path: str | Path | None = None,
    ):
        if precision not in ("fp32", "fp16"):
            raise EngineUnavailable(
                f"PyTorch runs fp32 or fp16, not {precision!r}; use onnxruntime, openvino or tensorrt for int8."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("PyTorch cannot use CUDA here (no NVIDIA GPU or a CPU-only torch build); use device 'cpu'.")
        if precision == "fp16" and self.device.type != "cuda":
            raise EngineUnavailable("FP16 with PyTorch needs a CUDA GPU (CPU FP16 convolutions are slow and inexact); use fp32 on CPU.")
        self.precision = precision
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        # eval()/to() change a module in place: work on a copy unless nothing would change
        params = [p for p in model.parameters()] or [torch.zeros(0)]
        unchanged = not model.training and all(p.device == self.device and p.dtype == self._dtype for p in params)
        model = model if unchanged else copy.deepcopy(model)
        self.model = model.eval().to(device=self.device, dtype=self._dtype)
        if weights_path is not None:
            weights_path = Path(weights_path)
            if not weights_path.is_file():
                raise InputError(f"Weights file '{weights_path}' does not exist.")
            size = weights_path.stat().st_size
        else:
            tensors = list(self.model.parameters()) + list(self.model.buffers())
            size = sum(t.numel() * t.element_size() for t in tensors)
        self.info = EngineInfo(
            runtime="torch",
            precision=precision,
            device=str(self.device),
            runtime_version=torch.__version__,
            bytes_on_disk=int(size),
            path=None if weights_path is None else str(weights_path),
        )

    def forward_native(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits in the engine's own precision (FP16 stays FP16), for callers that blend in that precision."""
        with torch.inference_mode():
            return self.model(batch.to(device=self.device, dtype=self._dtype))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(batch.to(device=self.device, dtype=self._dtype))
        if logits.dtype != torch.float32:
            return logits.float()
        # a caller outside inference mode may modify the result in place (inference tensors refuse that), so
        # it gets a copy; a caller inside inference mode (the GPU pipeline) saves that copy's memory
        return logits if torch.is_inference_mode_enabled() else logits.clone()
