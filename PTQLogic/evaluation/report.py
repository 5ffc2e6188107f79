"""Benchmark tables (Markdown like the paper's Table 1, CSV, JSON) and a latency-vs-size plot.

Speedup and size ratio compare each row with the FP32 row of the same model, runtime and device:
``speedup = fp32 latency / latency`` and ``size ratio = fp32 size / size`` (x smaller).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

from ..core.errors import InputError
from ..core.fileio import atomic_path, atomic_write_text


@dataclass
class BenchmarkRow:
    model: str
    runtime: str
    precision: str
    size_mb: float
    latency_ms: float  # median per patch batch
    volume_s: float | None = None  # whole-volume segmentation time
    dice: float | None = None  # mean Dice against reference labels
    agreement_dice: float | None = None  # mean Dice against the FP32 prediction
    peak_mem_mb: float | None = None  # GPU: peak allocated by this engine's run; CPU: process peak RSS so far
    device: str = "cpu"
    build_s: float | None = None  # engine build (TensorRT, cached afterwards) or load time
    latency_p10_ms: float | None = None  # spread of the per-patch latency over the timed repeats
    latency_p90_ms: float | None = None
    latency_min_ms: float | None = None
    latency_max_ms: float | None = None
    repeats: int | None = None
    speedup_p10: float | None = None  # spread of FP32/this ratios over interleaved rounds (paired)
    speedup_p90: float | None = None
    stages_s: dict[str, float] = field(default_factory=dict)  # whole-volume stage -> seconds
    error: str | None = None  # the runtime failed here: the row says why, the others still report

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def failed(cls, model: str, runtime: str, precision: str, error: str, device: str = "cpu") -> "BenchmarkRow":
        return cls(model, runtime, precision, float("nan"), float("nan"), device=device, error=error)


def _fp32_reference(rows: Sequence[BenchmarkRow], row: BenchmarkRow) -> BenchmarkRow | None:
    for other in rows:
        if (other.model, other.runtime, other.device, other.precision) == (row.model, row.runtime, row.device, "fp32"):
            return None if other.error else other
    return None


def speedup_and_ratio(rows: Sequence[BenchmarkRow], row: BenchmarkRow) -> tuple[float | None, float | None]:
    """(latency speedup, size ratio) of ``row`` against its FP32 reference row, None without one."""
    ref = _fp32_reference(rows, row)
    if ref is None or row.error:
        return None, None
    speedup = ref.latency_ms / row.latency_ms if row.latency_ms > 0 else None
    ratio = ref.size_mb / row.size_mb if row.size_mb > 0 else None
    return speedup, ratio


def _fmt(value: float | None, digits: int, suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}{suffix}"


def _spread(low: float | None, high: float | None, digits: int) -> str:
    return "" if low is None or high is None else f" ({low:.{digits}f}-{high:.{digits}f})"


STAGES = ("read", "preprocess", "windows", "stitch", "resample back", "write")


def machine_lines(info: dict) -> list[str]:
    """Markdown bullet lines describing the machine from :func:`PTQLogic.core.sysinfo.system_info`."""
    cpu = info.get("cpu", {})
    flags = ", ".join(name for name, present in cpu.get("flags", {}).items() if present) or "no AVX2/AVX-512/AMX"
    gpus = info.get("gpus")
    gpu_text = ", ".join(g["name"] for g in gpus) if isinstance(gpus, list) and gpus else "none"
    versions = {k: v for k, v in info.get("versions", {}).items() if isinstance(v, str)}
    return [f"- CPU: {cpu.get('model', 'unknown')}; {cpu.get('usable_cores', '?')} usable of "
            f"{cpu.get('logical_cores', '?')} logical cores; features: {flags}",
            f"- GPU: {gpu_text}; platform: {info.get('platform', '?')}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]


def _check_rows(rows: Sequence[BenchmarkRow]) -> None:
    if not rows:
        raise InputError("No benchmark rows to report; run at least one runtime/precision first.")
    for row in rows:
        if not isinstance(row, BenchmarkRow):
            raise InputError(f"Report rows must be BenchmarkRow objects; got {type(row).__name__}.")


def to_markdown(rows: Sequence[BenchmarkRow], title: str = "Benchmark", machine: dict | None = None) -> str:
    _check_rows(rows)
    header = ["Model", "Runtime", "Precision", "Device", "Size (MB)", "Size ratio", "Latency (ms)", "Speedup",
              "Volume (s)", "Dice", "Agreement Dice", "Peak mem (MB)", "Error"]
    lines = [f"### {title}", ""]
    if machine:
        lines += machine_lines(machine) + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        speedup, ratio = speedup_and_ratio(rows, row)
        latency = _fmt(row.latency_ms, 1) + ("" if row.error else _spread(row.latency_p10_ms, row.latency_p90_ms, 1))
        speed = _fmt(speedup, 2, "x") + ("" if speedup is None else _spread(row.speedup_p10, row.speedup_p90, 2))
        cells = [row.model, row.runtime, row.precision.upper(), row.device, _fmt(row.size_mb, 2), _fmt(ratio, 2, "x"),
                 latency, speed, _fmt(row.volume_s, 2), _fmt(row.dice, 4),
                 _fmt(row.agreement_dice, 4), _fmt(row.peak_mem_mb, 0), (row.error or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    repeats = sorted({row.repeats for row in rows if row.repeats})
    lines += ["", "Latency: median per patch batch (p10-p90) over "
              f"{'/'.join(map(str, repeats)) or 'the'} timed repeats after warm-up, FP32 and INT8 calls interleaved "
              "round by round; speedup: FP32 median / this median (p10-p90 of the per-round paired ratios). "
              "Speedup and size ratio are relative to the FP32 row of the same model, runtime and device; "
              "agreement Dice compares each prediction with the FP32 prediction. Peak mem: GPU memory allocated by "
              "PyTorch for CUDA engines, the process's peak resident memory so far for CPU engines. A row with an "
              "error is a runtime that failed here; the other rows are unaffected."]
    staged = [row for row in rows if row.stages_s and not row.error]
    if staged:
        lines += ["", "Whole-volume stages (s): " + ", ".join(STAGES) + ".", "",
                  "| Runtime | Precision | " + " | ".join(s.capitalize() for s in STAGES) + " | Total |",
                  "|" + "---|" * (len(STAGES) + 3)]
        for row in staged:
            cells = [_fmt(row.stages_s.get(stage), 3) for stage in STAGES]
            lines.append(f"| {row.runtime} | {row.precision.upper()} | " + " | ".join(cells)
                         + f" | {_fmt(sum(row.stages_s.values()), 3)} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[BenchmarkRow], path: str | Path) -> None:
    _check_rows(rows)
    buffer = io.StringIO()
    names = [f.name for f in fields(BenchmarkRow)] + ["speedup", "size_ratio"]
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        speedup, ratio = speedup_and_ratio(rows, row)
        writer.writerow({**row.to_dict(), "stages_s": json.dumps(row.stages_s), "speedup": speedup, "size_ratio": ratio})
    atomic_write_text(path, buffer.getvalue())


def write_json(rows: Sequence[BenchmarkRow], path: str | Path, extra: dict | None = None) -> None:
    """Rows with their speedup/size ratio; ``extra`` (e.g. the machine) is stored beside them."""
    _check_rows(rows)
    items = []
    for row in rows:
        speedup, ratio = speedup_and_ratio(rows, row)
        item = {**row.to_dict(), "speedup": speedup, "size_ratio": ratio}
        items.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in item.items()})
    atomic_write_text(path, json.dumps({**(extra or {}), "rows": items}, indent=2) + "\n")


def plot_latency_vs_size(rows: Sequence[BenchmarkRow], path_png: str | Path, title: str = "Latency vs model size") -> None:
    """Scatter of latency against size, one marker per runtime, one color per precision, points labelled."""
    _check_rows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"torch": "o", "onnxruntime": "s", "openvino": "^", "tensorrt": "D"}
    colors = {"fp32": "tab:blue", "fp16": "tab:orange", "int8": "tab:green"}
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    try:
        for row in (r for r in rows if not r.error):
            axes.scatter(row.size_mb, row.latency_ms, marker=markers.get(row.runtime, "x"),
                         color=colors.get(row.precision, "tab:gray"), s=60)
            axes.annotate(f"{row.model} {row.runtime}/{row.precision}", (row.size_mb, row.latency_ms),
                          textcoords="offset points", xytext=(5, 4), fontsize=7)
        axes.set_xlabel("Model size on disk (MB)")
        axes.set_ylabel("Latency per patch batch (ms, median)")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        with atomic_path(path_png) as tmp:
            figure.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(figure)
