"""OpenVINO: the fast CPU runtime; reads the FP32 ONNX and the Q/DQ INT8 ONNX (convolutions run in i8)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.errors import EngineUnavailable, InputError, ModelError
from ..core.sysinfo import amx_int8_in_use
from .base import EngineInfo

CONV_LAYER_TYPES = ("Convolution", "Deconvolution", "GroupConvolution", "FullyConnected", "MatMul")
INT8_PRECISIONS = ("i8", "u8")
FLOAT_PRECISIONS = ("f32", "bf16")
MAX_SHAPES = 4  # input shapes with a compiled request kept at once (the sliding window pads to one batch size)
PREFERRED_BATCH, LOGITS_BUDGET_BYTES = 4, 256 * 2**20  # default windows per call, and their logits' cap
FLOAT_ENV = "PTQSEG_CPU_FLOAT"  # set by `ptqseg --cpu-float`, so Ray workers and Slicer's process inherit it


_NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def native_bf16(core, device: str = "CPU") -> bool:
    """Whether OpenVINO runs bf16 natively here: the device reports BF16 and no ``ONEDNN_MAX_CPU_ISA`` cap
    below AVX512_CORE_BF16 is set (OpenVINO still reports BF16 under such a cap, then emulates it)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_BF16_ISAS:
        return False
    return "BF16" in core.get_property(device if device != "AUTO" else "CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_float_precision(value: str | None = None) -> str:
    """The precision OpenVINO gives layers left in floating point: ``value``, else $PTQSEG_CPU_FLOAT, else f32."""
    value = value or os.environ.get(FLOAT_ENV) or "f32"
    if value not in FLOAT_PRECISIONS:
        raise InputError(f"CPU float precision must be one of {FLOAT_PRECISIONS}, got {value!r} "
                         f"(--cpu-float or ${FLOAT_ENV}).")
    return value


UNSIGNED_CONCATS_VERSION = 1  # bump when unsigned_concat_activations changes what it writes


class OpenVINOEngine:
    def __init__(
        self,
        onnx_path: str | Path,
        precision: str,
        device: str = "CPU",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        patch_size: Sequence[int] | None = None,
        float_precision: str | None = None,
    ):
        try:
            import openvino as ov
        except ImportError:
            raise EngineUnavailable("OpenVINO is not installed (pip install openvino).") from None
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelError(f"ONNX file '{onnx_path}' does not exist.")
        if precision == "fp16" and device.upper().startswith("CPU"):
            raise EngineUnavailable("OpenVINO on CPU runs fp32 or int8; fp16 needs TensorRT or PyTorch on an NVIDIA GPU.")
        core = ov.Core()
        if device not in core.available_devices and device != "AUTO":
            raise EngineUnavailable(f"OpenVINO device {device!r} is not available here (found {core.available_devices}).")
        self._cache_dir = None if cache_dir is None else Path(cache_dir)
        if self._cache_dir is not None:
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self._core, self._onnx_path = core, onnx_path
        self.unsigned_concats = precision == "int8" and device.upper().startswith("CPU") and not amx_int8_in_use()
        self._rewritten: Path | None = None  # the cached uint8-concat graph (``_rewritten_path``), once hashed
        try:
            model = self._read_model()
        except Exception as exc:
            raise ModelError(f"OpenVINO cannot read '{onnx_path}': {exc}") from None
        self._partial_shape = self._batch_dynamic_shape(ov, model.inputs[0].get_partial_shape(), patch_size)
        # FP32 engines stay FP32 (they are the agreement reference) unless a caller names a float precision for
        # them (segment --fp32-windows with --cpu-float bf16); $PTQSEG_CPU_FLOAT is for INT8's float remainder
        if precision == "int8":
            float_precision = cpu_float_precision(float_precision)
        else:
            float_precision = "f32" if float_precision is None else cpu_float_precision(float_precision)
        if float_precision == "bf16" and not native_bf16(core, device):
            float_precision = "f32"  # no native bf16 here: OpenVINO would emulate it, slower than f32
        config: dict = {"PERFORMANCE_HINT": "LATENCY"}
        # AMX CPUs default to bf16 for float layers; f32 (the default here) keeps FP32 and the float parts of
        # INT8 exact. bf16 on request: the float remainder of an INT8 graph (output conv accumulation, norms,
        # reorders) then runs in bf16 -- on the real-CT model labels agree with f32 to 0.9999 (docs).
        config["INFERENCE_PRECISION_HINT"] = "f16" if precision == "fp16" else float_precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._ov, self._core, self._device_name, self._config = ov, core, device, config
        self._onnx_path = onnx_path
        # input shape -> (request, output, channels-last), least recently used first
        self._requests: dict[tuple[int, ...], tuple] = {}
        first = self._partial_shape
        if all(d.is_static for d in list(first)[1:]):
            first = ov.PartialShape([1] + list(first)[1:])  # the usual call: one window
        self.compiled = self._compile(first, model)  # compiled now: a model OpenVINO cannot run fails here
        if first.is_static:
            self._requests[tuple(d.get_length() for d in first)] = self._bind(self.compiled, True)
        self.precision = precision
        self.float_precision = float_precision  # what OpenVINO gives layers left in floating point
        self.device = torch.device("cpu")  # inputs and outputs live in host memory
        self.fixed_batch = True  # a request per input shape: callers pad a last partial batch (one shape)
        self.info = EngineInfo(
            runtime="openvino",
            precision=precision,
            device=f"{device} (OpenVINO{', bf16 float layers' if float_precision == 'bf16' else ''})",
            runtime_version=ov.__version__,
            bytes_on_disk=onnx_path.stat().st_size,
            path=str(onnx_path),
        )

    def _read_model(self):
        """The ONNX file as OpenVINO compiles it. INT8 on a CPU without AMX: quantizers after a Concat as uint8
        (the same values; OpenVINO 2026.4 runs int8 ``Concat -> Q -> DQ -> Conv`` wrongly there, see
        ``onnx_graph.weight_range.unsigned_concat_activations``); the file itself is never changed. The rewritten
        graph (or a mark that it needs none) is kept in the engine cache: later runs read it without importing
        the onnx package (0.65 s on the 2-core development machine, most of a cached engine's load)."""
        if not self.unsigned_concats:
            return self._core.read_model(str(self._onnx_path))
        rewritten = self._rewritten_path()
        if rewritten is not None and rewritten.is_file():
            return self._core.read_model(str(rewritten if rewritten.stat().st_size else self._onnx_path))
        import onnx

        from ..onnx_graph.weight_range import unsigned_concat_activations

        proto = onnx.load(str(self._onnx_path))
        changed = unsigned_concat_activations(proto)
        data = proto.SerializeToString() if changed else b""  # empty: "nothing to rewrite"
        if rewritten is not None:
            from ..core.fileio import atomic_write_bytes

            try:
                atomic_write_bytes(rewritten, data)
            except OSError:
                pass  # a read-only cache: rewritten again next time
        return self._core.read_model(data) if changed else self._core.read_model(str(self._onnx_path))

    def _rewritten_path(self) -> Path | None:
        """Where the uint8-concat graph of this ONNX file lives in the engine cache, named by the file's content
        (a cache folder given by hand may serve several models); None without a cache."""
        if self._cache_dir is None:
            return None
        if self._rewritten is None:  # hashed once per engine, not per compiled shape
            from ..core.fileio import sha256_file

            digest = sha256_file(self._onnx_path)[:24]
            self._rewritten = self._cache_dir / f"unsigned-concats-v{UNSIGNED_CONCATS_VERSION}-{digest}.onnx"
        return self._rewritten

    @staticmethod
    def _batch_dynamic_shape(ov, shape, patch_size: Sequence[int] | None):
        dims = list(shape)
        if len(dims) != 5:
            raise ModelError(f"Expected a 5-D (N, C, D, H, W) network input, got shape {shape}.")
        dims[0] = ov.Dimension()  # dynamic batch
        if patch_size is not None:
            dims[2:] = [ov.Dimension(int(s)) for s in patch_size]
        return ov.PartialShape(dims)

    def _compile(self, shape, model=None):
        """Compile for ``shape``; a static shape gets channels-last logits (see ``_channels_last_output``).
        The model is read again for later shapes rather than kept: its weights would double the memory."""
        try:
            model = model if model is not None else self._read_model()
            model.reshape({model.inputs[0]: shape})
            if shape.is_static:
                model = self._channels_last_output(self._ov, model)
            if self._cache_dir is None:
                return self._core.compile_model(model, self._device_name, self._config)
            return self._compile_cached(model)
        except Exception as exc:
            raise ModelError(f"OpenVINO cannot compile '{self._onnx_path}' for {self._device_name} "
                             f"(input {shape}): {exc}") from None

    def _compile_cached(self, model):
        """Processes sharing the cache (Ray workers, two ptqseg runs) compile one at a time: OpenVINO maps its
        cache blobs into memory, and one process rewriting a blob another has mapped crashes it. OpenVINO
        writes its blobs 0440: they get the mode the umask gives other outputs."""
        from .cache import file_lock, follow_umask

        with file_lock(self._cache_dir / ".openvino-compile.lock"):
            before = {path.name for path in self._cache_dir.glob("*.blob")}
            compiled = self._core.compile_model(model, self._device_name, self._config)
            follow_umask([path for path in self._cache_dir.glob("*.blob") if path.name not in before])
        return compiled

    def _bind(self, compiled, channels_last: bool) -> tuple:
        return compiled.create_infer_request(), compiled.outputs[0], channels_last

    @staticmethod
    def _channels_last_output(ov, model):
        """Hand the logits out as (N, D, H, W, C). The output conv writes them channels-last, so OpenVINO
        drops its final reorder to (N, C, D, H, W): 1.6-1.8 ms of a 96^3 UNet call on a 16-core Xeon, 11-20%.
        Only for static shapes: with a dynamic batch OpenVINO keeps the transpose as a separate, slower step."""
        ppp = ov.preprocess.PrePostProcessor(model)
        ppp.output(0).model().set_layout(ov.Layout("NCDHW"))
        ppp.output(0).tensor().set_layout(ov.Layout("NDHWC"))
        return ppp.build()

    def _request_for(self, shape: tuple[int, ...]) -> tuple:
        """The request compiled for exactly this input shape; the least recently used of MAX_SHAPES goes."""
        bound = self._requests.pop(shape, None)
        if bound is None:
            if not self._partial_shape.compatible(self._ov.PartialShape(list(shape))):
                raise ModelError(f"OpenVINO engine: a batch of shape {shape} does not fit the network's input "
                                 f"{self._partial_shape}; check the spec's patch size and input channels.")
            if len(self._requests) >= MAX_SHAPES:
                self._requests.pop(next(iter(self._requests)))
            bound = self._bind(self._compile(self._ov.PartialShape(list(shape))), True)
        self._requests[shape] = bound  # most recently used last
        return bound

    def preferred_batch(self, num_classes: int, patch_size: Sequence[int]) -> int:
        """Windows per call when the caller leaves it open: 4 where their float logits fit in 256 MB. On a
        16-core Xeon 4 windows per call cut a 96^3 UNet's INT8 network time for a CT by 38% (2 cores: 15%)."""
        window_bytes = 4 * num_classes * int(np.prod([int(s) for s in patch_size]))
        return int(max(1, min(PREFERRED_BATCH, LOGITS_BUDGET_BYTES // max(window_bytes, 1))))

    def prepare(self, batch_size: int) -> None:
        """Compile the request for batches of ``batch_size`` windows now, not inside the first timed call."""
        dims = list(self._partial_shape)[1:]
        if all(d.is_static for d in dims):
            self._request_for((int(batch_size), *(d.get_length() for d in dims)))

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, C, D, H, W)-shaped view of the request's own channels-last output buffer."""
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        request, output, channels_last = self._request_for(tuple(array.shape))
        logits = torch.from_numpy(request.infer({0: array}, share_inputs=True, share_outputs=True)[output])
        return logits.permute(0, 4, 1, 2, 3) if channels_last else logits

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Fresh (N, C, D, H, W) logits with channels-last strides: one plain copy out of the request's buffer
        (a contiguous (N, C, D, H, W) copy would cost a transpose that OpenVINO just saved)."""
        return self._infer(batch).clone(memory_format=torch.preserve_format)

    def forward_transient(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits read in place from the request's buffer, valid only until the next call.

        For consumers that use each result before asking for the next (the sliding window): copying a
        fresh 14 x 96^3 float array out costs about 15 ms a window on a 16-core Xeon, a third of an INT8 call.
        """
        return self._infer(batch)

    def layer_precisions(self) -> dict[str, tuple[str, str]]:
        """Executed layers of the compiled model: friendly name -> (layer type, runtime precision)."""
        layers = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" in info and "runtimePrecision" in info:
                layers[op.get_friendly_name()] = (info["layerType"].astype(str), info["runtimePrecision"].astype(str))
        return layers

    def int8_layer_summary(self) -> dict:
        """How many convolution-like layers execute in int8 (i8/u8) and which do not."""
        convs = {name: prec for name, (kind, prec) in self.layer_precisions().items() if kind in CONV_LAYER_TYPES}
        int8 = sorted(name for name, prec in convs.items() if prec in INT8_PRECISIONS)
        other = sorted(name for name, prec in convs.items() if prec not in INT8_PRECISIONS)
        return {
            "convolutions": len(convs),
            "int8": len(int8),
            "not_int8": len(other),
            "int8_layers": int8,
            "not_int8_layers": other,
            "precisions": dict(Counter(convs.values())),
        }
