"""`ptqseg` command line: quantize, build, segment, evaluate, benchmark, demo, info.

Every command prints a human summary (or one JSON object with ``--json``), shows progress bars
(or machine-readable lines with ``--progress-lines``, used by the Slicer module), and on failure
prints one ``error: ...`` line and exits non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable

from .engines.base import PRECISIONS, RUNTIMES
from .errors import Cancelled, InputError, PTQError
from .progress import Monitor, TqdmProgress, line_monitor


def _monitor(args: argparse.Namespace) -> Monitor:
    if args.progress_lines:
        return line_monitor(sys.stderr)
    if args.json or not sys.stderr.isatty():
        return Monitor()
    return Monitor(on_progress=TqdmProgress(sys.stderr))


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, default=str))
    else:
        print(text)


def cmd_quantize(args: argparse.Namespace) -> None:
    from .pipeline import quantize_model

    result = quantize_model(
        args.model, args.calibration, args.out, num_patches=args.patches, seed=args.seed,
        method=args.method, exclude_nodes=args.exclude_nodes or (), monitor=_monitor(args),
        placement=args.placement, activations=args.activations,
    )
    data = result.to_dict()
    _emit(args, data, (
        f"Quantized model written to {data['model_dir']}\n"
        f"  FP32 ONNX {data['fp32_mb']:.2f} MB -> INT8 ONNX {data['int8_mb']:.2f} MB "
        f"({1 / data['size_ratio']:.2f}x smaller) in {data['seconds']:.1f} s; TensorRT Q/DQ rules "
        f"{'pass' if data['qdq_ok'] else 'FAIL (see quantization.json)'}"
    ))


def cmd_build(args: argparse.Namespace) -> None:
    from .pipeline import open_engine, open_model_dir

    engine, reason = open_engine(open_model_dir(args.model), args.runtime, args.precision, monitor=_monitor(args))
    data = {**engine.info.to_dict(), "reason": reason}
    _emit(args, data, f"{engine.info.runtime} {engine.info.precision} engine ready on {engine.info.device} "
          f"({engine.info.bytes_on_disk / 1e6:.2f} MB){': ' + reason if reason else ''}")


def cmd_segment(args: argparse.Namespace) -> None:
    from .pipeline import segment

    outcome = segment(
        args.model, args.input, args.output, runtime=args.runtime, precision=args.precision,
        batch_size=args.batch_size, compare=args.compare, reference=args.reference, monitor=_monitor(args),
    )
    data = outcome.to_dict()
    lines = [
        f"Wrote {outcome.output} (+ {outcome.labels_json.name}, {outcome.labels_csv.name})",
        f"  {outcome.runtime} {outcome.precision}: {outcome.seconds:.2f} s for the volume, "
        f"{outcome.latency_ms:.1f} ms per patch, engine {outcome.engine_size_mb:.2f} MB",
    ]
    if outcome.runtime_reason:
        lines.append(f"  runtime: {outcome.runtime_reason}")
    if outcome.agreement_dice is not None:
        lines.append(f"  FP32-vs-{outcome.precision.upper()} agreement Dice {outcome.agreement_dice:.4f}")
    if outcome.reference_dice is not None:
        lines.append(f"  mean Dice vs reference {outcome.reference_dice:.4f}")
    _emit(args, data, "\n".join(lines))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import dice_per_class
    from .imageio import read_volume

    import numpy as np

    pred, ref = read_volume(args.prediction), read_volume(args.reference)
    pred.require_same_grid(ref, f"Reference '{args.reference}'")
    values = np.union1d(np.unique(pred.array), np.unique(ref.array))
    if not np.array_equal(values, np.round(values)):
        raise InputError("Label maps must hold whole numbers; one of them has fractional values.")
    labels = args.labels or [int(v) for v in values if v != 0]
    result = dice_per_class(pred.array, ref.array, labels)
    data = {"per_class": result.per_class, "excluded": result.excluded, "mean": result.mean}
    rows = [f"  {label}: {dice:.4f}" for label, dice in result.per_class.items()]
    mean = "n/a" if result.mean is None else f"{result.mean:.4f}"
    _emit(args, data, "\n".join(["Dice per label:", *rows, f"mean Dice {mean}; absent from both: {result.excluded}"]))


def cmd_benchmark(args: argparse.Namespace) -> None:
    from .benchmark import run_benchmark

    summary = run_benchmark(
        args.model, args.input, args.out, runtimes=args.runtimes, precisions=args.precisions,
        reference=args.reference, repeats=args.repeats, warmup=args.warmup, batch_size=args.batch_size,
        monitor=_monitor(args),
    )
    _emit(args, summary, summary["markdown"] + f"\nTables and plot written to {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import format_demo, run_demo

    result = run_demo(args.out, runtime=args.runtime, train=args.train, model=args.model, monitor=_monitor(args))
    _emit(args, result, format_demo(result))


def cmd_info(args: argparse.Namespace) -> None:
    from .engines import choose_runtime
    from .sysinfo import system_info

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
        shown = version.get("missing") if isinstance(version, dict) else version
        lines.append(f"{name}: {'missing: ' if isinstance(version, dict) else ''}{shown}")
    for precision, choice in info["auto_runtime"].items():
        lines.append(f"auto runtime for {precision}: {choice['runtime'] or 'none'} ({choice['reason']})")
    _emit(args, info, "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptqseg", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    common.add_argument("--progress-lines", action="store_true", help="machine-readable progress on stderr")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        cmd.set_defaults(func=func)
        return cmd

    runtime_choices = ["auto", *RUNTIMES]
    q = add("quantize", cmd_quantize, "export a model to ONNX and quantize it to INT8 Q/DQ on unlabeled volumes")
    q.add_argument("--model", required=True, help="model spec (.json/.yaml)")
    q.add_argument("--calibration", required=True, nargs="+", help="calibration volumes and/or one folder")
    q.add_argument("--out", required=True, help="model folder to write")
    q.add_argument("--patches", type=int, default=32, help="calibration patches (default 32)")
    q.add_argument("--method", choices=["max", "entropy"], default="max")
    q.add_argument("--seed", type=int, default=0, help="calibration patch sampling seed (>= 0)")
    q.add_argument("--exclude-nodes", nargs="*", help="regexes of ONNX node names kept in high precision")
    q.add_argument("--placement", choices=["modelopt", "cpu"], default="modelopt",
                   help="Q/DQ placement: 'modelopt' (TensorRT rules, default) or 'cpu' (INT8 chains through "
                        "activation/add/concat/ConvTranspose for OpenVINO and ONNX Runtime)")
    q.add_argument("--activations", choices=["s8", "u8"], default="s8",
                   help="activation type of the 'cpu' placement (s8 symmetric; u8 lets ONNX Runtime fuse more)")

    b = add("build", cmd_build, "build (or load from cache) one engine of a model folder")
    b.add_argument("--model", required=True, help="model folder from `ptqseg quantize`")
    b.add_argument("--runtime", choices=runtime_choices, default="auto")
    b.add_argument("--precision", choices=PRECISIONS, default="int8")

    s = add("segment", cmd_segment, "segment a volume and write a label map on its grid")
    s.add_argument("--model", required=True, help="model folder from `ptqseg quantize`")
    s.add_argument("--input", required=True, help="NIfTI/NRRD file or DICOM series folder")
    s.add_argument("--output", required=True, help="label map to write (.nii.gz/.nrrd)")
    s.add_argument("--runtime", choices=runtime_choices, default="auto")
    s.add_argument("--precision", choices=PRECISIONS, default="int8")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--compare", action="store_true", help="also run FP32 and report agreement Dice")
    s.add_argument("--reference", help="reference label map for Dice")

    e = add("evaluate", cmd_evaluate, "Dice of a label map against a reference")
    e.add_argument("--prediction", required=True)
    e.add_argument("--reference", required=True)
    e.add_argument("--labels", type=int, nargs="*", help="label values (default: all present)")

    m = add("benchmark", cmd_benchmark, "paper-style table: size, latency, Dice per runtime and precision")
    m.add_argument("--model", required=True, help="model folder from `ptqseg quantize`")
    m.add_argument("--input", required=True, help="volume to segment")
    m.add_argument("--reference", help="reference label map for Dice")
    m.add_argument("--out", required=True, help="folder for the Markdown/CSV/JSON tables and the plot")
    m.add_argument("--runtimes", nargs="+", default=["auto"], choices=runtime_choices)
    m.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=PRECISIONS)
    m.add_argument("--repeats", type=int, default=20, help="timed repeats per engine (default 20)")
    m.add_argument("--warmup", type=int, default=5, help="untimed calls per engine first (default 5)")
    m.add_argument("--batch-size", type=int, default=1)

    d = add("demo", cmd_demo, "synthetic CT phantoms -> sample network -> INT8 -> FP32 vs INT8 table")
    d.add_argument("--out", default="ptqseg-demo", help="working folder (default ./ptqseg-demo)")
    d.add_argument("--runtime", choices=runtime_choices, default="auto")
    d.add_argument("--model", default="unet", help="shipped sample: unet or segresnet")
    d.add_argument("--train", action="store_true", help="train the sample network instead of loading shipped weights")

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        _cancel_on_terminate()
    try:
        args.func(args)
        return 0
    except Cancelled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was kept.", file=sys.stderr)
        return 130
    except PTQError as exc:
        print(f"error: {exc}".replace("\n", " "), file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback unless asked
        if args.debug or os.environ.get("PTQSEG_DEBUG"):
            traceback.print_exc()
        message = f"unexpected {type(exc).__name__}: {exc}".replace("\n", " ")
        print(f"error: {message} (rerun with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
