"""Q/DQ placement presets and calibration methods compared on trained networks: agreement first, speed second.

Each trained sample model is quantized (no accuracy guard, so every preset shows its own agreement) on
calibration phantoms (seeds 500-503) and run on held-out 64^3 phantoms (seeds 0..N-1, never used in training
or calibration) with FP32 and INT8 on each CPU runtime. Reported per model x preset x runtime: the mean and
minimum FP32-vs-INT8 agreement Dice over the held-out volumes, and whole-volume seconds of FP32 and INT8 run
interleaved (median, and the spread of FP32/INT8). ``--reuse DIR`` evaluates folders quantized before (on
another CPU: the same files on both ISAs).

    python benchmarks/fidelity/placement_presets.py --out result.json [--held-out 5] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "PTQLogic" / "samples" / "data"
PRESETS = {  # name -> quantize_model keyword arguments
    "modelopt-max": dict(placement="modelopt", method="max"),
    "modelopt-entropy": dict(placement="modelopt", method="entropy"),
    "cpu-s8": dict(placement="cpu", method="max"),
    "cpu-u8-subpixel": dict(placement="cpu", activations="u8", subpixel=True, method="max"),
}


def _phantoms(folder: Path, count: int, seed: int) -> list[Path]:
    from PTQLogic.samples.phantom import write_phantom_set

    return [image for image, _ in write_phantom_set(folder, count, seed, spacing=(1.5, 1.5, 1.5))]


def _timed(volume, spec, engine) -> tuple[object, float]:
    from PTQLogic.inference.segmenter import segment_volume

    started = time.perf_counter()
    result = segment_volume(volume, spec, engine)
    return result.labels.array, time.perf_counter() - started


def _held_out(count: int) -> list:
    """Held-out phantoms made in memory (no image files: runs where SimpleITK is not installed)."""
    from PTQLogic.samples.phantom import make_phantom

    return [make_phantom(seed, (64, 64, 64), (1.5, 1.5, 1.5))[0] for seed in range(count)]


def _evaluate(model_dir: Path, volumes: list, runtime: str, repeats: int) -> dict:
    """FP32 and INT8 engines of the same runtime on each volume, interleaved ``repeats`` times."""
    from PTQLogic.engines.open import open_engine
    from PTQLogic.evaluation.metrics import agreement_dice
    from PTQLogic.models.model_folder import open_model_dir

    folder = open_model_dir(model_dir)
    spec = folder.spec()
    fp32, int8 = (open_engine(folder, runtime, precision)[0] for precision in ("fp32", "int8"))
    _timed(volumes[0], spec, fp32), _timed(volumes[0], spec, int8)  # warm-up: first calls compile and allocate
    agreements, ratios, int8_s, fp32_s = [], [], [], []
    for image in volumes:
        for repeat in range(repeats):
            reference, seconds32 = _timed(image, spec, fp32)
            labels, seconds8 = _timed(image, spec, int8)
            fp32_s.append(seconds32)
            int8_s.append(seconds8)
            ratios.append(seconds32 / seconds8)
        agreements.append(agreement_dice(labels, reference, range(1, spec.num_classes)))
    return {"agreement_mean": statistics.fmean(agreements), "agreement_min": min(agreements),
            "agreement_per_volume": agreements, "int8_seconds_median": statistics.median(int8_s),
            "fp32_seconds_median": statistics.median(fp32_s), "fp32_over_int8_median": statistics.median(ratios),
            "fp32_over_int8_range": [min(ratios), max(ratios)], "timed_runs": len(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["phantom_unet", "phantom_segresnet"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    parser.add_argument("--held-out", type=int, default=5)
    parser.add_argument("--ct", type=Path, help="the real-CT sample (ct_unet) instead: calibrate and evaluate on "
                        "this CT, its training CT (a relative comparison of presets, not held-out fidelity)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved FP32/INT8 runs per held-out volume")
    parser.add_argument("--patches", type=int, default=32)
    parser.add_argument("--target-cpu", default="auto")
    parser.add_argument("--keep", type=Path, help="write the model folders here (to evaluate them elsewhere)")
    parser.add_argument("--reuse", type=Path, help="evaluate the model folders in this folder instead of quantizing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from PTQLogic.core.sysinfo import cpu_int8_target, system_info

    info = system_info()
    result = {"machine": {"cpu": info["cpu"]["model"], "cores": info["cpu"]["usable_cores"],
                          "int8_target": cpu_int8_target(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                          "versions": info.get("versions")},
              "held_out_seeds": list(range(args.held_out)), "calibration_seeds": [500, 501, 502, 503],
              "patches": args.patches, "rows": []}
    with tempfile.TemporaryDirectory(prefix="ptqseg-presets-") as tmp:
        work = Path(tmp)
        if args.ct:
            from PTQLogic.io.volumes import read_volume

            calibration, volumes = [args.ct], [read_volume(args.ct)]
            result.update(held_out_seeds=None, calibration_seeds=None, data=str(args.ct))
        else:
            calibration = [] if args.reuse else _phantoms(work / "calibration", 4, 500)
            volumes = _held_out(args.held_out)
        folders = args.reuse or args.keep or work / "models"
        for model in args.models:
            for preset in args.presets:
                folder = folders / f"{model}-{preset}"
                started = time.perf_counter()
                if not args.reuse:
                    from PTQLogic.pipeline import quantize_model

                    quantize_model(SAMPLES / f"{model}.json", calibration, folder, num_patches=args.patches,
                                   guard=None, target_cpu=args.target_cpu, **PRESETS[preset])
                report = json.loads((folder / "quantization.json").read_text())
                row = {"model": model, "preset": preset, "quantize_seconds": time.perf_counter() - started,
                       "target_cpu": report.get("target_cpu"), "runtimes": {}}
                for runtime in args.runtimes:
                    row["runtimes"][runtime] = _evaluate(folder, volumes, runtime, args.repeats)
                    print(model, preset, runtime, json.dumps(row["runtimes"][runtime]["agreement_mean"]), flush=True)
                result["rows"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
