"""Network-space resampling of a whole CT on the CPU: MONAI's transforms (the product until this change) vs the
per-axis path (:mod:`PTQLogic.inference.axis_resample`), same volume, interleaved, plus the largest value difference.

Input: the synthetic 512x512x300 CT at 0.8x0.8x1.5 mm of ``gpu_pipeline.py`` (int16), to 1.5 mm in RAS.
"Before" is what ``resample_to_network`` did: a transposing float32 copy to IJK, MONAI ``Orientation``, MONAI
``Spacing`` (bilinear, border, float64). Rotated grids still take that path.

    python benchmarks/cpu/cpu_preprocess.py --repeats 7 [--onnx models/unet_bn_s8res.onnx] --out results/preprocess_ct.json

``--onnx``: also segment the CT both ways with that INT8 file on OpenVINO and report how many labels agree.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpu_int8_latency, cpu_whole_volume
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))  # gpu_pipeline.synthetic_ct
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cpu_int8_latency import add_report_args, machine, write_report  # noqa: E402
from cpu_whole_volume import make_spec  # noqa: E402
from gpu_pipeline import synthetic_ct  # noqa: E402


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"### Resampling a {' x '.join(map(str, reversed(report['volume_kji'])))} CT to the network grid "
             f"{' x '.join(map(str, report['network_shape']))} (1.5 mm), median of {report['repeats']} (min-max)", "",
             f"- CPU: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['versions'].get('torch')}, "
             f"MONAI {m['versions'].get('monai')}", "", "| path | seconds | min-max |", "|---|---|---|"]
    for name, row in report["rows"].items():
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} |")
    if "labels_equal_fraction" in report:
        lines += ["", f"Whole-volume labels with `{report['onnx']}` (OpenVINO INT8), before vs after: "
                  f"{report['labels_equal_fraction']:.6f} of voxels equal."]
    lines += ["", f"Largest difference: {report['max_abs_difference']:.2e} (values up to {report['max_abs_value']:.0f}); "
              f"speedup {report['speedup']:.2f}x."]
    return "\n".join(lines) + "\n"


def labels_agreement(volume, spec, onnx: Path) -> float:
    """Fraction of voxels whose whole-volume label is the same with MONAI's resampling and with the new one."""
    from unittest import mock

    from PTQLogic.engines.openvino_engine import OpenVINOEngine
    from PTQLogic.inference.segmenter import segment_volume

    engine = OpenVINOEngine(onnx, "int8", patch_size=spec.patch_size)
    after = segment_volume(volume, spec, engine).labels.array
    with mock.patch("PTQLogic.inference.preprocess.resample_axis_aligned", return_value=None):  # MONAI's transforms
        before = segment_volume(volume, spec, engine).labels.array
    return float((before == after).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--onnx", type=Path, help="INT8 ONNX file: compare whole-volume labels before vs after")
    add_report_args(parser)
    args = parser.parse_args()
    if args.render:
        print(to_markdown(json.loads(args.render.read_text())), end="")
        return

    from PTQLogic.inference.preprocess import _monai_resample, load_transforms, resample_to_network

    load_transforms()
    spec, volume = make_spec(96), synthetic_ct()
    source = torch.from_numpy(np.ascontiguousarray(volume.array[None]))
    paths = {
        "MONAI Orientation + Spacing, float64 (before)":
            lambda: _monai_resample(source, np.asarray(volume.ijk_to_ras), spec.preprocessing),
        "per axis (after)": lambda: resample_to_network(volume, spec)[0],
    }
    results = {name: path() for name, path in paths.items()}  # warm-up, and the values to compare
    before, after = results.values()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, path in paths.items():
            started = time.perf_counter()
            path()
            times[name].append(time.perf_counter() - started)
    rows = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for name, t in times.items()}
    medians = [row["median_s"] for row in rows.values()]
    report = {"machine": machine(), "volume_kji": list(volume.array.shape), "network_shape": list(after.shape[1:]),
              "repeats": args.repeats, "rows": rows, "speedup": medians[0] / medians[1],
              "max_abs_difference": float((after - before).abs().max()), "max_abs_value": float(before.abs().max())}
    if args.onnx:
        report["onnx"] = args.onnx.name
        report["labels_equal_fraction"] = labels_agreement(volume, spec, args.onnx)
    print(to_markdown(report), end="")
    write_report(report, args.out, to_markdown)


if __name__ == "__main__":
    main()
