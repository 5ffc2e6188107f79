"""PyTorch runtime: the reference FP32 engine (CPU or CUDA) and FP16 on CUDA.

Speed options (same labels, see Testing/test_resident_speed_options.py): cuDNN's per-shape algorithm
search (``cudnn_benchmark``, on by default on CUDA, scoped to this engine's calls), the channels-last
memory layout for 3D convolutions (``channels_last``) and ``torch.compile`` (``compile``: a mode name).
A compiled engine wants one batch shape: the GPU pipeline pads its last batch (``fixed_batch``).
"""
from __future__ import annotations

import copy
import locale
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..core.errors import EngineUnavailable, InputError
from .base import EngineInfo

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


@contextmanager
def _utf8_text_files() -> Iterator[None]:
    """UTF-8 as the default text encoding while inductor reads its (UTF-8) kernel templates: ITK's DICOM
    reader leaves the process in the "C" locale, where ``open()`` decodes ASCII and compiling fails."""
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        yield
        return
    previous = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    except locale.Error:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            locale.setlocale(locale.LC_CTYPE, previous)


@contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class TorchEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        precision: str = "fp32",
        device: str | torch.device | None = None,
        weights_path: str | Path | None = None,
        *,
        channels_last: bool = False,
        compile: str | None = None,
        cudnn_benchmark: bool = True,
    ):
        if precision not in ("fp32", "fp16"):
            raise EngineUnavailable(
                f"PyTorch runs fp32 or fp16, not {precision!r}; use onnxruntime, openvino or tensorrt for int8."
            )
        if compile is not None and compile not in COMPILE_MODES:
            raise InputError(f"Unknown torch.compile mode {compile!r}; choose one of {COMPILE_MODES} (or none).")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("PyTorch cannot use CUDA here (no NVIDIA GPU or a CPU-only torch build); use device 'cpu'.")
        if precision == "fp16" and self.device.type != "cuda":
            raise EngineUnavailable("FP16 with PyTorch needs a CUDA GPU (CPU FP16 convolutions are slow and inexact); use fp32 on CPU.")
        self.precision = precision
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        self.channels_last = channels_last
        self.compile_mode = compile
        self.cudnn_benchmark = cudnn_benchmark and self.device.type == "cuda"
        self.compile_seconds: float | None = None  # the first (compiling) call's wall time, once it ran
        # eval()/to() change a module in place: work on a copy unless nothing would change
        params = [p for p in model.parameters()] or [torch.zeros(0)]
        unchanged = (not model.training and not channels_last
                     and all(p.device == self.device and p.dtype == self._dtype for p in params))
        model = model if unchanged else copy.deepcopy(model)
        self.model = model.eval().to(device=self.device, dtype=self._dtype)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        with _utf8_text_files():
            self._run = self.model if compile is None else torch.compile(self.model, mode=compile, dynamic=False)
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

    def options(self) -> dict:
        return {"channels_last": self.channels_last, "compile": self.compile_mode,
                "cudnn_benchmark": self.cudnn_benchmark}

    @property
    def fixed_batch(self) -> bool:
        """Whether callers should keep one batch shape (pad the last batch): a compiled engine recompiles
        for every new shape."""
        return self.compile_mode is not None

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        first = self.compile_mode is not None and self.compile_seconds is None
        started = time.perf_counter()
        # an FP32 engine runs FP32 inside a caller's autocast too: nnunetv2's predictor wraps every CUDA sliding
        # window in one, which would run this engine's convolutions in FP16
        own_precision = (torch.autocast(self.device.type, enabled=False) if self._dtype == torch.float32
                         else contextlib.nullcontext())
        with torch.inference_mode(), _cudnn_benchmark(self.cudnn_benchmark), own_precision, \
                (_utf8_text_files() if first else contextlib.nullcontext()):
            x = batch.to(device=self.device, dtype=self._dtype)
            if self.channels_last and x.dim() == 5:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if self.compile_mode is not None and not x.is_inference():
                x = x.clone()  # one compiled graph for every caller: inputs made outside inference mode recompile
            if self.compile_mode in ("reduce-overhead", "max-autotune"):
                torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs are consumed
            try:
                logits = self._run(x)
            except Exception as exc:
                if not first:
                    raise
                raise EngineUnavailable(f"torch.compile (mode {self.compile_mode!r}) failed on its first call: "
                                        f"{type(exc).__name__}: {str(exc)[:500]}; leave --torch-compile out.") from exc
            if self.channels_last or self.compile_mode in ("reduce-overhead", "max-autotune"):
                # callers get plain layouts and a tensor the next CUDA-graph replay does not overwrite
                logits = logits.clone(memory_format=torch.contiguous_format)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds = time.perf_counter() - started
        return logits

    def forward_native(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits in the engine's own precision (FP16 stays FP16), for callers that blend in that precision."""
        return self._forward(batch)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self._forward(batch)
        if logits.dtype != torch.float32:
            return logits.float()
        # a caller outside inference mode may modify the result in place (inference tensors refuse that), so
        # it gets a copy; a caller inside inference mode (the GPU pipeline) saves that copy's memory
        return logits if torch.is_inference_mode_enabled() else logits.clone()
