"""The export stage of a whole-CT nnU-Net run alone (issue 25, "make it fast"): fp16 logits on the 1.5 mm network
grid -> label map on the 0.8 x 0.8 x 1.5 mm input grid, as nnunetv2 does it and as this project does it.

    python benchmarks/nnunet/export_stage.py --classes 12 --repeats 3 \\
        --out benchmarks/results/<machine>/whole_ct/export_stage.json

Rows, interleaved (order rotated each repeat), in one process: nnunetv2's
``convert_predicted_logits_to_segmentation_with_correct_shape`` (every class resampled at once through a float64
copy of all of them) and ``PTQLogic.inference.nnunet.export.logits_to_labels`` (the grid's label where the
interpolation cannot change it, exact resampling elsewhere: ``sparse_export.py``). The project's cost depends on
how much of the volume lies near a class border, so the logits matter:
- ``--logits phantom`` (default): what a trained network gives, modelled: the abdominal phantom's labels
  (``PTQLogic.samples.phantom``, seed 0) on the network grid, each present class's logit 4 x its signed distance
  in voxels (clipped to +-4 voxels) plus smooth noise (sd 0.5), absent classes at -16;
- ``--logits noise``: blobs of 8 x smoothed Gaussian noise at 1/6 of the grid's resolution for every class, a
  worst case (borders everywhere).
Each row's labels are compared with nnunetv2's (they must be identical). Peak memory is not measured here (one
process for all rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from nnunet_factory import dataset, plans  # noqa: E402
from PTQLogic.core.sysinfo import system_info  # noqa: E402
from PTQLogic.inference.nnunet.export import logits_to_labels  # noqa: E402
from PTQLogic.inference.nnunet.predict import NnUNetRunner  # noqa: E402
from PTQLogic.inference.nnunet.sparse_export import resampled_labels  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=6, help="classes including background (TotalSegmentator: ~25 per part)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], metavar=("X", "Y", "Z"))
    p.add_argument("--network-spacing", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--logits", choices=["phantom", "noise"], default="phantom")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def setup(args: argparse.Namespace):
    names = ["background"] + [f"class{i}" for i in range(1, args.classes)]
    target = [args.network_spacing] * 3
    runner = NnUNetRunner(plans(target, [128, 128, 128]), dataset(names), "3d_fullres")
    shape = tuple(args.shape[::-1])  # (z, y, x): nnU-Net's axis order
    spacing = list(args.spacing[::-1])
    grid = tuple(int(round(s * sp / t)) for s, sp, t in zip(shape, spacing, target))
    properties = {"spacing": spacing, "shape_before_cropping": shape, "bbox_used_for_cropping": [[0, s] for s in shape],
                  "shape_after_cropping_and_before_resampling": shape}
    logits = phantom_logits(args.classes, grid) if args.logits == "phantom" else noise_logits(args.classes, grid)
    return runner, properties, logits, grid


def phantom_logits(classes: int, grid: tuple[int, ...]) -> torch.Tensor:
    from scipy import ndimage

    from PTQLogic.samples.phantom import make_phantom

    labels = make_phantom(0, grid, (1.5, 1.5, 1.5))[1].array
    logits = torch.full((classes, *grid), -16.0)
    for k in np.unique(labels)[:classes]:
        inside = labels == k
        distance = ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside)
        logits[int(k)] = torch.from_numpy(4.0 * np.clip(distance, -4, 4)).float()
    noise = torch.randn((1, classes, *[max(2, g // 4) for g in grid]), generator=torch.Generator().manual_seed(1))
    logits += 0.5 * torch.nn.functional.interpolate(noise, size=grid, mode="trilinear")[0]
    return logits.half()


def noise_logits(classes: int, grid: tuple[int, ...]) -> torch.Tensor:
    coarse = torch.randn((1, classes, *[max(2, g // 6) for g in grid]), generator=torch.Generator().manual_seed(0))
    return (8 * torch.nn.functional.interpolate(coarse, size=grid, mode="trilinear"))[0].half()


def run_row(row: str, runner, properties, logits) -> tuple[float, np.ndarray]:
    """Seconds and labels of one export: nnunetv2's function, or the project's."""
    started = time.perf_counter()
    if row == "nnunetv2":
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        labels = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.clone(), runner.plans_manager, runner.config, runner.label_manager, properties)
    else:
        labels = logits_to_labels(logits, runner.plans_manager, runner.config, runner.label_manager, properties)
    return time.perf_counter() - started, np.asarray(labels)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runner, properties, logits, grid = setup(args)
    rows = ["nnunetv2", "ptqseg"]
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    identical: dict[str, bool] = {row: True for row in rows}
    for repeat in range(args.repeats):
        order = rows[repeat % len(rows):] + rows[:repeat % len(rows)]
        reference = None
        results = {}
        for row in order:
            took, labels = run_row(row, runner, properties, logits)
            seconds[row].append(round(took, 4))
            results[row] = labels
            print(f"repeat {repeat + 1}/{args.repeats} {row}: {took:.1f} s", flush=True)
        reference = results["nnunetv2"]
        for row in rows:
            identical[row] &= bool(np.array_equal(results[row], reference))
    summary = {row: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                     "speedup_vs_nnunetv2": round(statistics.median(seconds["nnunetv2"]) / statistics.median(v), 2),
                     "labels_identical_to_nnunetv2": identical[row]} for row, v in seconds.items()}
    counts: dict[str, int] = {}
    shape = properties["shape_after_cropping_and_before_resampling"]
    resampled_labels(logits, shape, [args.network_spacing] * 3, properties["spacing"], None, np.uint8, counts=counts)
    result = {"benchmark": "nnU-Net export stage (issue 25)", "command": " ".join(sys.argv), "logits": args.logits,
              "resampled_voxel_fraction": round(counts["resampled"] / counts["voxels"], 4),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": system_info(),
              "torch_threads": torch.get_num_threads(), "classes": args.classes, "input_shape_xyz": args.shape,
              "input_spacing_xyz": args.spacing, "network_grid_zyx": list(grid), "repeats": args.repeats,
              "seconds": seconds, "summary": summary, "out": args.out.name}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(identical.values()) else 1


def markdown(result: dict) -> str:
    cpu = result["machine"].get("cpu", {})
    lines = [f"# nnU-Net export stage: {result['classes']} classes, {result['network_grid_zyx']} (z, y, x) -> "
             f"{result['input_shape_xyz']} (x, y, z) at {result['input_spacing_xyz']} mm", "",
             f"Machine: {cpu.get('model', '?')}, {result['torch_threads']} torch threads; {result['repeats']} repeats, "
             f"rows interleaved. Logits: `{result['logits']}` (see the script's docstring); the project resampled "
             f"{100 * result['resampled_voxel_fraction']:.2f}% of the output voxels exactly and took the rest from "
             f"the grid. Raw: `{result['out']}`; command: `{result['command']}`.", "",
             "| row | seconds, median (min-max) | per class s | vs nnunetv2 | labels identical to nnunetv2 |",
             "| --- | --- | --- | --- | --- |"]
    for row, s in result["summary"].items():
        name = "nnunetv2 (all classes at once)" if row == "nnunetv2" else "this project (sparse_export.py)"
        lines.append(f"| {name} | {s['median_s']:.1f} ({s['min_s']:.1f}-{s['max_s']:.1f}) | "
                     f"{s['median_s'] / result['classes']:.2f} | {s['speedup_vs_nnunetv2']:.2f}x | "
                     f"{'yes' if s['labels_identical_to_nnunetv2'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
