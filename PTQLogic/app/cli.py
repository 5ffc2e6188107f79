"""`ptqseg` command line: quantize, build, segment, segment-batch, evaluate, benchmark, demo, info.

Every command prints a human summary (or one JSON object with ``--json``), shows progress bars
(or machine-readable lines with ``--progress-lines``, used by the Slicer module), and on failure
prints one ``error: ...`` line and exits non-zero.
"""
from __future__ import annotations

# Only the standard library and PTQLogic's light modules here: `ptqseg --help`, `--version` and a
# wrong option must answer at once. torch/MONAI/ONNX are imported inside the command functions.
import argparse
import contextlib
import importlib.util
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import Any, Callable

from .. import __version__
from .cli_options import (DEFAULT_PRECISION, PRECISIONS, RUNTIMES, TORCH_COMPILE_MODES, add_benchmark_options,  # noqa: F401
                          add_build_options, add_demo_options, add_evaluate_options, add_quantize_options,
                          add_segment_batch_options, add_segment_options, common_options)
from .cli_support import HelpFormatter, Parser, UsageError
from .cli_support import close_bars as _close_bars, emit as _emit, fail as _fail, make_monitor as _make_monitor
from .cli_support import note as _note, route_warnings as _route_warnings
from ..core.errors import Cancelled, InputError, PTQError
from ..core.progress import LOADING_STAGE, Monitor



def _monitor(args: argparse.Namespace) -> Monitor:
    """The monitor main() made for this run (shows a 'loading' stage at once); a fresh one when called directly."""
    monitor = getattr(args, "monitor", None)
    if monitor is None:
        monitor = args.monitor = _make_monitor(args)
    return monitor


def _resolve_precision(args: argparse.Namespace) -> str:
    """--precision; auto (the default): int8 on the CPU runtimes, fp16 on TensorRT (fp32 for a model whose
    InstanceNorms this TensorRT would decompose), fp32 for the PyTorch runtime."""
    if args.runtime == "torch":
        if args.precision in (None, "auto"):
            _note(args, "--runtime torch runs the FP32 PyTorch reference (PyTorch has no INT8 engine; "
                        "use --runtime openvino, onnxruntime or tensorrt for INT8).")
            return "fp32"
        if args.precision == "int8":
            raise InputError("--runtime torch cannot run int8: PyTorch is the FP32 reference (fp16 only on an NVIDIA "
                             "GPU). Use --precision fp32, or --runtime openvino|onnxruntime|tensorrt for INT8.")
    if args.precision not in (None, "auto"):
        return args.precision
    if args.runtime in ("openvino", "onnxruntime") or args.runtime == "auto" and importlib.util.find_spec("tensorrt") is None:
        return DEFAULT_PRECISION  # no TensorRT to choose: decided without importing torch (bad paths fail fast)
    if args.runtime == "auto":  # deciding imports the runtimes: let a wrong path fail first, as it would without
        _check_paths(args)
    from ..engines import choose_precision
    from ..inference.segmenters import model_onnx_files

    model = getattr(args, "model", None)
    precision, reason = choose_precision(args.runtime, model_onnx_files(model) if model else ())
    if precision != DEFAULT_PRECISION:
        _note(args, f"--precision auto: {reason}.")
    return precision


def _check_paths(args: argparse.Namespace) -> None:
    """The model and input checks ``segment``/``build`` make first, before anything heavy is imported."""
    from pathlib import Path

    from ..io.volumes import check_input_path
    from ..models.model_folder import check_model_path

    models = args.model if isinstance(args.model, (list, tuple)) else [args.model]
    for model in models:
        check_model_path(model)
    if getattr(args, "input", None):
        check_input_path(Path(args.input))


def cmd_quantize(args: argparse.Namespace) -> None:
    from ..pipeline import quantize_model
    from ..quantization.interface import DEFAULT_MIN_AGREEMENT, GuardTarget, QuantizeOptions

    default = None if args.no_guard or args.max_dice_drop is not None else DEFAULT_MIN_AGREEMENT
    guard = GuardTarget(min_agreement=default if args.min_agreement is None else args.min_agreement,
                        max_dice_drop=args.max_dice_drop, runtime=args.guard_runtime, max_kept=args.max_kept_layers)
    guard.validate()  # no threshold (--no-guard): agreement is measured on --guard-runtime, not enforced
    QuantizeOptions(method=args.method, percentile=args.percentile).validate_method()
    # no --placement: auto, unless --activations/--subpixel ask for the cpu placement
    placement = args.placement or ("cpu" if args.activations != "s8" or args.subpixel else "auto")
    result = quantize_model(
        args.model, args.calibration, args.out, num_patches=args.patches, seed=args.seed,
        method=args.method, exclude_nodes=args.exclude_nodes or (), guard=guard, monitor=_monitor(args),
        folds=args.folds, checkpoint=args.checkpoint,
        placement=placement, activations=args.activations, subpixel=args.subpixel, target_cpu=args.target_cpu,
        percentile=args.percentile, bias_correction=args.bias_correction, on_miss=args.on_miss,
        equalize=args.equalize,
    )
    data = result.to_dict()
    chosen = data["placement"]["auto"]
    inputs = data["calibration_inputs"]
    fallback = data.get("int8_fallback")
    sizes = (f"  FP32 ONNX {data['fp32_mb']:.2f} MB and no INT8, in {data['seconds']:.1f} s: INT8 missed the accuracy "
             f"target (agreement {data['guard']['agreement']:.4f} < {data['guard']['threshold']:.4f}), so with "
             "--on-miss fp32 this folder runs in FP32 (segment says so; quantization.json has what was tried)"
             if fallback else
             f"  FP32 ONNX {data['fp32_mb']:.2f} MB -> INT8 ONNX {data['int8_mb']:.2f} MB "
             f"({1 / data['size_ratio']:.2f}x smaller) in {data['seconds']:.1f} s; TensorRT Q/DQ rules "
             + ("pass" if data["qdq_ok"] else "not met: u8 activations are for ONNX Runtime (use s8 for TensorRT)"
                if data["placement"]["activations"] == "u8" else "FAIL (see quantization.json)"))
    _emit(args, data, (
        f"Calibrated on {len(inputs)} volume(s): {', '.join(inputs)}\n"
        f"Quantized model written to {data['model_dir']}\n"
        + sizes
        + (f"\n  {chosen}" if chosen else "")
        + _bias_text(result.report.get("bias_correction"))
        + "".join(_equalize_text(((report.get("export") or {}).get("equalize")), fold)
                  for fold, report in (result.report.get("folds") or {}).items())
        + _guard_text(result.report.get("guard"))
        + "".join(_guard_text(report.get("guard"), f"fold {fold}: ")
                  for fold, report in (result.report.get("folds") or {}).items())
    ))


def _equalize_text(equalize: dict[str, Any] | None, fold: str) -> str:
    if not equalize:
        return ""
    return (f"\n  fold {fold}: channels equalized before export ({equalize['groups']} tensors on {equalize['windows']} "
            f"calibration window(s); FP32 output changed by at most {equalize['max_fp32_change']:.1e})")


def _bias_text(bias: dict[str, Any] | None) -> str:
    if not bias:
        return ""
    skipped = len(bias.get("convs_skipped") or {})
    return (f"\n  bias correction ({bias['mode']}): {bias['convs_corrected']} convolution(s) corrected, {skipped} left "
            f"as they are (see quantization.json); largest channel-mean error {bias['largest_error_before']:.2g} -> "
            f"{bias['largest_error_after']:.2g}")


def _guard_text(guard: dict[str, Any] | None, prefix: str = "") -> str:
    if not guard:  # nnU-Net folders report per fold
        return ""
    where = f"{guard['runtime']}, {guard['isa']}"
    if not guard["enforced"]:
        return (f"\n  {prefix}FP32-vs-INT8 agreement {guard['agreement']:.4f} on {where} ({guard['held_out']}); "
                "not enforced (--no-guard)")
    kept = ", ".join(guard["kept"]) or "none"
    return (f"\n  {prefix}accuracy guard on {where}: agreement {guard['initial_agreement']:.4f} -> "
            f"{guard['final_agreement']:.4f} (target {guard['threshold']:.4f}); kept in FP32: {kept}; "
            f"size x{guard['size_cost']:.2f}, latency x{guard['latency_cost']:.2f}")


def cmd_build(args: argparse.Namespace) -> None:
    precision = _resolve_precision(args)
    from ..engines.open import open_engine
    from ..models.model_folder import open_model_dir

    engine, reason = open_engine(open_model_dir(args.model), args.runtime, precision, monitor=_monitor(args))
    data = {**engine.info.to_dict(), "reason": reason}
    layers = engine.layer_summary() if hasattr(engine, "layer_summary") else None
    if layers is not None:  # TensorRT: what runs in INT8/FP16/FP32, from the engine inspector
        data["layers"] = layers
    built = (engine.info.build or {}).get("build_seconds")
    _emit(args, data, f"{engine.info.runtime} {engine.info.precision} engine ready on {engine.info.device} "
          f"({engine.info.bytes_on_disk / 1e6:.2f} MB{f', built in {built:.1f} s' if built else ''})"
          f"{': ' + reason if reason else ''}")


def cmd_segment(args: argparse.Namespace) -> None:
    precision = _resolve_precision(args)
    compare = args.compare
    if compare and precision == "fp32":
        _note(args, "--compare is ignored with --precision fp32 (it compares INT8/FP16 against FP32).")
        compare = False
    from ..pipeline import segment

    outcome = segment(
        args.model, args.input, args.output, runtime=args.runtime, precision=precision,
        batch_size=args.batch_size, compare=compare, reference=args.reference, monitor=_monitor(args),
        mirroring=args.mirroring, step_size=args.step_size,
        label_map=args.label_map, torch_compile=args.torch_compile, reference_labels=args.reference_labels,
        fp32_windows=args.fp32_windows,
    )
    data = outcome.to_dict()
    lines = [
        f"Wrote {outcome.output} (+ {outcome.labels_json.name}, {outcome.labels_csv.name})",
        f"  {outcome.runtime} {outcome.precision}: {outcome.seconds:.2f} s for the volume, "
        f"{outcome.latency_ms:.1f} ms per patch, engine {outcome.engine_size_mb:.2f} MB",
    ]
    if outcome.runtime_reason:
        lines.append(f"  runtime: {outcome.runtime_reason}")
    if outcome.fp32_seconds is not None:
        lines.append(f"  {outcome.runtime} fp32: {outcome.fp32_seconds:.2f} s for the volume, "
                     f"{outcome.fp32_latency_ms:.1f} ms per patch")
    if outcome.fp32_windows is not None:
        lines.append(f"  {outcome.fp32_windows['windows']} of {outcome.fp32_windows['of']} windows taken from FP32 "
                     "(--fp32-windows: where INT8 was least sure)")
    if outcome.agreement_dice is not None:
        lines.append(f"  FP32-vs-{outcome.precision.upper()} agreement Dice {outcome.agreement_dice:.4f}")
    if outcome.reference_dice is not None:
        lines.append(f"  mean Dice vs reference {outcome.reference_dice:.4f}")
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _emit(args, data, "\n".join(lines))


def cmd_segment_batch(args: argparse.Namespace) -> None:
    from ..cohort import run_cohort

    summary = run_cohort(
        args.model, args.inputs, args.output_dir, ray_address=args.ray_address, workers=args.workers,
        threads_per_worker=args.threads_per_worker, gpus_per_worker=args.gpus_per_worker,
        runtime=args.runtime, precision=args.precision, pin_cpus=not args.no_pin_cpus,
        torch_compile=args.torch_compile, monitor=_monitor(args),
    )
    _emit(args, summary.to_dict(), batch_summary_text(summary))
    if summary.failed:
        raise InputError(f"{summary.failed} of {summary.total} volume(s) failed (see {summary.manifest}); "
                         "fix them and rerun the same command: finished volumes are skipped.")


def batch_summary_text(summary: Any) -> str:
    """segment-batch's summary lines (a :class:`~PTQLogic.cohort.runner.CohortSummary`)."""
    lines = [f"{summary.done} segmented, {summary.skipped} already done, {summary.failed} failed of {summary.total} "
             f"in {summary.seconds:.1f} s ({summary.volumes_per_second:.2f} volumes/s on {summary.workers} "
             f"worker{'' if summary.workers == 1 else 's'})",
             f"  manifest: {summary.manifest}"]
    lines += [f"  failed: {name}: {error}" for name, error in summary.errors.items()]
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    for what, path in (("Prediction", args.prediction), ("Reference", args.reference)):
        if not Path(path).exists():  # before the heavy imports: a wrong path fails at once
            raise InputError(f"{what} '{path}' does not exist; give a label map file (.nii.gz, .nrrd, ...).")
    from ..evaluation.metrics import evaluate_files, format_comparison

    result = evaluate_files(args.prediction, args.reference, label_map=args.label_map,
                            reference_labels=args.reference_labels, labels=args.labels)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _emit(args, result.to_dict(), format_comparison(result))


def cmd_benchmark(args: argparse.Namespace) -> None:
    from ..models.model_folder import open_model_dir

    open_model_dir(args.model)  # a wrong folder fails before the heavy imports
    for what, path in (("Input", args.input), ("Reference", args.reference)):
        if path is not None and not os.path.exists(path):
            raise InputError(f"{what} '{path}' does not exist.")
    from .benchmark import run_benchmark

    summary = run_benchmark(
        args.model, args.input, args.out, runtimes=args.runtimes, precisions=args.precisions,
        reference=args.reference, repeats=args.repeats, warmup=args.warmup, batch_size=args.batch_size,
        monitor=_monitor(args), label_map=args.label_map, reference_labels=args.reference_labels,
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _emit(args, summary, summary["markdown"] + f"\nTables and plot written to {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import default_demo_dir, format_demo, run_demo

    out = args.out or default_demo_dir()
    result = run_demo(out, runtime=args.runtime, train=args.train, model=args.model, monitor=_monitor(args))
    _emit(args, result, format_demo(result))


def cmd_info(args: argparse.Namespace) -> None:
    from ..engines import choose_precision, choose_runtime
    from ..core.sysinfo import cpu_int8_note, cpu_int8_target, system_info

    info = system_info()
    info["int8_target_cpu"], info["cpu_int8_note"] = cpu_int8_target(), cpu_int8_note()
    info["auto_runtime"] = {}
    for precision in PRECISIONS:
        try:
            runtime, reason = choose_runtime(precision)
            info["auto_runtime"][precision] = {"runtime": runtime, "reason": reason}
        except PTQError as exc:
            info["auto_runtime"][precision] = {"runtime": None, "reason": str(exc)}
    try:
        precision, reason = choose_precision("auto")
        info["auto_precision"] = {"precision": precision, "reason": reason}
    except PTQError as exc:
        info["auto_precision"] = {"precision": None, "reason": str(exc)}
    cpu = info["cpu"]
    flags = ", ".join(name for name, present in cpu["flags"].items() if present) or "none of AVX2/AVX-512/AMX"
    lines = [
        f"platform: {info['platform']}",
        f"cpu: {cpu['model']} ({cpu['usable_cores']} usable cores; {flags})",
        f"memory: {info['memory_bytes'] / 2**30:.1f} GiB",
        f"gpus: {', '.join(map(str, info['gpus'])) or 'none'}",
    ]
    for name, version in info["versions"].items():
        if name == "onnxruntime_providers_unusable":  # in --json; the text lists what can run here
            continue
        if name == "tensorrt" and isinstance(version, dict) and not info["gpus"] and "installed" not in version["missing"]:
            continue  # no GPU and no TensorRT: nothing to say on a CPU machine (--json keeps why)
        shown = version.get("missing") if isinstance(version, dict) else version
        lines.append(f"{name}: {'missing: ' if isinstance(version, dict) else ''}{shown}")
    for precision, choice in info["auto_runtime"].items():
        lines.append(f"auto runtime for {precision}: {choice['runtime'] or 'none'} ({choice['reason']})")
    lines.append(f"auto precision: {info['auto_precision']['precision'] or 'none'} ({info['auto_precision']['reason']})")
    lines.append(f"int8 target cpu: {info['int8_target_cpu']} (quantize --target-cpu auto)"
                 + (f"\nnote: {info['cpu_int8_note']}" if info["cpu_int8_note"] else ""))
    _emit(args, info, "\n".join(lines))


def _tensorrt_options(args: argparse.Namespace):
    """A context applying the --trt-* options to every TensorRT build of this command."""
    if getattr(args, "trt_opt_level", None) is None and getattr(args, "trt_timing_cache", "auto") == "auto":
        return contextlib.nullcontext()  # the builder's defaults; importing the engines (torch) would slow startup
    from ..engines.tensorrt_engine import DEFAULT_OPTIMIZATION_LEVEL, TensorRTBuildOptions, use_build_options

    level = DEFAULT_OPTIMIZATION_LEVEL if args.trt_opt_level is None else args.trt_opt_level
    return use_build_options(TensorRTBuildOptions(optimization_level=level, timing_cache=args.trt_timing_cache))



def build_parser() -> argparse.ArgumentParser:
    """The whole command line in one place; add a command with ``add(name, function, help)`` and its options."""
    formatter = HelpFormatter
    parser = Parser(prog="ptqseg", description=__doc__.split("\n")[0], formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common, without_engines = common_options(), common_options(engines=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}  # name -> its parser, for errors about its options (see main)

    def add(name: str, func: Callable, help_text: str, engines: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common if engines else without_engines], help=help_text,
                             description=help_text, formatter_class=formatter)
        cmd.set_defaults(func=func)
        parser.commands[name] = cmd
        return cmd

    add_quantize_options(add("quantize", cmd_quantize,
                              "export a model to ONNX and quantize it to INT8 Q/DQ on unlabeled volumes"))
    add_build_options(add("build", cmd_build, "build (or load from cache) one engine of a model folder"))
    add_segment_options(add("segment", cmd_segment, "segment a volume and write a label map on its grid"))
    add_segment_batch_options(add("segment-batch", cmd_segment_batch,
                                   "segment a cohort of volumes on a Ray cluster (local by default)"))
    add_evaluate_options(add("evaluate", cmd_evaluate, "Dice of a label map against a reference", engines=False))
    add_benchmark_options(add("benchmark", cmd_benchmark,
                               "paper-style table: size, latency, Dice per runtime and precision"))
    add_demo_options(add("demo", cmd_demo, "synthetic CT phantoms -> sample network -> INT8 -> FP32 vs INT8 table"))
    add("info", cmd_info, "CPU features, GPUs and runtime versions", engines=False)
    return parser


def _cancel_on_terminate() -> None:
    """SIGTERM (the Slicer module's Cancel) unwinds like Ctrl-C, so staging files are removed."""

    def handler(signum, frame):
        raise Cancelled("Cancelled (terminated); no partial output was kept.")

    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def console_main() -> None:
    """The `ptqseg` command and `python -m PTQLogic`: ``main``'s code as the process's exit status."""
    from ..core.interrupts import exit_process

    exit_process(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said with the command's usage, not the top level's
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as exc:
        message, usage = exc.args
        print(usage, file=sys.stderr, end="")
        return _fail(None, "--json" in argv, f"{message} (see --help)", 2)
    saved_env = {name: os.environ.get(name) for name in ("PTQSEG_CACHE_DIR", "PTQSEG_CPU_FLOAT")}
    if getattr(args, "cache_dir", None):
        os.environ["PTQSEG_CACHE_DIR"] = os.path.abspath(args.cache_dir)  # read by PTQLogic.engines.cache.cache_root
    if getattr(args, "cpu_float", None):
        os.environ["PTQSEG_CPU_FLOAT"] = args.cpu_float  # read by engines.openvino_engine (workers inherit it)
    restore_signals = None
    if threading.current_thread() is threading.main_thread():
        _cancel_on_terminate()
        from ..core.interrupts import route_signals_through_watcher

        # no signal frames on engine threads (Ctrl-C crashed OpenVINO + ONNX Runtime runs)
        restore_signals = route_signals_through_watcher()
    try:
        with warnings.catch_warnings():
            _route_warnings(args)
            return _run(args)
    finally:
        if restore_signals is not None:
            restore_signals()
        for name, value in saved_env.items():  # an in-process caller's next run starts from its own settings
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(args: argparse.Namespace) -> int:
    try:
        args.monitor = _make_monitor(args)
        args.monitor.update(LOADING_STAGE, 0, 1)  # something shows at once, before the heavy imports
        with _tensorrt_options(args):
            args.func(args)
        return 0
    except Cancelled as exc:
        return _fail(args, args.json, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        kept = " finished volumes are kept (rerun the same command to go on);" if args.func is cmd_segment_batch else ""
        return _fail(args, args.json, f"interrupted;{kept} no partial output was kept.", 130)
    except PTQError as exc:
        return _fail(args, args.json, str(exc), exc.exit_code)
    except PermissionError as exc:  # one not checked up front: still the user's to fix, not a crash
        where = f" '{exc.filename}'" if exc.filename else ""
        return _fail(args, args.json, f"cannot read or write{where}: permission denied; give this user access to "
                                      "the inputs and the output folder.", 2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback unless asked
        _close_bars(args)
        if args.debug or os.environ.get("PTQSEG_DEBUG"):
            traceback.print_exc()
        message = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)"
        return _fail(args, args.json, message, 1)


if __name__ == "__main__":
    sys.exit(main())
