"""`ptqseg` command line: quantize, build, segment, evaluate, benchmark, demo, info.

Every command prints a human summary (or one JSON object with ``--json``), shows progress bars
(or machine-readable lines with ``--progress-lines``, used by the Slicer module), and on failure
prints one ``error: ...`` line and exits non-zero.
"""
from __future__ import annotations

# Only the standard library and PTQLogic's light modules here: `ptqseg --help`, `--version` and a
# wrong option must answer at once. torch/MONAI/ONNX are imported inside the command functions.
import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import Any, Callable

from .. import __version__
from .cli_support import HelpFormatter, Parser, UsageError, int_at_least
from .cli_support import close_bars as _close_bars, emit as _emit, fail as _fail, make_monitor as _make_monitor
from .cli_support import note as _note, route_warnings as _route_warnings
from ..core.errors import Cancelled, InputError, PTQError
from ..core.progress import LOADING_STAGE, Monitor

# Same as engines.base.RUNTIMES/PRECISIONS (a test keeps them equal); engines imports torch.
RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
RUNTIME_CHOICES = ("auto", *RUNTIMES)
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")  # = torch_engine's
DEFAULT_PRECISION = "int8"
NO_GPU_NOTE = "fp16 needs an NVIDIA GPU"


def _monitor(args: argparse.Namespace) -> Monitor:
    """The monitor main() made for this run (shows a 'loading' stage at once); a fresh one when called directly."""
    monitor = getattr(args, "monitor", None)
    if monitor is None:
        monitor = args.monitor = _make_monitor(args)
    return monitor


def _resolve_precision(args: argparse.Namespace) -> str:
    """--precision, defaulting to int8 (fp32 for the PyTorch runtime, which has no INT8 engine)."""
    if args.runtime == "torch":
        if args.precision is None:
            _note(args, "--runtime torch runs the FP32 PyTorch reference (PyTorch has no INT8 engine; "
                        "use --runtime openvino, onnxruntime or tensorrt for INT8).")
            return "fp32"
        if args.precision == "int8":
            raise InputError("--runtime torch cannot run int8: PyTorch is the FP32 reference (fp16 only on an NVIDIA "
                             "GPU). Use --precision fp32, or --runtime openvino|onnxruntime|tensorrt for INT8.")
    return args.precision or DEFAULT_PRECISION


def cmd_quantize(args: argparse.Namespace) -> None:
    from ..pipeline import quantize_model

    guard = None
    if args.min_agreement is not None or args.max_dice_drop is not None:
        from ..quantization.guard import GuardTarget

        guard = GuardTarget(min_agreement=args.min_agreement, max_dice_drop=args.max_dice_drop,
                            runtime=args.guard_runtime, max_kept=args.max_kept_layers)
        guard.validate()
    # no --placement: auto, unless --activations/--subpixel ask for the cpu placement
    placement = args.placement or ("cpu" if args.activations != "s8" or args.subpixel else "auto")
    result = quantize_model(
        args.model, args.calibration, args.out, num_patches=args.patches, seed=args.seed,
        method=args.method, exclude_nodes=args.exclude_nodes or (), guard=guard, monitor=_monitor(args),
        folds=args.folds, checkpoint=args.checkpoint,
        placement=placement, activations=args.activations, subpixel=args.subpixel, target_cpu=args.target_cpu,
    )
    data = result.to_dict()
    chosen = data["placement"]["auto"]
    inputs = data["calibration_inputs"]
    _emit(args, data, (
        f"Calibrated on {len(inputs)} volume(s): {', '.join(inputs)}\n"
        f"Quantized model written to {data['model_dir']}\n"
        f"  FP32 ONNX {data['fp32_mb']:.2f} MB -> INT8 ONNX {data['int8_mb']:.2f} MB "
        f"({1 / data['size_ratio']:.2f}x smaller) in {data['seconds']:.1f} s; TensorRT Q/DQ rules "
        + ("pass" if data["qdq_ok"] else "not met: u8 activations are for ONNX Runtime (use s8 for TensorRT)"
           if data["placement"]["activations"] == "u8" else "FAIL (see quantization.json)")
        + (f"\n  {chosen}" if chosen else "")
        + _guard_text(result.report.get("guard"))
    ))


def _guard_text(guard: dict[str, Any] | None) -> str:
    if not guard:
        return ""
    kept = ", ".join(guard["kept"]) or "none"
    return (f"\n  accuracy guard on {guard['runtime']}: agreement {guard['initial_agreement']:.4f} -> "
            f"{guard['final_agreement']:.4f} (target {guard['threshold']:.4f}); kept in FP32: {kept}; "
            f"size x{guard['size_cost']:.2f}, latency x{guard['latency_cost']:.2f}")


def cmd_build(args: argparse.Namespace) -> None:
    precision = _resolve_precision(args)
    from ..engines.open import open_engine
    from ..models.model_folder import open_model_dir

    engine, reason = open_engine(open_model_dir(args.model), args.runtime, precision, monitor=_monitor(args))
    data = {**engine.info.to_dict(), "reason": reason}
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
        label_map=args.label_map, torch_compile=args.torch_compile,
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
    data = summary.to_dict()
    lines = [f"{summary.done} segmented, {summary.skipped} already done, {summary.failed} failed of {summary.total} "
             f"in {summary.seconds:.1f} s ({summary.volumes_per_second:.2f} volumes/s on {summary.workers} workers)",
             f"  manifest: {summary.manifest}"]
    lines += [f"  failed: {name}: {error}" for name, error in summary.errors.items()]
    _emit(args, data, "\n".join(lines))
    if summary.failed:
        raise InputError(f"{summary.failed} of {summary.total} volume(s) failed (see {summary.manifest}); "
                         "fix them and rerun the same command: finished volumes are skipped.")


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
        monitor=_monitor(args),
    )
    _emit(args, summary, summary["markdown"] + f"\nTables and plot written to {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import default_demo_dir, format_demo, run_demo

    out = args.out or default_demo_dir()
    result = run_demo(out, runtime=args.runtime, train=args.train, model=args.model, monitor=_monitor(args))
    _emit(args, result, format_demo(result))


def cmd_info(args: argparse.Namespace) -> None:
    from ..engines import choose_runtime
    from ..core.sysinfo import system_info

    info = system_info()
    info["auto_runtime"] = {}
    for precision in PRECISIONS:
        try:
            runtime, reason = choose_runtime(precision)
            info["auto_runtime"][precision] = {"runtime": runtime, "reason": reason}
        except PTQError as exc:
            info["auto_runtime"][precision] = {"runtime": None, "reason": str(exc)}
    cpu = info["cpu"]
    flags = ", ".join(name for name, present in cpu["flags"].items() if present) or "none of AVX2/AVX-512/AMX"
    lines = [
        f"platform: {info['platform']}",
        f"cpu: {cpu['model']} ({cpu['usable_cores']} usable cores; {flags})",
        f"memory: {info['memory_bytes'] / 2**30:.1f} GiB",
        f"gpus: {', '.join(map(str, info['gpus'])) or 'none'}",
    ]
    for name, version in info["versions"].items():
        if name == "onnxruntime_providers_unusable":
            lines.append(f"onnxruntime providers not usable here: {', '.join(version)} (no GPU)")
            continue
        shown = version.get("missing") if isinstance(version, dict) else version
        lines.append(f"{name}: {'missing: ' if isinstance(version, dict) else ''}{shown}")
    for precision, choice in info["auto_runtime"].items():
        lines.append(f"auto runtime for {precision}: {choice['runtime'] or 'none'} ({choice['reason']})")
    _emit(args, info, "\n".join(lines))


def _add_tensorrt_options(cmd: argparse.ArgumentParser) -> None:
    group = cmd.add_argument_group("TensorRT build (used only when a TensorRT engine is built)")
    group.add_argument("--trt-opt-level", type=int, choices=range(6), metavar="0-5", default=None,
                       help="builder optimization level (default 2: shorter builds than TensorRT's 3)")
    group.add_argument("--trt-timing-cache", default="auto", metavar="PATH|auto|off",
                       help="kernel timing cache reused across builds (auto: the user cache folder)")


def _tensorrt_options(args: argparse.Namespace):
    """A context applying the --trt-* options to every TensorRT build of this command."""
    if getattr(args, "trt_opt_level", None) is None and getattr(args, "trt_timing_cache", "auto") == "auto":
        return contextlib.nullcontext()  # the builder's defaults; importing the engines (torch) would slow startup
    from ..engines.tensorrt_engine import DEFAULT_OPTIMIZATION_LEVEL, TensorRTBuildOptions, use_build_options

    level = DEFAULT_OPTIMIZATION_LEVEL if args.trt_opt_level is None else args.trt_opt_level
    return use_build_options(TensorRTBuildOptions(optimization_level=level, timing_cache=args.trt_timing_cache))


PRECISION_HELP = (f"engine precision ({NO_GPU_NOTE}) (default: {DEFAULT_PRECISION}; "
                  "fp32 with --runtime torch)")
RUNTIME_HELP = "inference runtime; auto: TensorRT on an NVIDIA GPU, else OpenVINO, else ONNX Runtime"
MODEL_FOLDER_HELP = "model folder from `ptqseg quantize`"


def _common_options() -> Parser:
    """Options every command takes (output format, progress, debugging, engine cache, OpenVINO float)."""
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object (also for errors) instead of text")
    common.add_argument("--progress-lines", action="store_true", help="machine-readable progress on stderr")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    common.add_argument("--cache-dir", help="engine cache folder (default: $PTQSEG_CACHE_DIR or the user cache folder)")
    common.add_argument("--cpu-float", choices=["f32", "bf16"],
                        help="OpenVINO INT8 engines: precision of the layers the INT8 graph leaves in floating point "
                             "(default f32, or $PTQSEG_CPU_FLOAT); bf16 can be faster on AMX CPUs, depending on the "
                             "network (f32 where the CPU lacks bf16; check with segment --compare); FP32 engines stay f32")
    return common


def _add_engine_options(cmd: argparse.ArgumentParser, precision_default: str | None = None) -> None:
    """--runtime and --precision of the commands that open one engine."""
    cmd.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    cmd.add_argument("--precision", choices=PRECISIONS, default=precision_default, help=PRECISION_HELP)


def _add_quantize_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", required=True,
                   help="model spec (.json/.yaml), a model file with a spec beside it, a MONAI bundle folder "
                        "or an nnU-Net v2 results folder")
    q.add_argument("--calibration", required=True, nargs="+",
                   help="unlabeled calibration volumes (like those you will segment) and/or folders of them")
    q.add_argument("--out", required=True, help="model folder to write")
    q.add_argument("--patches", type=int_at_least(1), default=32, help="number of calibration patches")
    q.add_argument("--method", choices=["max", "entropy"], default="max",
                   help="activation range calibration (entropy: for outlier-heavy activations)")
    q.add_argument("--seed", type=int_at_least(0), default=0, help="calibration patch sampling seed")
    q.add_argument("--exclude-nodes", nargs="*", help="regexes of ONNX node names kept in high precision")
    _add_placement_options(q)
    q.add_argument("--folds", nargs="+", help="nnU-Net folds to quantize (default: all present)")
    q.add_argument("--checkpoint", choices=["checkpoint_final.pth", "checkpoint_best.pth"],
                   default="checkpoint_final.pth", help="nnU-Net checkpoint of each fold")
    _add_guard_options(q)


def _add_placement_options(q: argparse.ArgumentParser) -> None:
    """quantize: where the Q/DQ nodes go (--placement, --activations, --subpixel)."""
    q.add_argument("--placement", choices=["auto", "modelopt", "cpu"], default=None,
                   help="Q/DQ placement: 'auto' (default; the one for the INT8 runtime `segment --runtime auto` picks "
                        "here: ModelOpt's for TensorRT, 'cpu' for OpenVINO, 'cpu' with u8 and --subpixel for ONNX "
                        "Runtime; ModelOpt's with the accuracy guard, --exclude-nodes or nnU-Net folders), "
                        "'modelopt' (TensorRT's rules, the paper's) or 'cpu' (INT8 chains through activation/add/"
                        "concat/ConvTranspose for OpenVINO and ONNX Runtime; the default when --activations or "
                        "--subpixel is given)")
    q.add_argument("--activations", choices=["s8", "u8"], default="s8",
                   help="activation type of the 'cpu' placement (s8 symmetric, best for OpenVINO; u8 is ONNX Runtime's "
                        "preset: every conv fuses into QLinearConv except those it runs faster in float, the "
                        "first layer on 1-3 channels and the logits conv)")
    q.add_argument("--subpixel", action="store_true",
                   help="'cpu' placement for ONNX Runtime: ConvTranspose rewritten exactly as Conv + pixel shuffle "
                        "(ONNX Runtime's 3D ConvTranspose is slow and float-only; slower on OpenVINO)")
    q.add_argument("--target-cpu", choices=["auto", "vnni", "avx2"], default="auto",
                   help="the CPU that will run the INT8 file: 'auto' (this computer, see `ptqseg info`), 'vnni' "
                        "(int8 dot-product instructions: AVX512-VNNI, AVX-VNNI or AMX; also for NVIDIA GPUs) or "
                        "'avx2' (x86 CPUs without them: convolution weights get 7 bits, since 8-bit ones saturate "
                        "their 16-bit sums and lose FP32's answer)")


def _add_guard_options(q: argparse.ArgumentParser) -> None:
    """quantize: the accuracy guard (layers kept in FP32 until INT8 agrees with FP32 well enough)."""
    q.add_argument("--min-agreement", type=float, help="accuracy guard: least INT8-vs-FP32 Dice on held-out data; "
                   "the most sensitive layers stay FP32 until it holds")
    q.add_argument("--max-dice-drop", type=float, help="accuracy guard: most Dice lost against the FP32 "
                   "prediction (same as --min-agreement 1-D)")
    q.add_argument("--guard-runtime", choices=RUNTIME_CHOICES, default="auto",
                   help="runtime whose INT8 result the guard checks (default: the one segment would pick)")
    q.add_argument("--max-kept-layers", type=int_at_least(1), default=8, help="accuracy guard: most layers kept in FP32")


def _add_build_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--model", required=True, help=MODEL_FOLDER_HELP)
    _add_engine_options(b)
    _add_tensorrt_options(b)


def _add_segment_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, action="append",
                   help="model folder from `ptqseg quantize`; repeat for nnU-Net parts (TotalSegmentator) or give a parts file")
    s.add_argument("--input", required=True, help="NIfTI/NRRD/MHA file or DICOM series folder")
    s.add_argument("--output", required=True, help="label map to write (.nii.gz/.nii/.nrrd/.seg.nrrd)")
    _add_engine_options(s)
    s.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="patches per network call (default: 4 for OpenVINO where their logits fit in 256 MB, else 1)")
    s.add_argument("--torch-compile", choices=TORCH_COMPILE_MODES, default=None,
                   help="--runtime torch: torch.compile the network (GPU: ~1.9x faster per window, but the first "
                        "volume pays 10-25 s of compiling; 'reduce-overhead' also uses CUDA graphs)")
    s.add_argument("--compare", action="store_true",
                   help="also run FP32 on the same runtime; report its time and the agreement Dice")
    s.add_argument("--reference", help="reference label map for Dice")
    s.add_argument("--mirroring", action="store_true", help="nnU-Net models: test-time mirroring (slower)")
    s.add_argument("--step-size", type=float, help="nnU-Net models: sliding-window step (default 0.5)")
    s.add_argument("--label-map",
                   help="model class=reference label pairs for Dice, e.g. 1=5,2=1 (default: by name, else value)")
    _add_tensorrt_options(s)


def _add_segment_batch_options(sb: argparse.ArgumentParser) -> None:
    sb.add_argument("--model", required=True, help=MODEL_FOLDER_HELP)
    sb.add_argument("--inputs", required=True, nargs="+", help="folder(s), list file(s) (.txt) and/or volume files")
    sb.add_argument("--output-dir", required=True, help="folder for the label maps and manifest.jsonl")
    sb.add_argument("--ray-address", help="existing Ray cluster ('auto' or HOST:PORT); default: start a local one")
    sb.add_argument("--workers", type=int_at_least(1), default=2, help="worker actors, one engine each")
    sb.add_argument("--threads-per-worker", type=int_at_least(1), default=1, help="CPU threads per worker")
    sb.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker, e.g. 1 or 0.5")
    sb.add_argument("--no-pin-cpus", action="store_true",
                    help="local cluster: let workers share all CPUs (default: each gets its own --threads-per-worker CPUs)")
    _add_engine_options(sb, precision_default="int8")
    sb.add_argument("--torch-compile", choices=TORCH_COMPILE_MODES, default=None,
                    help="--runtime torch: compile each worker's network once (10-25 s), faster for every volume after")


def _add_evaluate_options(e: argparse.ArgumentParser) -> None:
    e.add_argument("--prediction", required=True, help="label map to score")
    e.add_argument("--reference", required=True, help="reference (ground-truth) label map")
    e.add_argument("--labels", type=int, nargs="*",
                   help="prediction label values (default: its label table, else all present)")
    e.add_argument("--label-map", help="prediction=reference label pairs, e.g. 1=5,2=1, or a JSON file/object")
    e.add_argument("--reference-labels",
                   help="label table of the reference (JSON/CSV; default: one beside the reference)")


def _add_benchmark_options(m: argparse.ArgumentParser) -> None:
    m.add_argument("--model", required=True, help=MODEL_FOLDER_HELP)
    m.add_argument("--input", required=True, help="volume to segment")
    m.add_argument("--reference", help="reference label map for Dice")
    m.add_argument("--out", required=True, help="folder for the Markdown/CSV/JSON tables and the plot")
    m.add_argument("--runtimes", nargs="+", default=["auto"], choices=RUNTIME_CHOICES, help="runtimes to compare")
    m.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=PRECISIONS,
                   help=f"precisions to compare ({NO_GPU_NOTE}; combinations a runtime cannot run are skipped)")
    m.add_argument("--repeats", type=int_at_least(1), default=20, help="timed repetitions per engine (FP32 and INT8 interleaved)")
    m.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed calls per engine first")
    m.add_argument("--batch-size", type=int_at_least(1), default=1, help="patches per network call")
    _add_tensorrt_options(m)


def _add_demo_options(d: argparse.ArgumentParser) -> None:
    d.add_argument("--out", default=None,
                   help="working folder (default: 'demo' in the user cache folder, replaced on each run; printed at the end)")
    d.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    d.add_argument("--model", default="unet", choices=["unet", "segresnet"], help="shipped sample network")
    d.add_argument("--train", action="store_true", help="train the sample network instead of loading shipped weights")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line in one place; add a command with ``add(name, function, help)`` and its options."""
    formatter = HelpFormatter
    parser = Parser(prog="ptqseg", description=__doc__.split("\n")[0], formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _common_options()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_text, description=help_text, formatter_class=formatter)
        cmd.set_defaults(func=func)
        return cmd

    _add_quantize_options(add("quantize", cmd_quantize,
                              "export a model to ONNX and quantize it to INT8 Q/DQ on unlabeled volumes"))
    _add_build_options(add("build", cmd_build, "build (or load from cache) one engine of a model folder"))
    _add_segment_options(add("segment", cmd_segment, "segment a volume and write a label map on its grid"))
    _add_segment_batch_options(add("segment-batch", cmd_segment_batch,
                                   "segment a cohort of volumes on a Ray cluster (local by default)"))
    _add_evaluate_options(add("evaluate", cmd_evaluate, "Dice of a label map against a reference"))
    _add_benchmark_options(add("benchmark", cmd_benchmark,
                               "paper-style table: size, latency, Dice per runtime and precision"))
    _add_demo_options(add("demo", cmd_demo, "synthetic CT phantoms -> sample network -> INT8 -> FP32 vs INT8 table"))
    add("info", cmd_info, "CPU features, GPUs and runtime versions")
    return parser


def _cancel_on_terminate() -> None:
    """SIGTERM (the Slicer module's Cancel) unwinds like Ctrl-C, so staging files are removed."""

    def handler(signum, frame):
        raise Cancelled("Cancelled (terminated); no partial output was kept.")

    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        message, usage = exc.args
        print(usage, file=sys.stderr, end="")
        return _fail(None, "--json" in argv, f"{message} (see --help)", 2)
    saved_env = {name: os.environ.get(name) for name in ("PTQSEG_CACHE_DIR", "PTQSEG_CPU_FLOAT")}
    if args.cache_dir:
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
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback unless asked
        _close_bars(args)
        if args.debug or os.environ.get("PTQSEG_DEBUG"):
            traceback.print_exc()
        message = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)"
        return _fail(args, args.json, message, 1)


if __name__ == "__main__":
    sys.exit(main())
