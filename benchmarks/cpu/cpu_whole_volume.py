"""Whole-volume CPU segmentation with OpenVINO: the product's sliding window vs MONAI's, same files, same run.

Before (the product until this change, a MONAI bundle's way): MONAI ``sliding_window_inference`` over an
OpenVINO request whose logits come out (N, C, D, H, W) and are read in place, argmax over C of MONAI's
(1, C, D, H, W) average. After: :func:`PTQLogic.inference.segmenter.segment_volume` with ``OpenVINOEngine``
(channels-last logits, no output reorder; fused blending into a (D, H, W, C) sum; argmax over contiguous
class vectors). Input: the synthetic 512x512x300 CT at 0.8x0.8x1.5 mm of ``gpu_pipeline.py``, network
grid 1.5 mm, the 96^3 UNet (BatchNorm, 14 classes) of ``cpu_int8_latency.py``: ``NAME_fp32rw.onnx`` and
``NAME_s8res.onnx`` in ``--dir``. File I/O is excluded. Before and after alternate, round by round.

    python benchmarks/cpu/cpu_whole_volume.py --dir models --repeats 3 --out results/cpu_whole_volume.json
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
from gpu_pipeline import synthetic_ct  # noqa: E402

FILES = {"fp32": "fp32rw", "int8": "s8res"}  # the FP32 graph with the INT8 file's exact rewrites; --placement cpu


def make_spec(patch: int, classes: int = 14):
    from PTQLogic.core.spec import spec_from_dict

    return spec_from_dict({
        "name": "unet-bn-14", "architecture": "UNet", "classes": ["background"] + [f"c{i}" for i in range(1, classes)],
        "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": classes},
        "patch_size": [patch] * 3, "overlap": 0.25, "blend_mode": "gaussian",
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": "ct",
                          "ct_window": [-200.0, 300.0]},
    })


class MonaiBaseline:
    """The earlier product path: MONAI's sliding window over an (N, C, D, H, W) OpenVINO request."""

    def __init__(self, path: Path, precision_hint: str, threads: int | None):
        import openvino as ov

        model = ov.Core().read_model(str(path))
        shape = model.inputs[0].get_partial_shape()
        model.reshape({model.inputs[0]: ov.PartialShape([ov.Dimension()] + list(shape)[1:])})
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision_hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        self.seconds = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.request.infer({0: batch.contiguous().numpy()}, share_inputs=True, share_outputs=True)[0]
        self.seconds += time.perf_counter() - started
        return torch.from_numpy(out)

    def segment(self, volume, spec, batch: int) -> tuple[np.ndarray, float]:
        from monai.inferers import sliding_window_inference

        from PTQLogic.inference.preprocess import labels_to_input_grid, to_network_space

        self.seconds = 0.0
        with torch.inference_mode():
            image, grid = to_network_space(volume, spec)
            logits = sliding_window_inference(image[None], spec.patch_size, batch, self, overlap=spec.overlap,
                                              mode=spec.blend_mode, padding_mode="constant", cval=0.0)
            labels = torch.argmax(logits[0], dim=0).numpy().astype(np.uint8)
        del logits
        return labels_to_input_grid(labels, grid), self.seconds


def to_markdown(report: dict) -> str:
    m = report["machine"]
    flags = ", ".join(k for k, v in m["flags"].items() if v)
    lines = [f"### Whole volume on the CPU: {' x '.join(map(str, reversed(report['volume_kji'])))} CT, "
             f"{report['patch']}^3 UNet (BatchNorm or InstanceNorm per file), batch {report['batch']}, "
             f"median of {report['repeats']} (min-max)", "",
             f"- CPU: {m['cpu']}, {m['usable_cores']} usable cores; features: {flags}; file: {report.get('name', '')}",
             "", "| Precision | Sliding window | Total s | min-max | Network s | Rest s | Labels equal |",
             "|---|---|---|---|---|---|---|"]
    for key, row in report["rows"].items():
        precision, name = key.split("/")
        label = "MONAI (before)" if name == "before" else "PTQLogic channels-last (after)"
        lines.append(f"| {precision.upper()} | {label} | {row['total_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | "
                     f"{row['network_s']:.2f} | {row['rest_s']:.2f} | {row['labels_equal_fraction']:.6f} |")
    lines += ["", "Rest: preprocessing (orientation, 1.5 mm resampling, intensity), window extraction, blending, "
              "argmax and resampling back. Labels equal: fraction of voxels with the same label before and after."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--name", default="unet_bn")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--after-only", action="store_true", help="time only the product's path (no MONAI rows)")
    add_report_args(parser)
    args = parser.parse_args()
    if args.render:
        print(to_markdown(json.loads(args.render.read_text())), end="")
        return

    from PTQLogic.engines.openvino_engine import OpenVINOEngine
    from PTQLogic.inference.segmenter import segment_volume

    spec, volume = make_spec(args.patch), synthetic_ct()
    report = {"machine": machine(), "name": args.name, "volume_kji": list(volume.array.shape), "patch": args.patch,
              "batch": args.batch, "repeats": args.repeats, "rows": {}}
    for precision, variant in FILES.items():
        path = args.dir / f"{args.name}_{variant}.onnx"
        before = MonaiBaseline(path, "f32", args.threads)
        after = OpenVINOEngine(path, precision, threads=args.threads, patch_size=spec.patch_size,
                               float_precision="f32")
        segment_volume(volume, spec, after, batch_size=args.batch)  # warm-up: first-call allocations
        if not args.after_only:
            before.segment(volume, spec, args.batch)
        runs: dict = {"after": []} if args.after_only else {"before": [], "after": []}
        for _ in range(args.repeats):
            if not args.after_only:
                started = time.perf_counter()
                old_labels, network = before.segment(volume, spec, args.batch)
                runs["before"].append((time.perf_counter() - started, network))
            result = segment_volume(volume, spec, after, batch_size=args.batch)
            runs["after"].append((result.seconds, result.network_seconds))
        same = 1.0 if args.after_only else float((old_labels == result.labels.array).mean())
        for name, values in runs.items():
            total = [t for t, _ in values]
            network = [n for _, n in values]
            row = {"total_s": statistics.median(total), "min_s": min(total), "max_s": max(total),
                   "network_s": statistics.median(network),
                   "rest_s": statistics.median(t - n for t, n in values), "labels_equal_fraction": same}
            report["rows"][f"{precision}/{name}"] = row
            print(f"{precision:5s} {name:6s} total {row['total_s']:.2f} s ({row['min_s']:.2f}-{row['max_s']:.2f}) "
                  f"network {row['network_s']:.2f} s  rest {row['rest_s']:.2f} s  labels equal {same:.6f}",
                  flush=True)
    write_report(report, args.out, to_markdown)


if __name__ == "__main__":
    main()
