"""TensorRT: builds a plan from the FP32 / FP16 / Q/DQ INT8 ONNX and runs it on torch CUDA tensors.

TensorRT is imported lazily (this module imports fine without it). Builder differences are feature
detected, not parsed from version strings (see /work/shared/notes/tensorrt.md):
- 10.x/11.x: strongly-typed network, precision follows the ONNX types; never set precision flags.
  FP16 engines build from an FP16 ONNX, INT8 engines from the Q/DQ graph with FP16 as the high
  precision (:mod:`.trt_graphs`), both derived at build time and cached.
- 8.6: EXPLICIT_BATCH; INT8 (+FP16) flags for Q/DQ graphs, FP16 flag for fp16. DQ-only INT8 weights
  are turned back into FP32 + Q/DQ (:func:`dq_only_to_qdq`) before parsing.
Everything that changes a plan is one *recipe* (:func:`build_recipe`), used both to build and as
part of the cache key.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import onnx
import torch

from ..core.errors import Cancelled, InputError, ModelError
from ..core.fileio import atomic_write_bytes
from ..core.progress import Monitor
from .cache import model_cache_dir
from .tensorrt_runner import TensorRTEngine, import_tensorrt
from .trt_graphs import (decompose_instancenorm, decomposed_norm_prefixes, dequantize_interpolation_inputs,
                         dq_only_to_qdq, int8_fp16_converter, make_fp16_onnx, make_int8_fp16_onnx)

__all__ = ["TensorRTBuildOptions", "TensorRTEngine", "build_recipe", "build_tensorrt_plan", "dq_only_to_qdq",
           "make_fp16_onnx", "make_int8_fp16_onnx", "use_build_options"]

RECIPE_VERSION = 5  # bump whenever the builder code changes what a plan contains
# windows per engine call in the pipeline: the optimization profile's opt shape, so kernels are tuned for it
PIPELINE_BATCH = 4
# TensorRT's default level is 3 (0-5). Level 2 skips the slowest tactic searches (level-3 builds of a small UNet
# took minutes on TensorRT 8.6 in early runs that were not kept); the timing cache makes later builds faster still.
DEFAULT_OPTIMIZATION_LEVEL = 2


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """How plans are built. ``timing_cache``: "auto" (user cache folder), "off", or a file path. ``norms``: how
    FP16/INT8 plans run InstanceNorms that this TensorRT decomposes (no native one, 8.6.0): "scaled" (FP16-safe
    scale, a ReduceMax per norm) or "fp32" (no scale; the norms' layers constrained to FP32, not yet measured)."""

    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    workspace_bytes: int = 2 << 30
    timing_cache: str = "auto"
    norms: str = "scaled"

    def __post_init__(self) -> None:
        if self.norms not in ("scaled", "fp32"):
            raise InputError(f"TensorRT norms must be 'scaled' or 'fp32', got {self.norms!r}.")
        if not 0 <= int(self.optimization_level) <= 5:
            raise InputError(f"TensorRT optimization level must be 0-5, got {self.optimization_level}.")
        if int(self.workspace_bytes) < 1 << 20:
            raise InputError(f"TensorRT workspace must be at least 1 MiB, got {self.workspace_bytes} bytes.")

    def timing_cache_path(self, trt_version: str, device_name: str, network: str = "",
                          readable: bool = True) -> Path | None:
        """"auto": one cache per TensorRT version, GPU and ``network`` (the ONNX content and precision), or none
        where saved caches are not ``readable``.

        On an H200, TensorRT 8.6.0 refused every timing cache it had saved once Myelin kernels were in it, with two
        ``[E]`` lines per build ("Myelin error from unknown graph ... The timing cache will not be used!"), for
        another network's cache and for the same network's alike; rebuilding in the same process was fast anyway
        (59.5 s, then 2.6 s). So "auto" keeps no file on TensorRT 8.x (``readable`` False), and one per network
        elsewhere, so that no build loads another network's entries.
        """
        if self.timing_cache == "off" or self.timing_cache == "auto" and not readable:
            return None
        if self.timing_cache != "auto":
            return Path(self.timing_cache)
        from .cache import user_cache_dir

        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in device_name)
        suffix = f"-{network}" if network else ""
        return user_cache_dir() / "tensorrt" / f"timing-{trt_version}-{safe}{suffix}.cache"


# measured: benchmarks/results/h100-trt86/2026-12-05-run3 (test_tensorrt_real.log) and Testing/test_tensorrt.py
DECOMPOSED_NORM_INT8 = (
    "This TensorRT has no native InstanceNormalization, so the norms run as elementary operations. An INT8 plan "
    "built that way (TensorRT 8.6.0, H100) agreed 0.929 with FP32 on a small InstanceNorm UNet whose INT8 file "
    "agrees 0.999 on ONNX Runtime, and SegResNet's INT8 plan took 303 ms per 96³ window against FP32's 10.7 ms. "
    "Check this plan with `ptqseg segment --compare`, or use FP32 (what --precision auto picks for such a model "
    "here) or TensorRT 8.6.1 or newer.")

_OPTIONS: ContextVar[TensorRTBuildOptions] = ContextVar("tensorrt_build_options", default=TensorRTBuildOptions())


@contextlib.contextmanager
def use_build_options(options: TensorRTBuildOptions) -> Iterator[TensorRTBuildOptions]:
    """Builds started inside this block (CLI command, benchmark) use ``options``."""
    token = _OPTIONS.set(options)
    try:
        yield options
    finally:
        _OPTIONS.reset(token)


def current_build_options() -> TensorRTBuildOptions:
    return _OPTIONS.get()


def strongly_typed(trt) -> bool:
    """11.x: always strongly typed (no INT8 builder flag); 10.x: opt-in flag; 8.x: weakly typed."""
    return hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") or not hasattr(trt.BuilderFlag, "INT8")


def _native_instancenorm_flag(trt):
    """The parser flag for TensorRT's native InstanceNorm: NATIVE_INSTANCENORM from 8.6.1 (on by default
    in 10+), VERSION_COMPATIBLE in 8.6.0 (same bit, renamed); without it 8.6 uses a cuDNN-8 plugin."""
    flags = getattr(trt, "OnnxParserFlag", None)
    for name in ("NATIVE_INSTANCENORM", "VERSION_COMPATIBLE"):  # enum members may be falsy (value 0)
        if hasattr(flags, name):
            return getattr(flags, name)
    return None


def decomposes_instancenorm(onnx_files: Iterable[str | Path]) -> bool:
    """True when this TensorRT has no native InstanceNormalization and one of ``onnx_files`` has one, so its plans
    run the norms as elementary ops (see :func:`~PTQLogic.engines.trt_graphs.decompose_instancenorm`)."""
    if _native_instancenorm_flag(import_tensorrt()) is not None:
        return False
    for path in onnx_files:
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception:  # unreadable here: the build reports it with its own message
            continue
        if any(node.op_type == "InstanceNormalization" for node in graph.node):
            return True
    return False


def build_recipe(trt, precision: str, options: TensorRTBuildOptions | None = None) -> dict[str, Any]:
    """Everything besides the ONNX content, shapes, TensorRT version and GPU that decides the plan."""
    options = options or TensorRTBuildOptions()
    strong = strongly_typed(trt)
    graph: list[str] = []
    high = {"fp32": "fp32", "fp16": "fp16", "int8": "fp16"}[precision]
    if precision == "fp16" and strong:
        graph.append(f"fp16 (onnxconverter-common {_version('onnxconverter_common')})")
    if precision == "int8" and strong:
        converter = int8_fp16_converter()
        if converter is None:
            high = "fp32"  # no ModelOpt here: the rest of the graph stays FP32 (slower, still correct)
        else:
            graph.append(f"int8 high precision fp16 ({converter})")
    if precision == "int8" and not strong:
        graph.append("dq-only weights to Q/DQ")
        graph.append("no Q/DQ before linear Resize")
    return {
        "recipe_version": RECIPE_VERSION,
        "typing": "strong" if strong else "weak",
        "high_precision": high,
        "graph": graph,
        "tf32": "off" if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32") else "default",
        "optimization_level": int(options.optimization_level),
        "workspace_bytes": int(options.workspace_bytes),
        # without the parser's native InstanceNorm (8.6.0 and older) it becomes a cuDNN-8 plugin: decompose it instead
        "instancenorm": _instancenorm_recipe(trt, precision, options),
        # layer names, types and formats kept in the plan, so the engine inspector can say what runs in INT8
        "profiling_verbosity": "detailed" if hasattr(trt, "ProfilingVerbosity") else "default",
        "tactic_sources": "tensorrt" if hasattr(trt, "TacticSource") else "default",
    }


def _instancenorm_recipe(trt, precision: str, options: TensorRTBuildOptions) -> str:
    if _native_instancenorm_flag(trt) is not None:
        return "native"
    if precision == "fp32":
        return "decomposed, no fp16 guard"  # FP32 cannot overflow
    if options.norms == "fp32" and hasattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS"):
        return FP32_NORMS
    return "decomposed"


FP32_NORMS = "decomposed, fp32 layers"


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - missing: the conversion itself reports it
        return "missing"


def _progress_adapter(trt, monitor: Monitor):
    """TensorRT's IProgressMonitor (10.x+) reporting to our Monitor; returning False cancels the build.

    The binding swallows exceptions raised in ``step_complete`` (the build just stops), so every
    exception, Cancelled and the SIGTERM handler's included, is kept and re-raised after the build.
    """

    class Adapter(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.error: BaseException | None = None
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps

        def step_complete(self, phase_name, step):
            if self.error is not None:
                return False
            try:
                monitor.update(f"TensorRT: {phase_name}", step + 1, self.steps.get(phase_name, step + 1))
                return True
            except BaseException as exc:  # noqa: BLE001 - re-raised by build_tensorrt_plan
                self.error = exc
                return False

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Adapter()


def _attach_timing_cache(config, path: Path | None):
    """Load the timing cache at ``path`` (or start one); a damaged or foreign cache is replaced, with a warning."""
    if path is None:
        return None
    blob = path.read_bytes() if path.is_file() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
        except Exception:  # noqa: BLE001 - any failure means: start fresh
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        warnings.warn(f"TensorRT timing cache '{path}' is damaged or from another TensorRT/GPU; "
                      "starting a fresh one (this build times every kernel).", RuntimeWarning, stacklevel=3)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        warnings.warn("TensorRT refused a new timing cache; building without one.", RuntimeWarning, stacklevel=3)
        return None
    return cache


def _save_timing_cache(config, path: Path | None) -> None:
    """Never lets a timing-cache problem cost the finished plan."""
    if path is None:
        return
    try:
        cache = config.get_timing_cache()
        if cache is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, bytes(cache.serialize()))
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"Could not save the TensorRT timing cache '{path}': {exc}", RuntimeWarning, stacklevel=3)


def build_tensorrt_plan(
    onnx_path: str | Path,
    precision: str,
    plan_path: str | Path,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 4,
    workspace_bytes: int | None = None,
    timing_cache_path: str | Path | None = None,
    optimization_level: int | None = None,
    monitor: Monitor | None = None,
) -> Path:
    """Build a serialized TensorRT engine from ``onnx_path`` and write it atomically to ``plan_path``.

    ``onnx_path`` must already be the graph the recipe asks for (FP16 / INT8-with-FP16 graphs on
    strongly typed TensorRT, see :func:`tensorrt_engine_for`). Defaults come from :func:`use_build_options`.
    """
    monitor = monitor or Monitor()
    options = _options_for_build(workspace_bytes, optimization_level)
    trt = import_tensorrt()
    recipe = build_recipe(trt, precision, options)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # the parser owns the network's weights: it must outlive the build
    network, parser = _parse_network(trt, builder, logger, onnx_path, precision, recipe, monitor)
    config = _builder_config(trt, builder, precision, recipe)
    config.add_optimization_profile(_optimization_profile(builder, network, min_batch, opt_batch, max_batch))
    timing_path = _timing_cache_file(timing_cache_path, options)
    timing_cache = _attach_timing_cache(config, timing_path)  # must outlive the build
    serialized = _build_serialized(trt, builder, network, config, monitor)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build a {precision} engine from '{onnx_path}' (see the TensorRT log above).")
    plan_path = Path(plan_path)
    atomic_write_bytes(plan_path, bytes(serialized))
    _save_timing_cache(config, timing_path if timing_cache is not None else None)
    monitor.update("TensorRT: build", 1, 1)
    return plan_path


def _options_for_build(workspace_bytes: int | None, optimization_level: int | None) -> TensorRTBuildOptions:
    """The current build options (:func:`use_build_options`) with the arguments given explicitly."""
    defaults = current_build_options()
    return replace(defaults,
                   optimization_level=defaults.optimization_level if optimization_level is None else optimization_level,
                   workspace_bytes=defaults.workspace_bytes if workspace_bytes is None else workspace_bytes)


def _network_flags(trt) -> int:
    """STRONGLY_TYPED where TensorRT has it (10.x opt-in, 11.x), else EXPLICIT_BATCH (8.x)."""
    creation_flags = trt.NetworkDefinitionCreationFlag
    if hasattr(creation_flags, "STRONGLY_TYPED"):
        return 1 << int(creation_flags.STRONGLY_TYPED)
    if hasattr(creation_flags, "EXPLICIT_BATCH"):
        return 1 << int(creation_flags.EXPLICIT_BATCH)
    return 0


def _parse_network(trt, builder, logger, onnx_path: str | Path, precision: str, recipe: dict[str, Any],
                   monitor: Monitor):
    """(network, parser) for ``onnx_path``; the parser owns the weights, so the caller keeps it until the build ends."""
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    native = _native_instancenorm_flag(trt)
    if native is not None:
        parser.set_flag(native)
    monitor.update("TensorRT: parse", 0, 1)
    fp32_norms = recipe["instancenorm"] == FP32_NORMS
    model = _load_onnx_for(onnx_path, precision, recipe["typing"] == "strong", decompose_norms=native is None,
                           fp32_norms=fp32_norms)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse '{onnx_path}': {errors}")
    if fp32_norms:
        _constrain_to_fp32(trt, network, decomposed_norm_prefixes(model))
    return network, parser


def _constrain_to_fp32(trt, network, prefixes: set[str]) -> None:
    """Layers named after a decomposed norm compute and output FP32 (the builder flag makes TensorRT prefer it)."""
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if any(layer.name.startswith(prefix) for prefix in prefixes):
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)


def _load_onnx_for(onnx_path: str | Path, precision: str, strong: bool, decompose_norms: bool = False,
                   fp32_norms: bool = False) -> onnx.ModelProto:
    """The ONNX as this TensorRT parses it: DQ-only INT8 weights as Q/DQ and no Q/DQ before a linear Resize on 8.x,
    InstanceNormalization as elementary ops where the parser has no native one; FP16 tensors required when
    strongly typed."""
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:
        raise ModelError(f"Cannot read ONNX '{onnx_path}': {exc}") from None
    if not strong and precision == "int8":
        model = dequantize_interpolation_inputs(dq_only_to_qdq(model))
    if decompose_norms and any(node.op_type == "InstanceNormalization" for node in model.graph.node):
        if precision == "int8" and not fp32_norms:  # the measured path; fp32 norms are not measured yet
            warnings.warn(DECOMPOSED_NORM_INT8, RuntimeWarning, stacklevel=4)
        model = decompose_instancenorm(model, fp16_guard=precision != "fp32" and not fp32_norms)
    if strong and precision == "fp16" and not _has_fp16_tensors(model):
        raise ModelError("This TensorRT is strongly typed: an fp16 engine needs an FP16 ONNX (make_fp16_onnx).")
    return model


def _builder_config(trt, builder, precision: str, recipe: dict[str, Any]):
    """Workspace, TF32, precision flags (weakly typed TensorRT only) and optimization level of the recipe."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe["workspace_bytes"])
    if recipe["tf32"] == "off":
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32, comparable to PyTorch
    if recipe["typing"] != "strong":
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)  # layers left unquantized may use FP16
        elif precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = recipe["optimization_level"]
    if recipe.get("profiling_verbosity") == "detailed":
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if recipe["instancenorm"] == FP32_NORMS:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    if recipe.get("tactic_sources") == "tensorrt":
        config.set_tactic_sources(_own_tactic_sources(trt, config.get_tactic_sources()))
    return config


def _own_tactic_sources(trt, sources: int) -> int:
    """``sources`` without cuBLAS, cuBLASLt and cuDNN: plans then need neither library at run time (TensorRT 10
    leaves them out by default; 8.6 tries them and fails the build when an incompatible cuBLAS is found)."""
    for name in ("CUBLAS", "CUBLAS_LT", "CUDNN"):
        if hasattr(trt.TacticSource, name):
            sources &= ~(1 << int(getattr(trt.TacticSource, name)))
    return sources


def _optimization_profile(builder, network, min_batch: int, opt_batch: int, max_batch: int):
    """Dynamic batch only: every input's channel and spatial sizes must be static."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ModelError(f"TensorRT input '{tensor.name}' needs static channel/spatial sizes, got {tuple(tensor.shape)}.")
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    return profile


def _timing_cache_file(timing_cache_path: str | Path | None, options: TensorRTBuildOptions) -> Path | None:
    """The explicit path, else a path given in the build options ("auto" is resolved by :func:`cached_plan`)."""
    if timing_cache_path is None and options.timing_cache not in ("auto", "off"):
        timing_cache_path = options.timing_cache
    return Path(timing_cache_path) if timing_cache_path else None


def _build_serialized(trt, builder, network, config, monitor: Monitor):
    """``builder.build_serialized_network`` reporting to ``monitor``; an error raised in the progress callback
    (Cancelled included) is raised here, after the build stopped."""
    progress = _progress_adapter(trt, monitor) if hasattr(trt, "IProgressMonitor") else None
    if progress is not None:
        config.progress_monitor = progress
    monitor.update("TensorRT: build", 0, 1)
    serialized = builder.build_serialized_network(network, config)
    if progress is not None and progress.error is not None:
        if isinstance(progress.error, Cancelled):
            raise Cancelled("TensorRT build cancelled by the user; no engine was written.") from progress.error
        raise progress.error
    return serialized


def _has_fp16_tensors(model: onnx.ModelProto) -> bool:
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def cached_plan(onnx_path: Path, precision: str, cache_dir: Path, device_name: str, max_batch: int,
                monitor: Monitor, build_context=contextlib.nullcontext) -> tuple[Path, dict[str, Any]]:
    """The plan for ``onnx_path`` under the current build options, built into ``cache_dir`` unless cached.

    The key holds the ONNX content (not its name), precision, shapes, TensorRT version, GPU and the whole
    recipe; graphs the recipe derives (FP16, INT8-with-FP16) are cached artifacts of their own.
    """
    from .cache import EngineCache, engine_fields

    trt = import_tensorrt()
    options = current_build_options()
    recipe = build_recipe(trt, precision, options)
    cache = EngineCache(cache_dir)
    source = onnx_path
    derive = {"fp16": make_fp16_onnx, "int8": make_int8_fp16_onnx}.get(precision)
    if recipe["graph"] and recipe["typing"] == "strong" and derive is not None:
        fields = engine_fields(onnx_path, precision, "onnx-graph", "", "any", {}, graph=recipe["graph"])
        source = cache.get_or_build(fields, lambda tmp: derive(onnx_path, tmp), suffix=".onnx")
    profile = {"min_batch": 1, "opt_batch": min(PIPELINE_BATCH, max_batch), "max_batch": max_batch}
    fields = engine_fields(onnx_path, precision, "tensorrt", trt.__version__, device_name, profile, recipe=recipe)
    network = hashlib.sha256(f"{fields['model_sha256']} {precision}".encode()).hexdigest()[:16]
    timing_cache = options.timing_cache_path(trt.__version__, device_name, network, readable=strongly_typed(trt))
    seconds: list[float] = []

    def build(tmp: Path) -> None:
        started = time.perf_counter()
        with build_context():
            build_tensorrt_plan(source, precision, tmp, min_batch=1, opt_batch=profile["opt_batch"], max_batch=max_batch,
                                timing_cache_path=timing_cache, optimization_level=options.optimization_level,
                                workspace_bytes=options.workspace_bytes, monitor=monitor)
        seconds.append(time.perf_counter() - started)

    plan = cache.get_or_build(fields, build, suffix=".plan")
    return plan, {**recipe, "build_seconds": seconds[0] if seconds else None, "from_cache": not seconds,
                  "timing_cache": str(timing_cache) if timing_cache else None}


def tensorrt_engine_for(onnx_path: Path, precision: str, cache_dir: Path | None, device: str | None,
                        max_batch: int, monitor: Monitor) -> TensorRTEngine:
    """Build (or reuse) the plan on the GPU ``device`` and open it."""
    gpu = torch.device(device or "cuda")
    props = torch.cuda.get_device_properties(gpu)
    plan, build_info = cached_plan(onnx_path, precision, cache_dir if cache_dir is not None else model_cache_dir([onnx_path]),
                                   f"{props.name} sm_{props.major}{props.minor}", max_batch, monitor,
                                   build_context=lambda: torch.cuda.device(gpu))
    return TensorRTEngine(plan, precision, device=gpu, build=build_info)
