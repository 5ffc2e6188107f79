"""Setting up ``whole_ct.py``'s run: work folders, the part folders and their quantized copies, and which rows
can run on this machine (bf16 only where OpenVINO runs it natively; nnunetv2 only where its export fits in memory).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import totalseg_shapes as shapes
from whole_ct_rows import BASELINE_ROWS, TORCH_ROWS

TEST_SEED, CALIBRATION_SEEDS = 0, (101, 102)


def work_dir(args: argparse.Namespace, kind: str, *inputs: Any) -> Path:
    """One folder per set of inputs (so a rerun with the same ones reuses the CTs / models in it)."""
    key = hashlib.sha1(json.dumps([str(v) for v in inputs]).encode()).hexdigest()[:10]
    folder = args.work / f"{kind}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def quantize(folder: Path, out: Path, cts: dict[str, Any], args: argparse.Namespace) -> float | None:
    """Seconds to quantize one part, or None when an earlier run left it in ``out``."""
    from PTQLogic.pipeline import quantize_model

    if (out / "nnunet_model.json").is_file():
        return None
    from PTQLogic.core.progress import Monitor

    def stage_done(stage: str, done: int, total: int) -> None:  # one line per finished stage, not per patch
        if done == total:
            print(f"  {stage} done ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"quantizing {folder.parent.name} ({args.calibration_patches} calibration patches) ...", flush=True)
    started = time.perf_counter()
    quantize_model(folder, cts["calibration"], out, num_patches=args.calibration_patches,
                   guard=guard_target(args), exclude_nodes=args.exclude_nodes,
                   target_cpu=getattr(args, "target_cpu", "auto"), method=getattr(args, "method", "entropy"),
                   percentile=getattr(args, "percentile", None),
                   bias_correction=getattr(args, "bias_correction", False), on_miss=getattr(args, "on_miss", "fail"),
                   equalize=getattr(args, "equalize", False), monitor=Monitor(on_progress=stage_done))
    seconds = time.perf_counter() - started
    print(f"quantized {folder.parent.name} in {seconds / 60:.1f} min", flush=True)
    return seconds


def guard_target(args: argparse.Namespace):
    """The accuracy guard's target for the parts: the product's default unless --min-agreement or
    --max-kept-layers change it; None without the guard."""
    from dataclasses import replace

    from PTQLogic.quantization.interface import DEFAULT_GUARD

    if not guarded(args):
        return None
    changes = {"min_agreement": getattr(args, "min_agreement", None),
               "max_kept": getattr(args, "max_kept_layers", None)}
    return replace(DEFAULT_GUARD, **{k: v for k, v in changes.items() if v is not None})


def calibration_seeds(count: int = len(CALIBRATION_SEEDS)) -> tuple[int, ...]:
    """The calibration CTs' seeds: 101, 102, ... (never the test CT's or the training phantoms')."""
    return tuple(CALIBRATION_SEEDS[0] + i for i in range(count))


def models_key_extra(args: argparse.Namespace) -> tuple[Any, ...]:
    """What else keys the models folder: the guard, a non-default number of calibration CTs or calibration method,
    bias correction, channel equalization, nodes kept in FP32 and
    an INT8 target without int8 dot products (7-bit weights: ``--target-cpu avx2``, or ``auto`` on such a CPU or one
    emulated with ``ONEDNN_MAX_CPU_ISA``), so a run never reuses parts quantized for another CPU unless it asks
    (``--target-cpu vnni`` there: the same parts on both ISAs). Empty for the settings of the committed VNNI/AMX
    runs, so their folders are found again."""
    from PTQLogic.onnx_graph.weight_range import resolve_target_cpu

    extra: tuple[Any, ...] = ("guard",) if guarded(args) else ()
    extra += ("target_cpu=avx2",) if resolve_target_cpu(getattr(args, "target_cpu", "auto"))[0] == "avx2" else ()
    extra += (f"calibration_cts={args.calibration_cts}",) if args.calibration_cts != 2 else ()
    method = getattr(args, "method", "entropy")
    extra += (f"method={method}",) if method != "entropy" else ()
    extra += (f"percentile={args.percentile}",) if getattr(args, "percentile", None) is not None else ()
    extra += ("bias_correction",) if getattr(args, "bias_correction", False) else ()
    extra += ("equalize",) if getattr(args, "equalize", False) else ()
    if guarded(args):
        extra += tuple(f"{k}={getattr(args, k)}" for k in ("min_agreement", "max_kept_layers")
                       if getattr(args, k, None) is not None)
        extra += ("on_miss=fp32",) if getattr(args, "on_miss", "fail") == "fp32" else ()
    return extra + ((f"exclude_nodes={sorted(args.exclude_nodes)}",) if args.exclude_nodes else ())


def guarded(args: argparse.Namespace) -> bool:
    """Whether the INT8 parts are quantized with the accuracy guard: trained weights, unless --no-guard (random
    weights have no answer worth guarding)."""
    return bool(args.weights) and not args.no_guard


def run_parts(name: str, count: int | None) -> tuple[Any, ...]:
    """The parts of model set ``name`` a run uses: the first ``count`` (``--parts``) of 'total', else all."""
    parts = shapes.MODEL_SETS[name].parts
    return parts[:count] if name == "total" and count else parts


def plans_for(name: str, args: argparse.Namespace, cts: dict[str, Any]) -> tuple[Any, tuple[Any, ...], list[int], dict]:
    """The model set, its parts (``--parts``), the CT's network grid and the plans every part shares: nnunetv2's
    planner on that grid, intensities from the first calibration CT (``train_totalseg_phantoms.py`` trains with
    the same plans)."""
    models = shapes.MODEL_SETS[name]
    parts = run_parts(name, args.parts)
    grid = shapes.network_grid(cts, models.spacing)
    plans = shapes.plan(models.spacing, grid, max(p.classes for p in parts) + 1,
                        shapes.intensity_properties(cts["calibration"][0]))
    return models, parts, grid, shapes.shrink(plans) if args.tiny_networks else plans


def prepare(name: str, args: argparse.Namespace, cts: dict[str, Any], work: Path) -> dict[str, Any]:
    """Plans, part folders, parts files, and the first part quantized (the estimate needs its INT8 engine)."""
    models, parts, grid, plans = plans_for(name, args, cts)
    names = shapes.label_names(args.labels)
    root = work / name
    folders = [shapes.write_part(root / "nnunet", models, p, plans, names, TEST_SEED, args.weights) for p in parts]
    quantized = [root / "quantized" / p.name for p in parts]
    (root / "quantized").mkdir(exist_ok=True)
    source = getattr(args, "quantized_from", None)
    copied = copy_quantized(source, quantized) if source is not None else None
    arch = plans["configurations"]["3d_fullres"]
    return {"name": name, "models": models, "parts": parts, "folders": folders, "quantized": quantized,
            "torch_parts_file": shapes.write_parts_file(root / "nnunet" / "parts.json", folders, names),
            "parts_file": shapes.write_parts_file(root / "quantized" / "parts.json", quantized, names),
            "labels": {str(k): v for k, v in names.items()}, "grid": grid,
            "plans": {"patch_size": arch["patch_size"], "spacing": arch["spacing"],
                      "features_per_stage": arch["architecture"]["arch_kwargs"]["features_per_stage"],
                      "n_stages": arch["architecture"]["arch_kwargs"]["n_stages"]},
            "windows": shapes.count_windows(grid, arch["patch_size"], models.step_size), "quantized_from": copied,
            "quantize_seconds": [quantize(folders[0], quantized[0], cts, args) if needs_onnx(args) else None]}


def quantized_parts_problem(source: Path, wanted: list[str]) -> str | None:
    """Why the INT8 parts quantized elsewhere (``source/<part>/``) cannot run, or None: checked before the CTs are
    drawn, since a folder the INT8 row cannot open would fail only after the CTs and the other rows."""
    from PTQLogic.core.errors import PTQError
    from PTQLogic.models.nnunet.model_dir import open_nnunet_model

    missing = [name for name in wanted if not (source / name / "nnunet_model.json").is_file()]
    if missing:
        return f"no quantized part {missing} there (expected <part>/nnunet_model.json for each of {wanted})"
    for name in wanted:
        try:
            open_nnunet_model(source / name)
        except PTQError as error:
            return f"part '{name}': {error}"
    return None


def copy_quantized(source: Path, targets: list[Path]) -> dict[str, Any]:
    """Put the INT8 parts quantized elsewhere (``source/<part>/``) where this run would quantize them, replacing
    any there; where from, and each part's int8.onnx sha256."""
    from PTQLogic.core.fileio import sha256_file

    digests = {}
    for target in targets:
        tmp = target.with_name(target.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source / target.name, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        int8 = target / "fold_0" / "int8.onnx"
        digests[target.name] = sha256_file(int8) if int8.is_file() else None
    return {"path": str(source), "int8_sha256": digests}


def prepare_parts(args: argparse.Namespace, cts: dict[str, Any], work: Path, wanted: list[str]) -> list[float | None]:
    """Write and quantize only the parts of 'total' named in ``wanted`` (the others may still be training): the
    folders and INT8 parts that :func:`prepare` and ``quantize_rest`` of a later run with the same settings reuse.
    Seconds to quantize each (None where an earlier run left it)."""
    models, parts, _, plans = plans_for("total", args, cts)  # whole_ct.py's parser checked the names
    names = shapes.label_names(args.labels)
    root = work / "total"
    (root / "quantized").mkdir(parents=True, exist_ok=True)
    chosen = [p for p in parts if p.name in wanted]
    folders = [shapes.write_part(root / "nnunet", models, p, plans, names, TEST_SEED, args.weights) for p in chosen]
    return [quantize(f, root / "quantized" / p.name, cts, args) for f, p in zip(folders, chosen)]


def needs_onnx(args: argparse.Namespace) -> bool:
    """Whether any row runs the quantized folders (their fp32.onnx / int8.onnx)."""
    return any(row not in (*BASELINE_ROWS, *TORCH_ROWS) for row in args.rows)


def bf16_reason() -> str | None:
    """None where OpenVINO runs bf16 natively (AMX / AVX512-BF16), else why the bf16 row is n/a."""
    import openvino as ov

    from PTQLogic.engines.openvino_engine import native_bf16

    if native_bf16(ov.Core()):
        return None
    return "OpenVINO has no native bf16 on this CPU (no AMX-BF16 / AVX512-BF16); it would emulate it"


def nnunetv2_memory_reason(config: dict[str, Any], cts: dict[str, Any]) -> str | None:
    """Why nnunetv2's row cannot run here: its export needs more memory than is available (it resamples every
    class at once: a float64 copy of the logits in, an fp16 array of every class at the input grid out, then an
    int64 argmax); None when it fits."""
    import psutil

    classes = max(p.classes for p in config["parts"]) + 1
    voxels, grid = float(np.prod(cts["shape_kji"])), float(np.prod(config["grid"]))
    needed = classes * (voxels * 2 + grid * (8 + 2)) + voxels * (8 + 8)
    available = psutil.virtual_memory().available
    if needed < 0.9 * available:
        return None
    return (f"nnunetv2's export would need about {needed / 2**30:.0f} GiB ({classes} classes resampled at once to "
            f"the input grid); {available / 2**30:.0f} GiB available here")
