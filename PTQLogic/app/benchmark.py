"""Paper-style benchmark of one model folder: every runtime x precision on one volume, with spread.

Per runtime, its engines (FP32, INT8, ...) are opened together, warmed up, then timed in interleaved
rounds (each round calls every engine once), so machine noise hits FP32 and INT8 alike; the table
gives the median with p10-p90 and min-max, and speedups with the spread of the per-round ratios.
Each engine then segments the whole volume with a stage breakdown (read, preprocess, windows,
stitch, resample back, write), its Dice against the reference and its agreement with the same
runtime's FP32 labels. A runtime that fails becomes a row carrying its error; the others still report.
The machine (CPU model and features, cores, GPUs, versions) is written with the tables.
"""
from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..core.errors import Cancelled, EngineUnavailable, InputError
from ..core.fileio import atomic_write_text
from ..core.progress import Monitor

if TYPE_CHECKING:
    from ..evaluation.report import BenchmarkRow


def _resolve_runtimes(runtimes: Sequence[str], precisions: Sequence[str]) -> list[str]:
    from ..engines import choose_runtime

    resolved: list[str] = []
    for runtime in runtimes:
        name = choose_runtime("int8" if "int8" in precisions else precisions[0])[0] if runtime == "auto" else runtime
        if name not in resolved:
            resolved.append(name)
    return resolved


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Timing:
    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def summary(self) -> dict[str, float]:
        t = self.times_ms
        return {"median_ms": self.median, "p10_ms": percentile(t, 10), "p90_ms": percentile(t, 90),
                "min_ms": min(t), "max_ms": max(t), "repeats": len(t)}


def _sync(engine) -> None:
    device = torch.device(getattr(engine, "device", "cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_latency(engines: dict[str, Any], shape: Sequence[int], warmup: int, repeats: int,
                        monitor: Monitor | None = None, seed: int = 0) -> tuple[dict[str, Timing], dict[str, str]]:
    """Per-call wall times of every engine, called in turn each round; failures -> (name -> error)."""
    if repeats < 1 or warmup < 0:
        raise InputError(f"Latency needs repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}.")
    monitor = monitor or Monitor()
    batch = torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    inputs = {name: batch.to(getattr(engine, "device", "cpu")) for name, engine in engines.items()}
    errors: dict[str, str] = {}
    live = dict(engines)
    with torch.inference_mode():
        for name, engine in list(live.items()):
            try:
                for _ in range(warmup):
                    engine(inputs[name])
                _sync(engine)
            except Exception as exc:  # a runtime failing on its first calls: reported, others go on
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                live.pop(name)
        times: dict[str, list[float]] = {name: [] for name in live}
        for round_index in range(repeats):
            monitor.update("latency", round_index, repeats)
            for name, engine in list(live.items()):
                try:
                    _sync(engine)
                    start = time.perf_counter()
                    engine(inputs[name])
                    _sync(engine)
                    times[name].append((time.perf_counter() - start) * 1000.0)
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    live.pop(name)
                    times.pop(name)
        monitor.update("latency", repeats, repeats)
    return {name: Timing(t) for name, t in times.items()}, errors


def paired_speedups(reference: Timing, other: Timing) -> tuple[float, float]:
    """p10 and p90 of the per-round ratios reference/other (rounds were interleaved, so they pair)."""
    ratios = [a / b for a, b in zip(reference.times_ms, other.times_ms) if b > 0]
    return percentile(ratios, 10), percentile(ratios, 90)


def staged_segmentation(input_path: str | Path, spec, engine, batch_size: int, monitor: Monitor,
                        write_to: Path) -> tuple[np.ndarray, dict[str, float]]:
    """Segment ``input_path`` with :func:`PTQLogic.inference.segmenter.segment_volume`, seconds per stage."""
    from ..inference.preprocess import load_transforms
    from ..inference.segmenter import segment_volume
    from ..io.volumes import read_volume, write_labelmap

    load_transforms()
    started = time.perf_counter()
    volume = read_volume(input_path).validate(f"input volume '{input_path}'")
    read = time.perf_counter() - started
    result = segment_volume(volume, spec, engine, batch_size=batch_size, monitor=monitor)
    mark = time.perf_counter()
    write_labelmap(result.labels, write_to)
    windows = result.network_seconds
    return result.labels.array, {
        "read": read, "preprocess": result.stages["preprocess"], "windows": windows,
        "stitch": max(0.0, result.stages["sliding_window"] - windows),  # window extraction, blending, argmax
        "resample back": result.stages["resample_back"], "write": time.perf_counter() - mark}


def _error_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def device_label(device: torch.device) -> str:
    """The benchmark's device column, the same wording for every runtime: "CPU" or "GPU <index> (<name>)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"GPU {index} ({torch.cuda.get_device_name(index)})"
    return device.type.upper()


def run_benchmark(
    model: str | Path,
    input_path: str | Path,
    out: str | Path,
    *,
    runtimes: Sequence[str] = ("auto",),
    precisions: Sequence[str] = ("fp32", "int8"),
    reference: str | Path | None = None,
    repeats: int = 20,
    warmup: int = 5,
    batch_size: int = 1,
    save_labels: bool = False,
    monitor: Monitor | None = None,
    label_map: str | dict[int, int] | None = None,
    reference_labels: str | Path | None = None,
) -> dict[str, Any]:
    """``label_map`` and ``reference_labels`` pair the model's classes with the reference's labels for Dice,
    as in ``ptqseg evaluate`` (explicit pairs, else names, else values)."""
    from ..evaluation.metrics import check_label_map, parse_label_map, reference_names
    from ..io.volumes import read_volume
    from ..models.model_folder import open_model_dir

    monitor = monitor or Monitor()
    if repeats < 1 or warmup < 0:
        raise InputError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}.")
    model_dir = open_model_dir(model)
    spec = model_dir.spec()
    volume = read_volume(input_path).validate(f"input volume '{input_path}'")
    ref = read_volume(reference) if reference else None
    pairing = None
    if ref is not None:  # the same checks and Dice as `ptqseg evaluate` and `segment --reference`
        check_label_map(ref.array, f"Reference '{reference}'")
        ref, _ = ref.aligned_to(volume, f"Reference '{reference}'")
        mapping = parse_label_map(label_map) if isinstance(label_map, str) or label_map is None else dict(label_map)
        pairing = {"ref_names": reference_names(reference, reference_labels), "label_map": mapping}
    elif label_map or reference_labels:
        raise InputError("--label-map and --reference-labels pair classes with --reference; give --reference too.")
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(model_dir, spec, ref, pairing, input_path, out, runtimes, precisions, repeats, warmup,
                    batch_size, save_labels, monitor)
    except BaseException:  # cancelled or failed: a folder this run created is not left behind half-filled
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _dice(predicted, ref, pred_names, pairing, labels, warnings: list[str]) -> float | None:
    """Mean Dice against the reference, paired as in `evaluate`; the pairing's warnings are kept once."""
    from ..evaluation.metrics import compare_label_maps

    comparison = compare_label_maps(predicted, ref.array, pred_names=pred_names, labels=labels, **pairing)
    warnings += [w for w in comparison.warnings if w not in warnings]
    return comparison.dice.mean


@dataclass
class _Bench:
    """What every engine's segmentation and row share within one benchmark run."""

    model_dir: Any
    spec: Any
    ref: Any  # the reference volume aligned to the input, or None
    pairing: dict[str, Any] | None  # how the model's classes pair with the reference's labels
    input_path: str | Path
    out: Path
    batch_size: int
    save_labels: bool
    monitor: Monitor
    warnings: list[str] = field(default_factory=list)  # Dice pairing warnings, each once

    def __post_init__(self) -> None:
        self.labels = list(range(1, self.spec.num_classes))
        self.pred_names = {i: c.name for i, c in enumerate(self.spec.classes)}


def _open_engines(bench: _Bench, runtime: str, ordered: list[str],
                  skipped: list[dict[str, str]]) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    """(precision -> engine, precision -> seconds to open it, precision -> why it did not open)."""
    from ..engines.open import open_engine

    engines, build_s, failed = {}, {}, {}
    for precision in ordered:
        try:
            started = time.perf_counter()
            engines[precision], _ = open_engine(bench.model_dir, runtime, precision, batch_size=bench.batch_size,
                                                monitor=bench.monitor)
            build_s[precision] = time.perf_counter() - started
        except Cancelled:
            raise
        except EngineUnavailable as exc:  # not installed / no device here: a row that says so
            skipped.append({"runtime": runtime, "precision": precision, "reason": str(exc)})
            failed[precision] = f"unavailable: {exc}"[:300]
        except Exception as exc:
            failed[precision] = _error_text(exc)
    return engines, build_s, failed


def _engine_row(bench: _Bench, runtime: str, precision: str, engine, timings: dict[str, Timing], build_s: float,
                fp32_labels: np.ndarray | None) -> tuple[BenchmarkRow, np.ndarray | None]:
    """One timed engine's row, after it segments the whole volume, and its labels (None when that failed)."""
    from ..evaluation.metrics import agreement_dice, peak_memory_bytes
    from ..evaluation.report import BenchmarkRow

    spec, out = bench.spec, bench.out
    on_gpu = engine.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(engine.device)
    try:
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            target = (out if bench.save_labels else Path(scratch)) / f"labels_{runtime}_{precision}.nii.gz"
            predicted, stages = staged_segmentation(bench.input_path, spec, engine, bench.batch_size, bench.monitor,
                                                    target)
    except Cancelled:
        raise
    except Exception as exc:
        return BenchmarkRow.failed(spec.name, runtime, precision, _error_text(exc), device_label(engine.device)), None
    timing = timings[precision].summary()
    spread = (None, None)
    if precision != "fp32" and "fp32" in timings:
        spread = paired_speedups(timings["fp32"], timings[precision])
    return BenchmarkRow(
        model=spec.name, runtime=runtime, precision=precision,
        size_mb=engine.info.bytes_on_disk / 1e6,
        latency_ms=timing["median_ms"],
        volume_s=sum(stages.values()),
        dice=None if bench.ref is None else _dice(predicted, bench.ref, bench.pred_names, bench.pairing,
                                                  bench.labels, bench.warnings),
        agreement_dice=None if fp32_labels is None or precision == "fp32"
        else agreement_dice(predicted, fp32_labels, bench.labels),
        peak_mem_mb=(peak_memory_bytes()["cuda_peak_allocated" if on_gpu else "cpu_peak_rss"] or 0) / 1e6,
        device=device_label(engine.device), build_s=build_s,
        latency_p10_ms=timing["p10_ms"], latency_p90_ms=timing["p90_ms"],
        latency_min_ms=timing["min_ms"], latency_max_ms=timing["max_ms"], repeats=int(timing["repeats"]),
        speedup_p10=spread[0], speedup_p90=spread[1],
        stages_s={k: round(v, 4) for k, v in stages.items()},
    ), predicted


def _runtime_rows(bench: _Bench, runtime: str, ordered: list[str], shape: tuple[int, ...], repeats: int,
                  warmup: int, skipped: list[dict[str, str]]) -> list[BenchmarkRow]:
    """One runtime's rows, one per precision: opened together, timed interleaved, then each segments the volume.
    Its engines are released on return, before the next runtime opens its own."""
    from ..evaluation.report import BenchmarkRow

    engines, build_s, failed = _open_engines(bench, runtime, ordered, skipped)
    timings, errors = interleaved_latency(engines, shape, warmup, repeats, bench.monitor) if engines else ({}, {})
    failed.update(errors)
    rows, fp32_labels = [], None
    for precision in ordered:
        if precision in failed:
            rows.append(BenchmarkRow.failed(bench.spec.name, runtime, precision, failed[precision]))
            continue
        if precision not in timings:
            continue
        row, predicted = _engine_row(bench, runtime, precision, engines[precision], timings, build_s[precision],
                                     fp32_labels)
        rows.append(row)
        if precision == "fp32" and predicted is not None:
            fp32_labels = predicted
    return rows


def _write_reports(rows: list[BenchmarkRow], title: str, out: Path, extra: dict[str, Any]) -> tuple[dict, str]:
    """benchmark.md, .csv, .json and the latency plot in ``out``: (the machine's description, the markdown)."""
    from ..core.sysinfo import system_info
    from ..evaluation.report import plot_latency_vs_size, to_markdown, write_csv, write_json

    machine = system_info()
    markdown = to_markdown(rows, title, machine=machine)
    atomic_write_text(out / "benchmark.md", markdown + "\n")
    write_csv(rows, out / "benchmark.csv")
    write_json(rows, out / "benchmark.json", extra={"machine": machine, "title": title, **extra})
    if any(not row.error for row in rows):
        plot_latency_vs_size(rows, out / "latency_vs_size.png")
    return machine, markdown


def _run(model_dir, spec, ref, pairing, input_path, out: Path, runtimes, precisions, repeats, warmup,
         batch_size, save_labels, monitor) -> dict[str, Any]:
    bench = _Bench(model_dir, spec, ref, pairing, input_path, out, batch_size, save_labels, monitor)
    ordered = sorted(precisions, key=lambda p: p != "fp32")  # FP32 first: it is the agreement reference
    shape = (batch_size, spec.in_channels, *spec.patch_size)
    rows, skipped = [], []
    for runtime in _resolve_runtimes(runtimes, precisions):
        rows += _runtime_rows(bench, runtime, ordered, shape, repeats, warmup, skipped)
    if not any(not row.error for row in rows):
        reasons = "; ".join(f"{row.runtime} {row.precision}: {row.error}" for row in rows)
        raise EngineUnavailable(f"No engine could run here: {reasons}")
    title = f"{spec.name}: {Path(input_path).name}, patch {'x'.join(map(str, spec.patch_size))}, batch {batch_size}"
    machine, markdown = _write_reports(rows, title, out, {"skipped": skipped, "repeats": repeats, "warmup": warmup})
    return {
        "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.to_dict().items()}
                 for row in rows],
        "skipped": skipped,
        "warnings": bench.warnings,
        "machine": machine,
        "markdown": markdown,
        "out": str(out),
    }
