"""`ptqseg demo`: the whole pipeline on built-in synthetic CT phantoms, no data or network needed.

Phantoms with known labels -> shipped (or freshly trained) sample network -> INT8 on two unlabeled
calibration phantoms (Q/DQ placed for the runtime that runs INT8 here) -> FP32 and INT8 segmentation of a held-out phantom on the best
available engine -> size, latency, Dice vs truth and FP32-vs-INT8 agreement.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.fileio import publish_dir, staging_dir
from ..core.progress import Monitor

DATA_DIR = Path(__file__).resolve().parents[1] / "samples" / "data"
SAMPLE_MODELS = {"unet": "phantom_unet.json", "segresnet": "phantom_segresnet.json"}
# both held out: the sample models were trained on seeds >= 1000 (samples.train.TRAIN_SEED_BASE)
CALIBRATION_SEED, TEST_SEED = 100, 7
MARKER = "demo.json"  # written last: a folder holding it is an earlier demo's and may be replaced


def default_demo_dir() -> Path:
    """Where ``ptqseg demo`` works without ``--out``: the user's cache folder, never the current folder."""
    override = os.environ.get("PTQSEG_DEMO_DIR")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ptqseg", appauthor=False)) / "demo"


def _check_demo_dir(out: Path) -> Path:
    out = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise InputError(f"Demo folder '{out}' is a file; give a new folder with --out.")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise InputError(f"Demo folder '{out}' already holds other files; give a new or empty folder with --out "
                             "(only an earlier demo's folder is replaced).")
    return out


def sample_spec_path(model: str) -> Path:
    if model not in SAMPLE_MODELS:
        raise InputError(f"Unknown sample model '{model}'; choose one of {sorted(SAMPLE_MODELS)}.")
    return DATA_DIR / SAMPLE_MODELS[model]


def _trained_spec(spec_path: Path, work: Path, monitor: Monitor) -> Path:
    import torch

    from ..core.spec import load_spec
    from ..samples.train import train_on_phantoms

    spec = load_spec(spec_path)
    state = train_on_phantoms(spec, monitor=monitor)
    torch.save(state, work / "trained.pt")
    replace(spec, weights="trained.pt", weights_format="state_dict").save(work / "trained_spec.json")
    return work / "trained_spec.json"


def run_demo(
    out: str | Path,
    *,
    runtime: str = "auto",
    train: bool = False,
    model: str = "unet",
    calibration_volumes: int = 2,
    calibration_patches: int = 16,
    monitor: Monitor | None = None,
) -> dict[str, Any]:
    monitor = monitor or Monitor()
    final = _check_demo_dir(Path(out))
    spec_path = sample_spec_path(model)
    # Work in a staging folder and rename it into place at the end: an interrupted demo leaves nothing.
    work = staging_dir(final)
    try:
        result = _run_demo_in(work, final, spec_path, runtime, train, calibration_volumes, calibration_patches,
                              monitor)
        (work / MARKER).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        monitor.check()
        publish_dir(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return result


def _run_demo_in(work: Path, final: Path, spec_path: Path, runtime: str, train: bool, calibration_volumes: int,
                 calibration_patches: int, monitor: Monitor) -> dict[str, Any]:
    from .benchmark import run_benchmark
    from ..samples.phantom import write_phantom_set
    from ..pipeline import quantize_model
    from ..core.spec import load_spec

    if train:
        spec_path = _trained_spec(spec_path, work, monitor)
    spacing = load_spec(spec_path).preprocessing.spacing or (1.5, 1.5, 1.5)
    calibration = write_phantom_set(work / "calibration", calibration_volumes, CALIBRATION_SEED, spacing=spacing)
    (image, truth), = write_phantom_set(work / "test", 1, TEST_SEED, spacing=spacing)
    quantized = quantize_model(
        spec_path, [img for img, _ in calibration], work / "model", num_patches=calibration_patches, monitor=monitor
    )
    bench = run_benchmark(
        work / "model", image, work / "results", runtimes=[runtime], precisions=["fp32", "int8"],
        reference=truth, repeats=5, warmup=2, save_labels=True, monitor=monitor,
    )
    result: dict[str, Any] = {
        "model": load_spec(spec_path).name,
        "output_dir": str(final),
        "quantize_seconds": quantized.seconds,
        "qdq_ok": quantized.report.get("qdq", {}).get("ok"),
        "placement": quantized.placement,
        "markdown": bench["markdown"],
    }
    for row in bench["rows"]:
        entry = {
            "runtime": row["runtime"],
            "dice": row["dice"],
            "size_mb": row["size_mb"],
            "latency_ms": row["latency_ms"],
            "volume_s": row["volume_s"],
        }
        if row["precision"] != "fp32":
            entry["agreement_dice"] = row["agreement_dice"]
        result.setdefault(row["precision"], entry)
    result["runtime"] = result.get("int8", result.get("fp32", {})).get("runtime")
    result["notes"] = _int8_notes(bench["rows"])
    return result


def _int8_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The note `segment` gives for INT8 on a CPU without int8 dot-product instructions (slower INT8 is expected)."""
    from ..core.sysinfo import cpu_int8_note

    on_cpu = any(row["precision"] == "int8" and not row.get("error") and row.get("device") == "CPU" for row in rows)
    note = cpu_int8_note() if on_cpu else None
    return [note] if note else []


def format_demo(result: dict[str, Any]) -> str:
    return "\n".join([
        result["markdown"],
        "",
        f"Quantization took {result['quantize_seconds']:.1f} s; {_placement_text(result)}. "
        f"Outputs in {result['output_dir']}",
        *(f"note: {note}" for note in result.get("notes", [])),
    ])


def _placement_text(result: dict[str, Any]) -> str:
    placement = result.get("placement") or {}
    where = (placement.get("auto") or "").removeprefix("Q/DQ placement: ")
    rules = ("pass" if result["qdq_ok"] else "not met: u8 activations are for ONNX Runtime"
             if placement.get("activations") == "u8" else "FAIL")
    return (f"Q/DQ placement {where}; " if where else "") + f"TensorRT Q/DQ rules {rules}"
