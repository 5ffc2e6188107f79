"""A small stand-in for the ``tensorrt`` Python package, for testing PTQLogic's builder/runner logic without a GPU.

Every name, enum value and signature used here is copied from the real type stubs of the
``tensorrt-stubs`` 10.13.0.35.1 package (``tensorrt_bindings/tensorrt.pyi``, ``tensorrt/__init__.pyi``):
``Builder.create_network(flags: int = 0)``, ``IBuilderConfig.create_timing_cache(serialized_timing_cache)
-> ITimingCache``, ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch: bool) -> bool``,
``IProgressMonitor.step_complete(phase_name, step) -> bool``, ``IExecutionContext.set_tensor_address(name,
memory: int) -> bool``, ``execute_async_v3(stream_handle: int) -> bool``, ``DataType`` members and values,
``OnnxParserFlag.NATIVE_INSTANCENORM = 0``, ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH = 0 /
STRONGLY_TYPED = 1``. Older/newer versions differ as the issue documents from TensorRT's sources:
8.6.0 names the parser flag ``VERSION_COMPATIBLE`` (renamed ``NATIVE_INSTANCENORM`` in 8.6.1), 8.x has no
``STRONGLY_TYPED``/``IProgressMonitor``, 11.x has no ``BuilderFlag.INT8``.

Behaviour modelled on the documented binding behaviour: an exception raised in ``step_complete`` is
swallowed and the build stops (returns None); ``set_timing_cache`` returns False for a cache from another
device and pybind rejects ``None`` with a TypeError; ``create_timing_cache`` returns None for a damaged
blob; ``set_tensor_address`` returns False for an address that is not 256-byte aligned. A "plan" is JSON
describing what was built, so tests can see the recipe the builder really applied.
"""
from __future__ import annotations

import enum
import json
import types

import onnx

_ONNX_TO_DTYPE = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT8: "INT8",
                  onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
                  onnx.TensorProto.BFLOAT16: "BF16", onnx.TensorProto.UINT8: "UINT8"}


def make_tensorrt(version: str = "10.13.0.35", device: str = "Stand-in GPU") -> types.ModuleType:
    major, minor, patch = (int(p) for p in version.split(".")[:3])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # (what, detail) in call order, for assertions

    DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
                                          "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9, "FP4": 10, "E8M0": 11})
    trt.DataType = DataType
    for alias, member in (("float32", "FLOAT"), ("float16", "HALF"), ("bfloat16", "BF16"), ("int8", "INT8"),
                          ("int32", "INT32"), ("int64", "INT64"), ("bool", "BOOL"), ("uint8", "UINT8"),
                          ("fp8", "FP8"), ("int4", "INT4"), ("fp4", "FP4")):
        setattr(trt, alias, DataType[member])

    builder_flags = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5,
                     "TF32": 6, "PREFER_PRECISION_CONSTRAINTS": 11, "BF16": 17}
    if major >= 11:
        for removed in ("FP16", "INT8", "BF16"):
            builder_flags.pop(removed)
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", builder_flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0} if major < 10 else
        ({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 1}))
    parser_flag = "VERSION_COMPATIBLE" if (major, minor, patch) == (8, 6, 0) else "NATIVE_INSTANCENORM"
    trt.OnnxParserFlag = enum.IntEnum("OnnxParserFlag", {parser_flag: 0})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    # NvInferRuntime.h of 8.6: ProfilingVerbosity and TacticSource values; cuBLAS(LT)/cuDNN are on by default in 8.x
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.TacticSource = enum.IntEnum("TacticSource", {"CUBLAS": 0, "CUBLAS_LT": 1, "CUDNN": 2,
                                                     "EDGE_MASK_CONVOLUTIONS": 3, "JIT_CONVOLUTIONS": 4})
    default_sources = 0b11111 if major < 10 else 0b11000
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity: int = 1) -> None:
            self.min_severity = min_severity

    class ITensor:
        def __init__(self, name: str, shape: tuple, dtype) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class ILayer:
        """One layer per ONNX node, named after it (as the real parser names most layers)."""

        def __init__(self, name: str, op_type: str, num_outputs: int) -> None:
            self.name, self.type, self.num_outputs = name, op_type, num_outputs
            self.precision, self.output_types = None, {}

        def set_output_type(self, index: int, dtype) -> None:
            self.output_types[index] = dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.layers: list[ILayer] = []
            self.instancenorm = None

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> ITensor:
            return self.inputs[index]

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, index: int) -> ILayer:
            return self.layers[index]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.network, self.flags, self.errors = network, set(), []

        def set_flag(self, flag) -> None:
            self.flags.add(int(flag))

        def parse(self, model: bytes, path: str = None) -> bool:
            proto = onnx.ModelProto.FromString(bytes(model))
            inits = {i.name for i in proto.graph.initializer}

            def tensor(value):
                t = value.type.tensor_type
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
                return ITensor(value.name, dims, DataType[_ONNX_TO_DTYPE[t.elem_type]])

            self.network.inputs = [tensor(v) for v in proto.graph.input if v.name not in inits]
            self.network.outputs = [tensor(v) for v in proto.graph.output]
            self.network.layers = [ILayer(n.name, n.op_type, len(n.output)) for n in proto.graph.node]
            self.network.op_types = sorted({n.op_type for n in proto.graph.node})
            has_norm = any(n.op_type == "InstanceNormalization" for n in proto.graph.node)
            # 10+: native by default; 8.6: native only with the flag, else the cuDNN-8 plugin
            native = major >= 10 or 0 in self.flags
            self.network.instancenorm = None if not has_norm else ("native" if native else "plugin")
            self.network.float_types = sorted({onnx.TensorProto.DataType.Name(i.data_type)
                                               for i in proto.graph.initializer})
            # 8.6.0 has no INT8 trilinear 3D Resize: a DQ feeding one failed the build on an H100
            producers = {out: n.op_type for n in proto.graph.node for out in n.output}
            self.network.dequantized_interpolations = sorted(
                n.name for n in proto.graph.node if n.op_type == "Resize"
                and producers.get(n.input[0]) == "DequantizeLinear"
                and next((a.s for a in n.attribute if a.name == "mode"), b"nearest") != b"nearest")
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int):
            return self.errors[index]

    class ITimingCache:
        def __init__(self, device_name: str, entries: int = 0) -> None:
            self.device_name, self.entries = device_name, entries

        def serialize(self) -> bytes:
            return f"TIMING:{self.device_name}:{self.entries}".encode()

        def reset(self) -> bool:
            self.entries = 0
            return True

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None: ...

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None: ...

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, input: str, min, opt, max) -> None:
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags = {int(trt.BuilderFlag.TF32)} if hasattr(trt.BuilderFlag, "TF32") else set()
            self.pools, self.profiles = {}, []
            self.builder_optimization_level = 3
            self.progress_monitor = None
            self._timing_cache = None
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            self._tactic_sources = default_sources

        def get_tactic_sources(self) -> int:
            return self._tactic_sources

        def set_tactic_sources(self, tactic_sources: int) -> bool:
            self._tactic_sources = int(tactic_sources)
            return True

        def set_memory_pool_limit(self, pool, pool_size: int) -> None:
            self.pools[int(pool)] = int(pool_size)

        def set_flag(self, flag) -> None:
            self.flags.add(int(flag))

        def clear_flag(self, flag) -> None:
            self.flags.discard(int(flag))

        def get_flag(self, flag) -> bool:
            return int(flag) in self.flags

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
            blob = bytes(serialized_timing_cache)
            trt.calls.append(("create_timing_cache", blob))
            if not blob:
                return ITimingCache(device)
            parts = blob.decode("utf-8", "replace").split(":")
            if len(parts) != 3 or parts[0] != "TIMING" or not parts[2].isdigit():
                return None  # damaged blob
            return ITimingCache(parts[1], int(parts[2]))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if not isinstance(cache, ITimingCache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            trt.calls.append(("set_timing_cache", cache.device_name))
            if cache.device_name != device and not ignore_mismatch:
                return False
            self._timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache:
            return self._timing_cache

    class IHostMemory(bytes):
        pass

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory:
            monitor = config.progress_monitor
            steps = 3
            if monitor is not None:
                monitor.phase_start("Building engine", None, steps)
                for step in range(steps):
                    try:
                        go_on = monitor.step_complete("Building engine", step)
                    except BaseException:  # noqa: BLE001 - the binding logs and stops the build
                        go_on = False
                    if not go_on:
                        monitor.phase_finish("Building engine")
                        return None
                monitor.phase_finish("Building engine")
            if config._timing_cache is not None:
                config._timing_cache.entries += 1
            strong = bool(network.flags & (1 << 1)) if hasattr(trt.NetworkDefinitionCreationFlag,
                                                                "STRONGLY_TYPED") else False
            if major >= 11:
                strong = True
            flag_names = sorted(f.name for f in trt.BuilderFlag if int(f) in config.flags)
            plan = {
                "standin": "tensorrt", "version": version, "device": device, "strongly_typed": strong,
                "flags": flag_names, "optimization_level": config.builder_optimization_level,
                "workspace": config.pools.get(0), "instancenorm": network.instancenorm,
                "float_types": network.float_types,
                "dequantized_interpolations": network.dequantized_interpolations,
                "op_types": network.op_types,
                # layers constrained to FP32 (precision and every output), and the rest's constraints if any
                "fp32_layers": sorted(layer.name for layer in network.layers if layer.precision == trt.float32
                                      and set(layer.output_types) == set(range(layer.num_outputs))
                                      and all(t == trt.float32 for t in layer.output_types.values())),
                "constrained_layers": sum(layer.precision is not None or bool(layer.output_types)
                                          for layer in network.layers),
                "io": [{"name": t.name, "mode": mode, "dtype": t.dtype.name, "shape": list(t.shape)}
                       for mode, tensors in (("INPUT", network.inputs), ("OUTPUT", network.outputs)) for t in tensors],
                "profiles": [p.shapes for p in config.profiles],
                "profiling_verbosity": trt.ProfilingVerbosity(config.profiling_verbosity).name,
                "tactic_sources": sorted(t.name for t in trt.TacticSource if config.get_tactic_sources() >> int(t) & 1),
            }
            return IHostMemory(json.dumps(plan).encode())

    class IExecutionContext:
        def __init__(self, engine) -> None:
            self.engine, self.addresses, self.streams, self.shapes = engine, {}, [], {}

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name: str):
            return self.shapes.get(name) or tuple(self.engine.io[name]["shape"])

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if memory % 256:
                return False  # TensorRT logs "address is not aligned" and refuses
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            self.streams.append(stream_handle)
            return set(self.addresses) == set(self.engine.io)

    class ICudaEngine:
        def __init__(self, plan: dict) -> None:
            self.plan = plan
            self.io = {t["name"]: t for t in plan["io"]}

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, index: int) -> str:
            return list(self.io)[index]

        def get_tensor_mode(self, name: str):
            return trt.TensorIOMode[self.io[name]["mode"]]

        def get_tensor_dtype(self, name: str):
            return DataType[self.io[name]["dtype"]]

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext(self)

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            return [tuple(shape) for shape in self.plan["profiles"][profile_index][name]]

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine:
            try:
                plan = json.loads(bytes(serialized_engine))
            except ValueError:
                return None
            if plan.get("version") != version or plan.get("device") != device:
                return None
            return ICudaEngine(plan)

    for cls in (Logger, ITensor, INetworkDefinition, OnnxParser, ITimingCache, IOptimizationProfile, IBuilderConfig,
                IHostMemory, Builder, IExecutionContext, ICudaEngine, Runtime):
        setattr(trt, cls.__name__, cls)
    if major >= 10:
        trt.IProgressMonitor = IProgressMonitor
    return trt
