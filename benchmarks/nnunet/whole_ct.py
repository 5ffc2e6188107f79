"""Whole-CT TotalSegmentator-class segmentation on CPU, end to end (issue 25): nnunetv2's own CPU predictor
against this project's OpenVINO FP32 and INT8 engines, on the same CT, in the same run, rows interleaved.

    # the real run (the lead launches it; prints the estimate first, refuses beyond --max-minutes)
    python benchmarks/nnunet/whole_ct.py --config both --repeats 3 --max-minutes 720 \\
        --out benchmarks/results/<machine>/whole_ct/whole_ct.json
    # estimate only (measures one window per row, quantizes the first part)
    python benchmarks/nnunet/whole_ct.py --config total --estimate-only --out /tmp/whole_ct.json
    # models only (CTs, folders, every part quantized into --work; a later run with the same settings reuses them)
    python benchmarks/nnunet/whole_ct.py --config both --prepare-only --out /tmp/whole_ct.json
    # the GPU counterpart (an NVIDIA GPU; TensorRT rows where TensorRT is installed); nnunetv2 stopped after 10 min
    python benchmarks/nnunet/whole_ct.py --config fast --rows nnunetv2-cuda fp32-torch fp16-torch-cuda \
        fp16-tensorrt int8-tensorrt --row-timeout nnunetv2-cuda=600 --out benchmarks/results/<machine>/whole_ct/gpu.json
    # smoke (seconds; tiny networks, not TotalSegmentator's shape; labelled SMOKE)
    python benchmarks/nnunet/whole_ct.py --config total --parts 2 --shape 32 32 24 --spacing 1.5 1.5 1.5 \\
        --tiny-networks --repeats 1 --calibration-patches 4 --out /tmp/smoke/whole_ct.json

Networks: ``totalseg_shapes.py`` (its docstring says where the shapes come from: nnunetv2's planner on this CT's
fingerprint, TotalSegmentator's trainer, step size and mirroring). Input: a synthetic abdominal CT
(``PTQLogic.samples.phantom``, default 512x512x300 at 0.8x0.8x1.5 mm, seed 0), calibration: two other seeds.
INT8: ``PTQLogic.pipeline.quantize_model`` per part (ModelOpt's placement, as for every nnU-Net folder),
``--no-guard`` with random weights. Rows (``whole_ct_rows.py``, one process each, pinned to ``--threads`` cores,
``nnUNet_def_n_proc`` = threads so nnunetv2 uses them too): nnunetv2's ``nnUNetPredictor`` on CPU through its
own API pieces, the parts merged as the project merges them and written with its SimpleITKIO; this project's
``segment`` on the parts file with OpenVINO FP32, INT8, INT8 with bf16 float layers (only where OpenVINO runs
bf16 natively); nnunetv2's row is n/a where its export (every class resampled at once) would not fit in the
memory available. ``totalseg``: the job as TotalSegmentator runs it (``whole_ct_totalseg.py``: the CT resampled
to the model's spacing first with TotalSegmentator's own functions, nnunetv2's predictor there, the labels
resampled back), much less work than nnunetv2 on the CT's grid and other labels: the baseline a TotalSegmentator
user has. A row stopped by ``--row-timeout`` is not run again in later repeats (its bound carries over); rows named
by ``--once`` run in the first repeat only. On a GPU (issue 25's counterpart table): nnunetv2's predictor on CUDA
(its export on the CPU, as nnunetv2 does it), TotalSegmentator's way on CUDA, and this project's PyTorch FP16,
TensorRT FP16 and INT8 on the quantized parts; these rows are refused up front where there is no CUDA GPU (or no
TensorRT), and were written without one: not yet run. The project's export resamples only voxels near class
borders (``sparse_export.py``), so its time depends on the weights: random weights put borders everywhere and
make that column pessimistic (``export_stage.py`` measures the stage with logits modelled on a trained network
and with noise). Agreement: each row's label map against
nnunetv2's of the same repeat. Engine builds are in the end-to-end time; OpenVINO's compile cache (in
``--work``) is cold in the first repeat only. Writes ``--out`` (raw JSON) and the Markdown table next to it.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(HERE)]

import PTQLogic  # noqa: E402,F401 - first: no library telemetry, no caches in ~ (PTQLogic/core/offline.py)
import totalseg_shapes as shapes  # noqa: E402
import whole_ct_report as report  # noqa: E402
from whole_ct_rows import BF16_ROWS, NNUNET_ROWS, started_mark  # noqa: E402
from whole_ct_totalseg import TOTALSEG_ROWS  # noqa: E402
from whole_ct_totalseg import missing_reason as totalseg_missing  # noqa: E402
from whole_ct_setup import (TEST_SEED, bf16_reason, calibration_seeds, guarded, models_key_extra,  # noqa: E402
                            needs_onnx, nnunetv2_memory_reason, prepare, prepare_parts, quantize,
                            quantized_parts_problem, run_parts, work_dir)

ROWS = ("nnunetv2", "fp32", "int8", "int8-bf16", "int8-fp32w", "int8-bf16-fp32w", "fp32-torch", "totalseg")
GPU_ROWS = report.GPU_ROWS
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN (OpenVINO, PyTorch) limited to an older ISA
DEFAULT_ROWS = ROWS[:4]  # fp32-torch (the project's pipeline on PyTorch: labels identical to nnunetv2) on request


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["total", "fast", "both"], default="total")
    p.add_argument("--parts", type=int, default=None, help="first K parts of 'total' (default all 5)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], metavar=("X", "Y", "Z"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rows", nargs="+", choices=ROWS + GPU_ROWS, default=list(DEFAULT_ROWS),
                   help="CPU rows (totalseg: the CT as TotalSegmentator runs it, whole_ct_totalseg.py), and on an "
                        "NVIDIA GPU: nnunetv2-cuda (its predictor on CUDA, autocast), totalseg-cuda, fp32-torch-cuda "
                        "(the project's pipeline, PyTorch FP32, TF32 off: the FP32 reference on a GPU), "
                        "fp16-torch-cuda (PyTorch FP16), fp16-tensorrt, int8-tensorrt")
    p.add_argument("--fp32-windows", type=float, default=0.25, metavar="SHARE",
                   help="rows int8-fp32w, int8-bf16-fp32w: INT8 with at most this share of each part's windows, "
                        "those INT8 is least sure of, taken from the FP32 graph (as ptqseg segment --fp32-windows; "
                        "with the bf16 remainder, that graph's float layers run in bf16 too)")
    p.add_argument("--out", type=Path, help="raw JSON to write (the .md goes next to it); required but with "
                   "--prepare-parts, which writes only the quantized parts")
    p.add_argument("--work", type=Path, default=Path("/tmp/ptqseg-whole-ct"), help="CTs, models, label maps")
    p.add_argument("--weights", type=Path, help="trained checkpoints, DIR/Dataset29x_*/*__3d_fullres/fold_0")
    p.add_argument("--labels", type=Path, default=shapes.TOTAL_LABELS, help="the 117 'total' label names (JSON)")
    p.add_argument("--calibration-patches", type=int, default=32)
    p.add_argument("--calibration-cts", type=int, default=2,
                   help="calibration CTs (other seeds than the test CT); with 3 or more the accuracy guard holds one "
                        "out whole and measures agreement on it as segment runs it")
    p.add_argument("--exclude-nodes", nargs="+", default=[], metavar="REGEX",
                   help="ONNX node names kept in FP32 in every part (as ptqseg quantize --exclude-nodes), e.g. the "
                        "first convolution and the segmentation layer")
    p.add_argument("--target-cpu", choices=["auto", "vnni", "avx2"], default="auto",
                   help="the CPU the INT8 parts are quantized for (as ptqseg quantize --target-cpu; auto: this one, "
                        "ONEDNN_MAX_CPU_ISA included); vnni with ONEDNN_MAX_CPU_ISA=AVX2 runs VNNI parts on the "
                        "emulated AVX2 CPU")
    p.add_argument("--method", choices=["entropy", "max", "percentile"], default="entropy",
                   help="activation calibration of the INT8 parts (as ptqseg quantize --method)")
    p.add_argument("--percentile", type=float, help="with --method percentile (default 99.99)")
    p.add_argument("--bias-correction", action="store_true",
                   help="correct each quantized layer's mean output shift (as ptqseg quantize --bias-correction)")
    p.add_argument("--equalize", action="store_true",
                   help="equalize each part's channel ranges before export (as ptqseg quantize --equalize)")
    p.add_argument("--min-agreement", type=float,
                   help="the accuracy guard's target (as ptqseg quantize --min-agreement; default 0.98)")
    p.add_argument("--max-kept-layers", type=int, help="the guard's limit (as ptqseg quantize; default 8)")
    p.add_argument("--on-miss", choices=["fail", "fp32"], default="fail",
                   help="a part whose INT8 misses the guard's target: stop (fail) or keep it in FP32 (as ptqseg "
                        "quantize --on-miss)")
    p.add_argument("--no-guard", action="store_true",
                   help="quantize trained weights without the accuracy guard (agreement recorded, not enforced)")
    p.add_argument("--max-minutes", type=float, help="refuse a run whose estimate exceeds this")
    p.add_argument("--row-timeout", nargs="+", default=[], metavar="[ROW=]SECONDS",
                   help="stop a row's process after this long (every row, or ROW=SECONDS for one); the row is "
                        "recorded as taking longer than its clock had run by then (imports excluded, as for finished "
                        "rows): a lower bound (nnunetv2's own export of a many-class model can take many minutes)")
    p.add_argument("--once", nargs="+", default=[], metavar="ROW",
                   help="rows run in the first repeat only (long baselines): their time counts once and their labels "
                        "stay the reference of every repeat")
    p.add_argument("--no-probe", action="store_true",
                   help="skip timing one window per row before the run (no estimate: --max-minutes cannot refuse)")
    p.add_argument("--reference-labels", type=Path,
                   help="nnunetv2's FP32 labels of the same CT and weights from an earlier run (a reference row's "
                        "label map): the agreement reference where no reference row runs in this one")
    p.add_argument("--note", default="", help="one line for the result's header (e.g. where the parts were quantized)")
    p.add_argument("--estimate-only", action="store_true")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the CTs and models and quantize every part into --work, then stop (a later run "
                        "with the same settings reuses them: splits a long run over several commands)")
    p.add_argument("--prepare-parts", nargs="+", metavar="PART",
                   help="with --config total: write and quantize only these parts (e.g. while the organ part still "
                        "trains), then stop; a later run with the same settings reuses them")
    p.add_argument("--quantized-from", type=Path, metavar="DIR",
                   help="INT8 parts quantized elsewhere with the same settings (DIR/<part>/, as this script writes "
                        "them under its models folder's <config>/quantized/): copied in instead of quantizing here; "
                        "the result records where from and each int8.onnx's sha256")
    p.add_argument("--tiny-networks", action="store_true", help="tests: feature widths / 8 (implies smoke)")
    p.add_argument("--smoke", action="store_true", help="label the result a smoke run, not a measurement")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.calibration_patches < 2 or args.calibration_cts < 1:
        p.error("--repeats, --threads and --calibration-cts must be at least 1, --calibration-patches at least 2")
    if not 0 < args.fp32_windows <= 1:
        p.error("--fp32-windows must be a share of the windows in (0, 1]")
    if args.parts is not None and not 1 <= args.parts <= 5:
        p.error("--parts must be 1 to 5 (the 'total' set has five parts)")
    if args.out is None and not args.prepare_parts:
        p.error("--out is required (the raw JSON to write), except with --prepare-parts")
    if args.prepare_parts and args.config != "total":
        p.error("--prepare-parts names parts of the 'total' set: use it with --config total")
    if args.prepare_parts:  # checked before the CTs are drawn (minutes)
        known = [part.name for part in run_parts("total", args.parts)]
        unknown = sorted(set(args.prepare_parts) - set(known))
        if unknown:
            p.error(f"--prepare-parts: no part {unknown} in {known}")
    if args.quantized_from is not None:  # checked before the CTs are drawn (minutes)
        if args.config == "both" or args.prepare_parts:
            p.error("--quantized-from: use it with one --config, without --prepare-parts")
        wanted = [part.name for part in run_parts(args.config, args.parts)]
        problem = quantized_parts_problem(args.quantized_from, wanted)
        if problem:
            p.error(f"--quantized-from {args.quantized_from}: {problem}")
    args.smoke = args.smoke or args.tiny_networks
    try:
        args.row_timeout = row_timeouts(args.row_timeout, args.rows)
    except ValueError as error:
        p.error(f"--row-timeout: {error}")
    if args.no_probe and args.max_minutes is not None:
        p.error("--max-minutes needs the probe's estimate: leave out --no-probe")
    if args.reference_labels is not None and not args.reference_labels.is_file():
        p.error(f"--reference-labels {args.reference_labels}: no such file")
    if not set(args.once) <= set(args.rows):
        p.error(f"--once {' '.join(args.once)}: every row named there must be one of --rows")
    missing = gpu_rows_missing(args.rows) or (set(TOTALSEG_ROWS) & set(args.rows) and totalseg_missing())
    if missing:
        p.error(missing)
    return args


def row_timeouts(values: list[str], rows: list[str]) -> dict[str, float]:
    """``["600", "nnunetv2=300"]`` -> {"*": 600.0, "nnunetv2": 300.0}; ValueError on a bad value or row."""
    limits = {}
    for value in values:
        row, _, seconds = value.rpartition("=")
        if row and row not in rows:
            raise ValueError(f"{row} is not one of --rows ({' '.join(rows)})")
        try:
            limit = float(seconds)
        except ValueError:
            raise ValueError(f"{value!r} is not SECONDS or ROW=SECONDS") from None
        if not limit > 0:
            raise ValueError(f"must be a positive number of seconds, got {seconds}")
        limits[row or "*"] = limit
    return limits


def reference_shape_error(path: Path | None, shape_kji) -> str | None:
    """Why ``--reference-labels`` cannot be this CT's labels (another shape), or None."""
    if path is None:
        return None
    shape = report.read_labels(path).shape
    if tuple(shape) == tuple(shape_kji):
        return None
    return f"--reference-labels {path}: shape {tuple(shape)}, the CT's {tuple(shape_kji)}: not the same CT"


def gpu_rows_missing(rows) -> str | None:
    """Why the GPU rows asked for cannot run on this machine (no CUDA GPU; TensorRT not importable), else None."""
    wanted = [r for r in rows if r in GPU_ROWS]
    if not wanted:
        return None
    import torch

    if not torch.cuda.is_available():
        return f"rows {', '.join(wanted)} need an NVIDIA GPU with CUDA (torch.cuda.is_available() is False here)"
    tensorrt = [r for r in wanted if r.endswith("-tensorrt")]
    if tensorrt and importlib.util.find_spec("tensorrt") is None:
        return f"rows {', '.join(tensorrt)} need TensorRT (the tensorrt module is not importable here)"
    return None


def run_child(mode: str, spec: dict[str, Any], work: Path, threads: int,
              timeout: float | None = None) -> dict[str, Any]:
    """``whole_ct_rows.py`` in its own process; its result dict, or {"error": ...}; stopped after ``timeout``
    seconds: {"error": ..., "stopped_after": S}, S the seconds its end-to-end clock had run (imports excluded, as
    in a finished row), absent if it was stopped before its clock started. Every outcome gets "cpu": the CPU
    seconds (user, kernel) and page faults of the child and its own children (:func:`child_usage`)."""
    spec_path, result_path = work / f"{mode}-spec.json", work / f"{mode}-result.json"
    spec_path.write_text(json.dumps(spec, default=str))
    result_path.unlink(missing_ok=True)
    started_mark(result_path).unlink(missing_ok=True)
    env = dict(os.environ, nnUNet_def_n_proc=str(threads), OMP_NUM_THREADS=str(threads),
               PTQSEG_CACHE_DIR=str(work / "engine-cache"),
               PTQSEG_CPU_FLOAT="bf16" if spec.get("row") in BF16_ROWS else "f32")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run([sys.executable, str(HERE / "whole_ct_rows.py"), mode, str(spec_path),
                               str(result_path)], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # the child was killed (and waited for: its usage is counted)
        mark = started_mark(result_path)
        stopped = {"error": f"stopped after {timeout:g} s (--row-timeout)", "cpu": child_usage(before)}
        if mark.is_file():
            stopped["stopped_after"] = round(time.time() - mark.stat().st_mtime, 1)
            stopped["error"] += f", {stopped['stopped_after']:g} s after its clock started"
        return stopped
    if done.returncode != 0 or not result_path.is_file():
        return {"error": f"exit {done.returncode}: {done.stderr[-3000:]}", "cpu": child_usage(before)}
    return dict(json.loads(result_path.read_text()), cpu=child_usage(before))


def child_usage(before: resource.struct_rusage) -> dict[str, float]:
    """What the children that ended since ``before`` used: CPU seconds in user code and in the kernel, minor and
    major page faults. Kernel time and faults tell a machine where memory is slow to come by (a VM faulting
    pages in) from one where the row's own work is slow."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"user_s": round(after.ru_utime - before.ru_utime, 2),
            "system_s": round(after.ru_stime - before.ru_stime, 2),
            "minor_faults": after.ru_minflt - before.ru_minflt, "major_faults": after.ru_majflt - before.ru_majflt}


def base_spec(config: dict[str, Any], cts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    return {"ct": str(cts["test"]), "folders": [str(f) for f in config["folders"]], "labels": config["labels"],
            "quantized": [str(q) for q in config["quantized"]], "parts_file": str(config["parts_file"]),
            "torch_parts_file": str(config["torch_parts_file"]),
            "step_size": config["models"].step_size, "threads": args.threads, "cpus": cpus,
            "fp32_windows": args.fp32_windows}


def estimate(configs: list[dict[str, Any]], cts, args, work: Path) -> float:
    """Measure one window per row (first part), print the run's estimate in minutes (network time only, plus
    quantizing the parts still to quantize at the first part's measured pace); inf when the probe failed."""
    total = 0.0
    for config in configs:
        spec = dict(base_spec(config, cts, args), rows=config["rows"])
        probe = (run_child("windows", spec, work, args.threads) if config["rows"] and not args.no_probe
                 else {"window_seconds": {}})
        config["window_seconds"] = probe.get("window_seconds", {})
        windows = config["windows"] * len(config["parts"])
        minutes = {r: args.repeats * windows * s / 60 for r, s in config["window_seconds"].items()}
        left = [q for q in config["quantized"][1:] if needs_onnx(args) and not (q / "nnunet_model.json").is_file()]
        first = config["quantize_seconds"][0]
        quant = None if left and first is None else (first or 0.0) * len(left) / 60  # None: first part was cached
        config["estimate_minutes"] = {"rows": minutes, "quantization": quant}
        total += sum(minutes.values()) + (quant or 0.0) if "error" not in probe else float("inf")
        if args.no_probe:
            print(f"[{config['name']}] no per-window probe (--no-probe): no estimate", flush=True)
            continue
        per = ", ".join(f"{r} {s:.2f} s" for r, s in config["window_seconds"].items())
        print(f"[{config['name']}] one window ({'x'.join(map(str, config['plans']['patch_size']))}, "
              f"{args.threads} threads): {per}; {windows} windows per row per repeat; estimate "
              + ", ".join(f"{r} {m:.1f} min" for r, m in minutes.items())
              + f", quantizing {len(left)} more part(s) " + ("(time unknown)" if quant is None else f"{quant:.1f} min")
              + ("" if "error" not in probe else f"; probe failed: {probe['error'][-400:]}"), flush=True)
    if not args.no_probe:
        print(f"estimated run: {total:.1f} min (network time only; preprocessing and export add to it)", flush=True)
    return total


def run_repeat(config: dict[str, Any], repeat: int, cts, args, work: Path,
               on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One repeat of every row, in the rotated order; ``on_row(results so far)`` after each row (the run saves
    what it has: a long run stopped or cut off keeps every finished row)."""
    rows, out = config["rows"], work / "labels" / config["name"]
    out.mkdir(parents=True, exist_ok=True)
    shift = repeat % max(len(rows), 1)
    order = rows[shift:] + rows[:shift]
    results: dict[str, Any] = {}
    stopped, finished = config.setdefault("stopped", {}), config.setdefault("finished", set())
    for row in order:
        if repeat > 0 and row in args.once:
            continue  # --once: timed in the first repeat; its labels (if it finished) stay the reference
        if row in stopped:  # --row-timeout stopped it in an earlier repeat: it is not run again, its bound holds
            results[row] = dict(stopped[row], error=f"not run again: stopped in repeat {stopped[row]['repeat']}",
                                carried=True)
            print(f"[{config['name']} repeat {repeat + 1}] {row}: {results[row]['error']}", flush=True)
            continue
        spec = dict(base_spec(config, cts, args), row=row, output=str(out / f"{row}.nii.gz"))
        timeout = args.row_timeout.get(row, args.row_timeout.get("*")) if args.row_timeout else None
        results[row] = run_child("row", spec, work, args.threads, timeout)
        if "stopped_after" in results[row]:
            stopped[row] = {"stopped_after": results[row]["stopped_after"], "repeat": repeat + 1}
        elif "seconds" in results[row]:
            finished.add(row)
        reference = score(results, finished, args, cts, out)
        if on_row is not None:
            on_row({"order": order, "rows": results, "reference": reference, "partial": True})
        print(f"[{config['name']} repeat {repeat + 1}] {row}: "
              + (f"{results[row]['seconds']:.1f} s" if "seconds" in results[row] else results[row]["error"][-300:]),
              flush=True)
    return {"order": order, "rows": results, "reference": score(results, finished, args, cts, out)}


def score(results: dict[str, Any], finished: set[str], args, cts, out: Path) -> str | None:
    """Agreement of every finished row with the reference labels, and with the phantom's truth where trained;
    after each row (a run cut off keeps them), again only where the reference changed. The reference: nnunetv2's
    labels; where its row cannot run, the project's pipeline on PyTorch FP32 (the same labels, voxel for voxel,
    wherever both ran: Testing/test_whole_ct_benchmark.py), also from the first repeat (``--once``)."""
    reference = next((r for r in report.REFERENCES if "seconds" in results.get(r, {})
                      or (r in args.once and r in finished)), None)
    if reference is None and args.reference_labels is not None:
        reference = report.GIVEN
    labels = truth = None  # each map read once per call, and only where a row needs it
    for row, result in results.items():
        to_reference = reference is not None and "seconds" in result and result.get("agreement_with") != reference
        to_truth = cts.get("truth") is not None and "seconds" in result and "truth" not in result
        if not (to_reference or to_truth):
            continue
        mine = report.read_labels(out / f"{row}.nii.gz")
        if to_reference:
            given = reference == report.GIVEN
            labels = (report.read_labels(args.reference_labels if given else out / f"{reference}.nii.gz")
                      if labels is None else labels)
            if given and labels.shape != mine.shape:
                raise SystemExit(f"--reference-labels {args.reference_labels}: shape {labels.shape}, the CT's "
                                 f"labels {mine.shape}: not the same CT")
            result["agreement"], result["agreement_with"] = report.agreement(labels, mine), reference
        if to_truth:
            truth = report.read_labels(cts["truth"]) if truth is None else truth
            result["truth"] = report.agreement(truth, mine)
    return reference


def config_record(config: dict[str, Any], cts) -> dict[str, Any]:
    repeats = config.get("repeats", [])
    return {"parts": [p.name for p in config["parts"]], "step_size": config["models"].step_size,
            "trainer": config["models"].trainer, "plans": config["plans"], "network_grid_kji": config["grid"],
            "windows_per_part": config["windows"], "ct": {"shape_xyz": list(reversed(cts["shape_kji"])),
                                                          "spacing_xyz": list(reversed(cts["spacing_kji"]))},
            "window_seconds": config.get("window_seconds"), "estimate_minutes": config.get("estimate_minutes"),
            "quantize_seconds": config["quantize_seconds"], "not_run": config["not_run"], "repeats": repeats,
            "part_guards": {p.name: part_guard(q) for p, q in zip(config["parts"], config["quantized"])},
            "summary": report.summarize(repeats, config["rows"]) if repeats else {}}


def part_guard(folder: Path) -> dict[str, Any] | None:
    """What the accuracy guard measured and decided for one quantized part (its first fold), and whether the part
    kept INT8 (``--on-miss fp32``)."""
    try:
        data = json.loads((Path(folder) / "quantization.json").read_text())
    except (OSError, ValueError):
        return None
    guard = next(iter((data.get("folds") or {}).values()), {}).get("guard") or {}
    return {"agreement": guard.get("agreement"), "initial_agreement": guard.get("initial_agreement"),
            "threshold": guard.get("threshold"), "met": guard.get("met"), "kept_layers": len(guard.get("kept") or []),
            "held_out": guard.get("held_out"), "runtime": guard.get("runtime"), "isa": guard.get("isa"),
            "int8": "int8_fallback" not in data}


def write_result(args, configs, cts) -> None:
    from PTQLogic.core.sysinfo import system_info

    isa = {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}  # an emulated older CPU, for one
    result = {"benchmark": "whole_ct (issue 25)", "smoke": args.smoke, "estimate_only": args.estimate_only,
              "command": [f"{k}={v}" for k, v in isa.items()] + ["python"] + sys.argv, "environment": isa,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": system_info(),
              "settings": {"repeats": args.repeats, "threads": args.threads, "rows": args.rows, "once": args.once,
                           "mirroring": False,
                           "weights": str(args.weights) if args.weights else "random",
                           "calibration_patches": args.calibration_patches,
                           "calibration_seeds": list(calibration_seeds(args.calibration_cts)),
                           "tiny_networks": args.tiny_networks,
                           "nnUNet_def_n_proc": args.threads, "guard": guarded(args), "note": args.note,
                           "exclude_nodes": args.exclude_nodes, "target_cpu": args.target_cpu,
                           "equalize": args.equalize,
                           "quantized_from": next((c["quantized_from"] for c in configs if c.get("quantized_from")),
                                                  None),
                           "fp32_windows": args.fp32_windows if any(r.endswith("-fp32w") for r in args.rows)
                           else None,
                           "reference_labels": args.reference_labels and {
                               "path": str(args.reference_labels),
                               "sha256": hashlib.sha256(args.reference_labels.read_bytes()).hexdigest()}},
              "configs": {c["name"]: config_record(c, cts) for c in configs}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.out, json.dumps(result, indent=1, default=str)),
                       (args.out.with_suffix(".md"), report.markdown(result))):
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text)
        tmp.replace(path)  # never a half-written file, also when a long run is stopped
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", flush=True)


def quantize_rest(config: dict[str, Any], cts, args) -> list[float | None]:
    """Quantize the parts after the first (``prepare`` did the first), where a row needs them."""
    if not needs_onnx(args):
        return []
    return [quantize(f, q, cts, args) for f, q in zip(config["folders"][1:], config["quantized"][1:])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cts = shapes.write_cts(work_dir(args, "ct", args.shape, args.spacing), args.shape, args.spacing, TEST_SEED,
                           calibration_seeds(args.calibration_cts))
    wrong = reference_shape_error(args.reference_labels, cts["shape_kji"])
    if wrong:  # before any quantizing or row: a reference of another CT would only fail after the first row
        print(wrong, file=sys.stderr)
        return 2
    if args.weights:  # phantom-trained weights: the test CT's own labels say whether the network learned anything
        cts["truth"] = shapes.write_truth(cts["test"].with_name("ct_truth.nii.gz"), TEST_SEED, cts)
    # the guard and the calibration CTs change the INT8 parts: a run never reuses parts quantized otherwise
    work = work_dir(args, "models", args.shape, args.spacing, args.tiny_networks, args.weights,
                    args.calibration_patches, args.labels, *models_key_extra(args))
    if args.prepare_parts:
        prepare_parts(args, cts, work, args.prepare_parts)
        print(f"prepared {', '.join(args.prepare_parts)} in {work}")
        return 0
    names = ["total", "fast"] if args.config == "both" else [args.config]
    configs = [prepare(name, args, cts, work) for name in names]
    if args.prepare_only:
        for config in configs:
            quantize_rest(config, cts, args)
        print(f"prepared {', '.join(names)} in {work}")
        return 0
    reason = bf16_reason() if set(BF16_ROWS) & set(args.rows) else None
    for config in configs:
        memory = nnunetv2_memory_reason(config, cts) if set(NNUNET_ROWS) & set(args.rows) else None
        not_run = {**{row: reason for row in BF16_ROWS}, **{row: memory for row in NNUNET_ROWS}}
        config["not_run"] = {k: why for k, why in not_run.items() if why and k in args.rows}
        config["rows"] = [r for r in args.rows if r not in config["not_run"]]
    minutes = estimate(configs, cts, args, work)
    if args.max_minutes is not None and minutes > args.max_minutes:
        print(f"refused: the estimate ({minutes:.0f} min) exceeds --max-minutes {args.max_minutes:g}", file=sys.stderr)
        return 3
    if not args.estimate_only:
        for config in configs:
            config["quantize_seconds"] += quantize_rest(config, cts, args)
        for repeat in range(args.repeats):
            for config in configs:
                done = config.setdefault("repeats", [])
                done.append({"rows": {}})  # this repeat, replaced by what it has after each row

                def save(partial: dict[str, Any]) -> None:
                    done[-1] = partial
                    write_result(args, configs, cts)

                done[-1] = run_repeat(config, repeat, cts, args, work, on_row=save)
            write_result(args, configs, cts)  # after every row and repeat: a run stopped early keeps what it measured
    else:
        write_result(args, configs, cts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
