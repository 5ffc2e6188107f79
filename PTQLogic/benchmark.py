"""Paper-style benchmark of one model folder: every runtime x precision on one volume.

For each engine: file size, median per-patch latency (after warm-up), whole-volume time, Dice vs a
reference (if given), agreement Dice vs the same runtime's FP32 output, and peak memory.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import EngineUnavailable, InputError
from .fileio import atomic_write_text
from .progress import Monitor


def _resolve_runtimes(runtimes: Sequence[str], precisions: Sequence[str]) -> list[str]:
    from .engines import choose_runtime

    resolved: list[str] = []
    for runtime in runtimes:
        name = choose_runtime("int8" if "int8" in precisions else precisions[0])[0] if runtime == "auto" else runtime
        if name not in resolved:
            resolved.append(name)
    return resolved


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
    repeats: int = 10,
    warmup: int = 3,
    batch_size: int = 1,
    save_labels: bool = False,
    monitor: Monitor | None = None,
) -> dict[str, Any]:
    from .imageio import read_volume
    from .pipeline import open_model_dir

    monitor = monitor or Monitor()
    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}.")
    model_dir = open_model_dir(model)
    spec = model_dir.spec()
    volume = read_volume(input_path).validate(f"input volume '{input_path}'")
    ref = read_volume(reference) if reference else None
    if ref is not None:
        from .evaluate import warn_foreign_reference

        volume.require_same_grid(ref, f"Reference '{reference}'")
        warn_foreign_reference(ref.array, spec.num_classes, reference)
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(model_dir, spec, volume, ref, input_path, out, runtimes, precisions, repeats, warmup,
                    batch_size, save_labels, monitor)
    except BaseException:  # cancelled or failed: a folder this run created is not left behind half-filled
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(model_dir, spec, volume, ref, input_path, out: Path, runtimes, precisions, repeats, warmup, batch_size,
         save_labels, monitor) -> dict[str, Any]:
    from .evaluate import agreement_dice, dice_per_class, measure_latency, peak_memory_bytes
    from .imageio import write_labelmap
    from .inference import segment_volume
    from .pipeline import open_engine
    from .report import BenchmarkRow, plot_latency_vs_size, to_markdown, write_csv, write_json

    labels = list(range(1, spec.num_classes))
    ordered = sorted(precisions, key=lambda p: p != "fp32")  # FP32 first: it is the agreement reference
    rows, skipped = [], []
    for runtime in _resolve_runtimes(runtimes, precisions):
        fp32_labels = None
        for precision in ordered:
            try:
                started = time.perf_counter()
                engine, _ = open_engine(model_dir, runtime, precision, batch_size=batch_size, monitor=monitor)
                build_s = time.perf_counter() - started
            except EngineUnavailable as exc:
                skipped.append({"runtime": runtime, "precision": precision, "reason": str(exc)})
                continue
            on_gpu = engine.device.type == "cuda"
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(engine.device)
            shape = (batch_size, spec.in_channels, *spec.patch_size)
            latency = measure_latency(engine, shape, warmup=warmup, repeats=repeats)
            result = segment_volume(volume, spec, engine, batch_size=batch_size, monitor=monitor)
            if precision == "fp32":
                fp32_labels = result.labels.array
            if save_labels:
                write_labelmap(result.labels, out / f"labels_{runtime}_{precision}.nii.gz")
            rows.append(BenchmarkRow(
                model=spec.name,
                runtime=runtime,
                precision=precision,
                size_mb=engine.info.bytes_on_disk / 1e6,
                latency_ms=latency.median_ms,
                volume_s=result.seconds,
                dice=None if ref is None else dice_per_class(result.labels.array, ref.array, labels).mean,
                agreement_dice=None if fp32_labels is None or precision == "fp32"
                else agreement_dice(result.labels.array, fp32_labels, labels),
                peak_mem_mb=(peak_memory_bytes()["cuda_peak_allocated" if on_gpu else "cpu_peak_rss"] or 0) / 1e6,
                device=device_label(engine.device),
                build_s=build_s,
            ))
    if not rows:
        raise EngineUnavailable("No engine could run here: " + "; ".join(s["reason"] for s in skipped))
    title = f"{spec.name}: {Path(input_path).name}, patch {'x'.join(map(str, spec.patch_size))}, batch {batch_size}"
    markdown = to_markdown(rows, title)
    atomic_write_text(out / "benchmark.md", markdown + "\n")
    write_csv(rows, out / "benchmark.csv")
    write_json(rows, out / "benchmark.json")
    plot_latency_vs_size(rows, out / "latency_vs_size.png")
    return {
        "rows": [row.__dict__ for row in rows],
        "skipped": skipped,
        "markdown": markdown,
        "out": str(out),
    }
