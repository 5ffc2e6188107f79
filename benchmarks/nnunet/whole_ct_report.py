"""Agreement, summaries and the Markdown table of ``whole_ct.py`` (numbers in, text out; no runtimes).

    python benchmarks/nnunet/whole_ct_report.py RESULT.json   # summaries and RESULT.md again from its repeats
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from whole_ct_totalseg import TOTALSEG_ROWS  # noqa: E402  (a name only: that module imports no runtime at load)

ROW_TITLES = {
    "nnunetv2": "nnunetv2 `nnUNetPredictor`, PyTorch FP32",
    "fp32": "this project, OpenVINO FP32",
    "int8": "this project, OpenVINO INT8 (f32 remainder)",
    "int8-bf16": "this project, OpenVINO INT8 (bf16 remainder)",
    "int8-fp32w": "this project, OpenVINO INT8 (f32 remainder), unsure windows from FP32 (--fp32-windows)",
    "int8-bf16-fp32w": "this project, OpenVINO INT8 (bf16 remainder), unsure windows from the FP32 graph in bf16 "
                       "(--fp32-windows --cpu-float bf16)",
    "fp32-torch": "this project's pipeline, PyTorch FP32 (nnunetv2's arithmetic)",
    "nnunetv2-cuda": "nnunetv2 `nnUNetPredictor` on CUDA (its autocast: FP16 where torch allows)",
    "fp32-torch-cuda": "this project's pipeline, PyTorch FP32 on CUDA (TF32 off)",
    "totalseg": "TotalSegmentator's way: CT resampled to the model's spacing, nnunetv2 FP32 there, labels back",
    "totalseg-cuda": "TotalSegmentator's way, nnunetv2 on CUDA (its autocast)",
    "fp16-torch-cuda": "this project, PyTorch FP16 on CUDA",
    "fp16-tensorrt": "this project, TensorRT FP16",
    "int8-tensorrt": "this project, TensorRT INT8",
}
STAGES = ("build", "preprocess", "network", "export", "other")
CPU_USAGE = ("user_s", "system_s", "minor_faults", "major_faults")  # whole_ct.child_usage's keys
# issue 25's GPU counterpart
GPU_ROWS = ("nnunetv2-cuda", "totalseg-cuda", "fp32-torch-cuda", "fp16-torch-cuda", "fp16-tensorrt", "int8-tensorrt")
# agreement: with the first of these that ran (nnunetv2-cuda last: its autocast makes it no FP32 reference)
REFERENCES = ("nnunetv2", "fp32-torch", "fp32-torch-cuda", "nnunetv2-cuda")
GIVEN = "reference-labels"  # else with the label map given with --reference-labels
GIVEN_TITLE = "the label map given with `--reference-labels` (nnunetv2's FP32 labels from an earlier run)"


def read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Mean Dice over the labels present in either map (``evaluation.metrics.agreement_dice``'s rule), each label's
    Dice and voxel counts, and the fraction of voxels with the same label, through one confusion matrix (fast on
    117 classes)."""
    if reference.shape != other.shape:
        return {"error": f"shapes differ: {reference.shape} vs {other.shape}"}
    classes = int(max(reference.max(), other.max())) + 1
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for ref, oth in zip(reference, other):  # slice by slice: no full-volume int64 temporaries
        pairs = ref.astype(np.int64).ravel() * classes + oth.astype(np.int64).ravel()
        confusion += np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
    both, in_ref, in_other = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    present = [c for c in range(1, classes) if in_ref[c] + in_other[c] > 0]
    dice = [2.0 * both[c] / (in_ref[c] + in_other[c]) for c in present]
    return {"dice": float(np.mean(dice)) if dice else 1.0, "voxels": float(both.sum() / confusion.sum()),
            "classes": len(present), "identical": bool(both.sum() == confusion.sum()),
            "per_class": {str(c): {"dice": round(float(d), 5), "reference_voxels": int(in_ref[c]),
                                   "voxels": int(in_other[c])} for c, d in zip(present, dice)}}


def spread(values: Sequence[float]) -> dict[str, float] | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def reference_of(repeats: list[dict[str, Any]]) -> str | None:
    """The row every repeat's agreement is measured against (``REFERENCES``), None if none ran."""
    found = {r.get("reference") for r in repeats}
    return found.pop() if len(found) == 1 else None


def baseline_of(repeats: list[dict[str, Any]]) -> str:
    """nnunetv2's row the speedups are over: its CPU row where it was run, else its CUDA row (the GPU table)."""
    return "nnunetv2" if any("nnunetv2" in r["rows"] for r in repeats) or \
        not any("nnunetv2-cuda" in r["rows"] for r in repeats) else "nnunetv2-cuda"


def totalseg_of(repeats: list[dict[str, Any]]) -> str | None:
    """The TotalSegmentator-way row that ran (its CPU row first), or None."""
    return next((r for r in TOTALSEG_ROWS if any("seconds" in k["rows"].get(r, {}) for k in repeats)), None)


def _ratios(repeats: list[dict[str, Any]], base: str | None, row: str) -> list[float]:
    """base's seconds / row's, per repeat where both ran; a base run in one repeat only (``--once``) is used for
    every repeat."""
    if base is None:
        return []
    once = [k["rows"][base]["seconds"] for k in repeats if "seconds" in k["rows"].get(base, {})]
    return [k["rows"].get(base, {}).get("seconds", once[0]) / k["rows"][row]["seconds"]
            for k in repeats if "seconds" in k["rows"].get(row, {}) and once]


def summarize(repeats: list[dict[str, Any]], rows: Sequence[str]) -> dict[str, Any]:
    """Median and min-max per row over the repeats: end to end, stages, peak RSS, agreement with the reference
    row's labels (and with the phantom's truth where the weights are trained), speedup over nnunetv2 (its CPU
    row, else its CUDA row) and over the job as TotalSegmentator runs it."""
    summary, base, totalseg = {}, baseline_of(repeats), totalseg_of(repeats)
    for row in rows:
        runs = [r["rows"][row] for r in repeats if row in r["rows"] and "seconds" in r["rows"][row]]
        ratios = _ratios(repeats, base, row)
        # nnunetv2 stopped by --row-timeout: it took longer than that, so the ratio is a lower bound
        bounds = [r["rows"][base]["stopped_after"] / r["rows"][row]["seconds"] for r in repeats
                  if "seconds" in r["rows"].get(row, {}) and "stopped_after" in r["rows"].get(base, {})]
        errors = [r["rows"][row]["error"] for r in repeats if "error" in r["rows"].get(row, {})]
        summary[row] = {
            "seconds": spread([r["seconds"] for r in runs]),
            "stages": {s: spread([r["stages"].get(s) for r in runs]) for s in STAGES},
            "export_beside_network": spread([r.get("export_beside_network") or None for r in runs]),
            "peak_rss_gb": spread([r["peak_rss_bytes"] / 2**30 for r in runs]),
            "speedup_vs_nnunetv2": spread(ratios), "speedup_at_least": spread(bounds),
            "speedup_vs_totalseg": spread(_ratios(repeats, totalseg, row)),
            # repeats that ran it until it was stopped (a stopped row is not run again: its later bounds carry)
            "stopped_after": spread([r["rows"][row]["stopped_after"] for r in repeats
                                     if "stopped_after" in r["rows"].get(row, {})
                                     and not r["rows"][row].get("carried")]),
            "dice_vs_reference": spread([r.get("agreement", {}).get("dice") for r in runs]),
            "voxels_vs_reference": spread([r.get("agreement", {}).get("voxels") for r in runs]),
            "dice_vs_truth": spread([r.get("truth", {}).get("dice") for r in runs]),
            "windows": runs[0]["windows"] if runs else None, "errors": errors,
            "fp32_windows": [r.get("fp32_windows") for r in runs if r.get("fp32_windows")],
            # every repeat that ran it, stopped ones too: what the row cost the machine, not only how long it took
            "cpu": {k: spread([r["rows"][row]["cpu"][k] for r in repeats if "cpu" in r["rows"].get(row, {})])
                    for k in CPU_USAGE}}
    return summary


def _cell(value: dict[str, float] | None, fmt: str = "{:.1f}", ranged: bool = True) -> str:
    if value is None:
        return "-"
    text = fmt.format(value["median"])
    if ranged and value["n"] > 1:
        text += f" ({fmt.format(value['min'])}-{fmt.format(value['max'])})"
    return text


def _row_line(row: str, s: dict[str, Any]) -> str:
    stopped = s.get("stopped_after")
    if s["seconds"] is None and stopped:
        return f"| {ROW_TITLES[row]} | > {stopped['min']:g} (stopped; {stopped['n']} repeat(s)) |" + " |" * 12
    if s["seconds"] is None:
        why = s["errors"][0].splitlines()[-1][:160] if s["errors"] else "no result"
        return f"| {ROW_TITLES[row]} | failed: {why} |" + " |" * 12
    stages = [_cell(s["stages"][k], ranged=False) for k in STAGES]
    at_least = s.get("speedup_at_least")
    versus = (_cell(s["speedup_vs_nnunetv2"], "{:.2f}x") if s["speedup_vs_nnunetv2"] or not at_least
              else f"> {math.floor(at_least['min'] * 10 + 1e-9) / 10:.1f}x")  # a lower bound: rounded down
    return (f"| {ROW_TITLES[row]} | {_cell(s['seconds'])} | {versus} | "
            f"{_cell(s.get('speedup_vs_totalseg'), '{:.2f}x')} | "
            + " | ".join(stages) + f" | {_cell(s['peak_rss_gb'], '{:.2f}', False)} | "
            f"{_cell(s['dice_vs_reference'], '{:.4f}')} | {_cell(s['voxels_vs_reference'], '{:.5f}')} | "
            f"{_cell(s['dice_vs_truth'], '{:.4f}')} | {s['windows']} |")


def cpu_usage_lines(summary: dict[str, Any]) -> list[str]:
    """One sentence on each row's CPU seconds (user + kernel) and page faults, medians over the repeats that ran it
    (stopped ones included); none for results written before rows recorded them."""
    used = {row: s["cpu"] for row, s in summary.items() if (s.get("cpu") or {}).get("user_s")}
    if not used:
        return []

    def said(c: dict[str, Any]) -> str:
        user, kernel = c["user_s"]["median"], c["system_s"]["median"]
        return (f"{user:.0f} s + {kernel:.0f} s ({kernel / max(user + kernel, 1e-9):.0%} in the kernel), "
                f"{c['minor_faults']['median'] / 1e6:.2f} M minor and {c['major_faults']['median']:.0f} major "
                "page faults")
    return ["", "CPU time (user + kernel, medians over the repeats that ran the row, stopped ones included) and page "
            "faults: " + "; ".join(f"{ROW_TITLES[row]} {said(c)}" for row, c in used.items()) + "."]


def config_table(name: str, config: dict[str, Any]) -> list[str]:
    plans, ct = config["plans"], config["ct"]
    reference = reference_of(config.get("repeats", []))
    lines = [f"### `{name}`: {len(config['parts'])} part(s) at {plans['spacing'][0]:g} mm, patch "
             f"{'x'.join(map(str, plans['patch_size']))}, features {plans['features_per_stage']}, step "
             f"{config['step_size']}, mirroring off",
             "", f"CT {'x'.join(map(str, ct['shape_xyz']))} at {'x'.join(f'{v:g}' for v in ct['spacing_xyz'])} mm "
             f"(network grid {'x'.join(map(str, config['network_grid_kji']))} KJI, "
             f"{config['windows_per_part']} windows per part). Seconds: median (min-max) over the repeats; "
             "stages are medians.", "",
             f"Agreement (mean Dice over the labels present, and voxels with the same label) is with the labels "
             f"of: {ROW_TITLES.get(reference, GIVEN_TITLE) if reference else 'no reference row ran'}"
             + (" (nnunetv2's row did not run; this row gives nnunetv2's labels voxel for voxel wherever both "
                "ran)" if reference == "fp32-torch" else " (nnunetv2's FP32 arithmetic on the GPU: the CPU's labels "
                "up to the order of summation)" if reference == "fp32-torch-cuda" else "")
             + ". Dice vs truth: the phantom's own labels "
             "(trained weights only).", "",
             "| row | end to end s | vs nnunetv2 | vs TotalSegmentator's way | build | preprocess | network | export "
             "| other | peak RSS GB | Dice vs reference | voxel agreement | Dice vs truth | windows |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_row_line(row, s) for row, s in config["summary"].items()]
    beside = {row: s["export_beside_network"] for row, s in config["summary"].items()
              if s.get("export_beside_network")}
    if beside:
        lines += ["", "Export: the seconds the run waited for it. The rest of each part's export ran beside the next "
                  "part's sliding window (within the network column), for " + ", ".join(
                      f"{_cell(v)} s ({ROW_TITLES[r]})" for r, v in beside.items()) + " in all."]
    guards = {name: g for name, g in (config.get("part_guards") or {}).items() if g and g.get("threshold")}
    if guards:
        lines += ["", "Accuracy guard per part when quantized (INT8-vs-FP32 agreement, first -> last attempt, on "
                  f"{next(iter(guards.values()))['held_out']}): " + "; ".join(
                      f"{name} {g['initial_agreement']:.4f} -> {g['agreement']:.4f} with {g['kept_layers']} layer(s) "
                      f"in FP32, target {g['threshold']:g} " + ("met" if g["met"] else "missed")
                      + ("" if g["int8"] else ": kept in FP32") for name, g in guards.items()) + "."]
    fallbacks = sorted({(row, note) for rep in config.get("repeats", []) for row, r in rep.get("rows", {}).items()
                        for note in (r or {}).get("warnings") or [] if "ran in FP32, not INT8" in note})
    if fallbacks:
        lines += ["", "Parts that ran in FP32 in an INT8 row (quantized with `--on-miss fp32`: their INT8 missed the "
                  "accuracy guard's target): " + "; ".join(f"{ROW_TITLES[r]}: {note}" for r, note in fallbacks)]
    taken = {row: s["fp32_windows"] for row, s in config["summary"].items() if s.get("fp32_windows")}
    for row, runs in taken.items():
        first = runs[0]
        counts = sorted({r["windows"] for r in runs})
        floats = f" (float layers in {first['float_precision']})" if first.get("float_precision") else ""
        lines += ["", f"{ROW_TITLES[row]}: {'-'.join(map(str, counts))} of {first['of']} windows taken from FP32"
                  f"{floats} "
                  f"(per part {first['per_part']} in the first repeat): the most unsure, with more than "
                  f"{first['unsure_share']:.0%} of voxels whose two top logits are within {first['margin']:g}, at "
                  f"most {first['max_share']:g} of each part's windows."]
    lines += cpu_usage_lines(config["summary"])
    stopped = [row for row, s in config["summary"].items() if s.get("stopped_after")]
    if stopped:
        lines += ["", "Stopped by `--row-timeout` (the row took longer; where it is nnunetv2's, the \"vs nnunetv2\" "
                  "ratios marked > are lower bounds): " + ", ".join(ROW_TITLES[r] for r in stopped) + "."]
    lines += [f"| {ROW_TITLES[row]} | not run (estimate only) |" + " |" * 12
              for row in config["window_seconds"] or {} if row not in config["summary"]]
    lines += [f"| {ROW_TITLES[row]} | n/a: {why} |" + " |" * 12 for row, why in config["not_run"].items()]
    return lines + ["", _estimate_line(config), ""]


def _estimate_line(config: dict[str, Any]) -> str:
    """The probe the run started with: one window per row on the first part, and the estimate built from it."""
    seconds, estimate = config.get("window_seconds") or {}, config.get("estimate_minutes") or {}
    if not seconds:
        return "No per-window probe."
    rows = estimate.get("rows", {})
    return ("One window per row before the run (first part, batch 1): "
            + ", ".join(f"{r} {s:.2f} s" for r, s in seconds.items()) + "; estimate (network only): "
            + ", ".join(f"{r} {m:.1f} min" for r, m in rows.items())
            + ", quantizing the other parts " + ("time unknown" if estimate.get("quantization") is None
                                                   else f"{estimate['quantization']:.1f} min") + ".")


def markdown(result: dict[str, Any]) -> str:
    settings, machine = result["settings"], result["machine"]
    versions = machine["versions"]
    title = ("SMOKE RUN (not a result) -- " if result["smoke"] else "") + \
        ("ESTIMATE ONLY -- " if result.get("estimate_only") else "")
    gpu = any(row in GPU_ROWS for row in settings.get("rows", ()))
    lines = [f"# {title}Whole-CT TotalSegmentator-class segmentation on {'CPU and GPU' if gpu else 'CPU'} (issue 25)",
             "",
             f"Machine: {machine['cpu']['model']}{emulated(result)}, {settings['threads']} thread(s) of "
             f"{machine['cpu']['usable_cores']} usable cores, {machine['memory_bytes'] / 2**30:.0f} GiB; "
             f"torch {versions['torch']}, openvino {versions['openvino']}, nnunetv2 {versions['nnunetv2']}, "
             f"onnxruntime {versions['onnxruntime']}. Repeats: {settings['repeats']}, rows interleaved (order "
             "rotated each repeat), each row in its own process.", "",
             f"Weights: {settings['weights']}. " + ("Random weights: INT8 agreement on random weights says "
             "nothing about its fidelity on trained networks (quantized with --no-guard), and FP32 on OpenVINO "
             "differs from PyTorch FP32 where classes nearly tie, which random weights make common; the "
             "project's pipeline on PyTorch (fp32-torch) gives nnunetv2's labels exactly."
             if settings["weights"] == "random" else
             "Trained weights (on phantoms other than the test CT and the calibration CTs), quantized "
             + ("with the accuracy guard." if settings.get("guard") else "without the accuracy guard (--no-guard: "
                "agreement recorded in quantization.json, not enforced).")), ""]
    if settings.get("note"):
        lines += [f"Note: {settings['note']}", ""]
    elsewhere = settings.get("quantized_from")
    if elsewhere:
        lines += [f"INT8 parts quantized elsewhere with the same settings, copied in (`--quantized-from "
                  f"{elsewhere['path']}`): int8.onnx sha256 " + ", ".join(
                      f"{part} {(digest or 'none')[:16]}" for part, digest in elsewhere["int8_sha256"].items()) + ".",
                  ""]
    given = settings.get("reference_labels")
    if given:
        lines += [f"Reference labels given: `{given['path']}` (sha256 {given['sha256'][:16]}...), used where no "
                  "reference row ran in this run.", ""]
    if settings.get("once"):
        lines += ["Run in the first repeat only (`--once`; their labels stay the reference, their time is used for "
                  "every repeat's ratio): " + ", ".join(ROW_TITLES[r] for r in settings["once"]) + ".", ""]
    for name, config in result["configs"].items():
        lines += config_table(name, config)
    lines += ["Reproduce: `" + " ".join(result["command"]) + "`", ""]
    return "\n".join(lines)


def emulated(result: dict[str, Any]) -> str:
    """" (oneDNN limited to AVX2: ONEDNN_MAX_CPU_ISA=AVX2)" where the run emulated an older CPU, else ""."""
    env = result.get("environment") or {}
    return "".join(f" (oneDNN limited to {v}: {k}={v})" for k, v in env.items())


def rerender(path: Path) -> None:
    """Summarize a result's repeats again and rewrite its Markdown (after the report gained a column); the raw
    repeats are left as they are."""
    result = json.loads(path.read_text())
    for config in result["configs"].values():
        if config.get("repeats"):
            config["summary"] = summarize(config["repeats"], list(config["summary"]))
    path.with_suffix(".md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> None:
    """``RESULT.json ...``: re-render each table; ``--agreement REFERENCE MAP ...``: one JSON object with each label
    map's agreement with the reference map (mean and per label), e.g. for label maps of different runs."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--agreement", nargs="+", type=Path, metavar=("REFERENCE", "MAP"))
    parser.add_argument("results", nargs="*", type=Path)
    args = parser.parse_args(argv)
    for name in args.results:
        rerender(name)
    if args.agreement:
        reference = read_labels(args.agreement[0])
        scores = {str(m): agreement(reference, read_labels(m)) for m in args.agreement[1:]}
        json.dump({"command": ["python", *sys.argv], "reference": str(args.agreement[0]), "maps": scores},
                  sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
