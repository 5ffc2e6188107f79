"""TensorRT: builds a plan from the FP32 / FP16 / Q/DQ INT8 ONNX and runs it on torch CUDA tensors.

TensorRT is imported lazily (this module imports fine without it). Builder differences are feature
detected, not parsed from version strings (see /work/shared/notes/tensorrt.md):
- 10.x/11.x: strongly-typed network, precision follows the ONNX types; never set precision flags.
  An FP16 engine needs an FP16 ONNX (:func:`make_fp16_onnx`).
- 8.6: EXPLICIT_BATCH; INT8 (+FP16) flags for Q/DQ graphs, FP16 flag for fp16. DQ-only INT8 weights
  are turned back into FP32 + Q/DQ (:func:`dq_only_to_qdq`) before parsing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import Cancelled, EngineUnavailable, ModelError
from ..fileio import atomic_path, atomic_write_bytes
from ..progress import Monitor
from .base import EngineInfo


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EngineUnavailable("TensorRT is not installed (pip install tensorrt; needs an NVIDIA GPU).") from None
    return tensorrt


def make_fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """FP16 copy of an FP32 ONNX with FP32 inputs/outputs (for strongly-typed TensorRT FP16 engines)."""
    from onnxconverter_common import float16

    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise ModelError(f"Cannot read ONNX '{src}': {exc}") from None
    fp16 = float16.convert_float_to_float16(model, keep_io_types=True)
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(fp16, str(tmp))
    return dst


def _along_axis(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-tensor values stay scalars; per-channel values broadcast along ``axis``."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0:
        return values
    return values.reshape([-1 if i == axis % ndim else 1 for i in range(ndim)])


def dq_only_to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn INT8 weight initializers + DequantizeLinear into FP32 initializer + QuantizeLinear + DequantizeLinear.

    Same scales, zero points and axis, so the dequantized weights are bit-identical; the file gets
    ~4x larger, which is why this runs only at build time for TensorRT versions that need it.
    Returns a new model; the argument is not modified.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes = []
    for node in graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if weight is None or weight.data_type != onnx.TensorProto.INT8 or attrs.get("block_size"):
            new_nodes.append(node)
            continue
        q = numpy_helper.to_array(weight).astype(np.float32)
        axis = attrs.get("axis", 1)
        scale = numpy_helper.to_array(inits[node.input[1]])
        zero = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
        weight_float = (q - _along_axis(zero, q.ndim, axis)) * _along_axis(scale, q.ndim, axis)
        float_name = f"{weight.name}_float"
        graph.initializer.append(numpy_helper.from_array(weight_float.astype(scale.dtype), float_name))
        quantized_name = f"{weight.name}_QuantizeLinear_Output"
        new_nodes.append(onnx.helper.make_node(
            "QuantizeLinear", [float_name, *node.input[1:]], [quantized_name],
            name=f"{node.name or weight.name}_weight_QuantizeLinear",
            **({"axis": attrs["axis"]} if "axis" in attrs else {}),
        ))
        node.input[0] = quantized_name
        new_nodes.append(node)
        users[weight.name] -= 1
        if users[weight.name] == 0:
            graph.initializer.remove(weight)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


def _progress_adapter(trt, monitor: Monitor):
    """TensorRT's IProgressMonitor (10.x+) reporting to our Monitor; returning False cancels the build."""

    class Adapter(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.cancelled = False
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps

        def step_complete(self, phase_name, step):
            try:
                monitor.update(f"TensorRT: {phase_name}", step + 1, self.steps.get(phase_name, step + 1))
                return True
            except Cancelled:
                self.cancelled = True
                return False

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Adapter()


def build_tensorrt_plan(
    onnx_path: str | Path,
    precision: str,
    plan_path: str | Path,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 4,
    workspace_bytes: int = 2 << 30,
    timing_cache_path: str | Path | None = None,
    optimization_level: int | None = None,
    monitor: Monitor | None = None,
) -> Path:
    """Build a serialized TensorRT engine from ``onnx_path`` and write it atomically to ``plan_path``."""
    monitor = monitor or Monitor()
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    creation_flags = trt.NetworkDefinitionCreationFlag
    # 11.x: always strongly typed (no INT8 builder flag); 10.x: opt in; 8.x: explicit batch + precision flags
    strongly_typed = hasattr(creation_flags, "STRONGLY_TYPED") or not hasattr(trt.BuilderFlag, "INT8")
    if hasattr(creation_flags, "STRONGLY_TYPED"):
        flags = 1 << int(creation_flags.STRONGLY_TYPED)
    elif hasattr(creation_flags, "EXPLICIT_BATCH"):
        flags = 1 << int(creation_flags.EXPLICIT_BATCH)
    else:
        flags = 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if hasattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM"):
        # 8.6 otherwise maps InstanceNormalization to a plugin that needs cuDNN 8 at run time
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    monitor.update("TensorRT: parse", 0, 1)
    model = onnx.load(str(onnx_path))
    if not strongly_typed and precision == "int8":
        model = dq_only_to_qdq(model)
    if strongly_typed and precision == "fp16" and not _has_fp16_tensors(model):
        raise ModelError("This TensorRT is strongly typed: an fp16 engine needs an FP16 ONNX (make_fp16_onnx).")
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse '{onnx_path}': {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32, comparable to PyTorch
    if not strongly_typed:
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized may use FP16
        elif precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ModelError(f"TensorRT input '{tensor.name}' needs static channel/spatial sizes, got {tuple(tensor.shape)}.")
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    timing_cache_path = Path(timing_cache_path) if timing_cache_path else None
    cached = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cached)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    progress = _progress_adapter(trt, monitor) if hasattr(trt, "IProgressMonitor") else None
    if progress is not None:
        config.progress_monitor = progress
    monitor.update("TensorRT: build", 0, 1)
    serialized = builder.build_serialized_network(network, config)
    if progress is not None and progress.cancelled:
        raise Cancelled("TensorRT build cancelled by the user; no engine was written.")
    if serialized is None:
        raise ModelError(f"TensorRT failed to build a {precision} engine from '{onnx_path}' (see the TensorRT log above).")
    plan_path = Path(plan_path)
    atomic_write_bytes(plan_path, bytes(serialized))
    if timing_cache_path is not None:
        atomic_write_bytes(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    monitor.update("TensorRT: build", 1, 1)
    return plan_path


def _has_fp16_tensors(model: onnx.ModelProto) -> bool:
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


class TensorRTEngine:
    """Runs a serialized plan on the current CUDA stream; inputs and outputs are torch CUDA tensors."""

    def __init__(self, plan_path: str | Path, precision: str, device: str | torch.device | None = None):
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
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.precision = precision
        self.info = EngineInfo(
            runtime="tensorrt",
            precision=precision,
            device=f"{self.device} ({torch.cuda.get_device_name(self.device)})",
            runtime_version=trt.__version__,
            bytes_on_disk=plan_path.stat().st_size,
            path=str(plan_path),
        )

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        return {trt.float32: torch.float32, trt.float16: torch.float16}[self.engine.get_tensor_dtype(name)]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to(self.device, self._torch_dtype(self.input_name)).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ModelError(f"TensorRT engine does not accept input shape {tuple(x.shape)} (outside its batch profile).")
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                          dtype=self._torch_dtype(self.output_name), device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        with torch.cuda.device(self.device):
            if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise ModelError("TensorRT execution failed (see the TensorRT log).")
        return out.float()
