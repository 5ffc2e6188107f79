"""Q/DQ placement presets and calibration methods compared on trained networks: agreement first, speed second.

Each trained sample model is quantized (no accuracy guard, so every preset shows its own agreement) on
calibration phantoms (seeds 500-503; ``quantize`` holds the last one out and calibrates on the other three) and
run on held-out phantoms (seeds 0..N-1, never used in training or calibration; 64^3 at 1.5 mm for the phantom
networks, 48x96x96 at 3 mm for ``ct_unet``, plus ``--held-out-ct`` for it) with FP32 and INT8 on each CPU runtime.
Reported per model x preset x method x patches x seed x runtime: the mean and minimum FP32-vs-INT8 agreement Dice
over the held-out volumes, and whole-volume seconds of FP32 and INT8 run interleaved (median, and the spread of
FP32/INT8); ``summary`` gives, per variant, the mean and range of that mean agreement over the calibration seeds
(the spread of calibration sampling, against which a difference between methods counts).
``--reuse DIR`` evaluates folders quantized before (on another CPU: the same files on both ISAs).

``--methods`` replaces each preset's method: ``max``, ``entropy``, ``percentile-P`` (``--method percentile
--percentile P``), any of them with ``+bias`` (that method's folder with empirical bias correction,
``PTQLogic/quantization/bias_correction.py``; ``--bias-one-pass`` for its one-pass form); ``--patches`` takes
counts and ``windows`` (every sliding window of the calibration volumes, :mod:`calibration_variants`); ``--seeds``
the calibration seeds.

    python benchmarks/fidelity/placement_presets.py --out result.json [--held-out 5] [--keep DIR]
    python benchmarks/fidelity/placement_presets.py --models phantom_unet phantom_segresnet ct_unet \
        --presets modelopt-entropy --methods max entropy percentile-99.99 --patches 32 128 windows --seeds 0 1 2 \
        --held-out-ct ../shared/data/example_ct_sm.nii.gz --out methods.json
    python benchmarks/fidelity/placement_presets.py --models phantom_unet phantom_segresnet ct_unet \
        --presets modelopt-entropy --methods entropy entropy+bias percentile-99.99 percentile-99.99+bias \
        --seeds 0 1 2 --held-out-ct ../shared/data/example_ct_sm.nii.gz --out bias.json
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
BIAS = "+bias"  # method suffix: that method's folder with empirically corrected conv biases (calibration_variants)


# phantom shape (K, J, I) and spacing per model: the field of view each network was trained for
PHANTOM_GEOMETRY = {"ct_unet": ((48, 96, 96), (3.0, 3.0, 3.0))}
DEFAULT_GEOMETRY = ((64, 64, 64), (1.5, 1.5, 1.5))


def _phantoms(folder: Path, count: int, seed: int, model: str = "") -> list[Path]:
    from PTQLogic.samples.phantom import write_phantom_set

    shape, spacing = PHANTOM_GEOMETRY.get(model, DEFAULT_GEOMETRY)
    return [image for image, _ in write_phantom_set(folder, count, seed, shape=shape, spacing=spacing)]


def _timed(volume, spec, engine) -> tuple[object, float]:
    from PTQLogic.inference.segmenter import segment_volume

    started = time.perf_counter()
    result = segment_volume(volume, spec, engine)
    return result.labels.array, time.perf_counter() - started


def _held_out(count: int, model: str = "", ct: Path | None = None) -> tuple[list, list[str]]:
    """Held-out phantoms made in memory (no image files: runs where SimpleITK is not installed), and their names;
    for ``ct_unet`` the real CT ``ct`` too."""
    from PTQLogic.samples.phantom import make_phantom

    shape, spacing = PHANTOM_GEOMETRY.get(model, DEFAULT_GEOMETRY)
    volumes = [make_phantom(seed, shape, spacing)[0] for seed in range(count)]
    names = [f"phantom {seed}" for seed in range(count)]
    if ct is not None and model == "ct_unet":
        from PTQLogic.io.volumes import read_volume

        volumes.append(read_volume(ct))
        names.append(ct.name)
    return volumes, names


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


def _window_calibration(calibration: list[Path], spec):
    """Every sliding window of the volumes ``quantize`` calibrates on (it holds the last one out from 3 on)."""
    from PTQLogic.io.volumes import read_volume
    from PTQLogic.quantization.held_out import HELD_OUT_VOLUMES, WHOLE_VOLUMES_FROM
    from calibration_variants import window_patches

    held = HELD_OUT_VOLUMES if len(calibration) >= WHOLE_VOLUMES_FROM else 0
    return window_patches([read_volume(path) for path in calibration[:len(calibration) - held]], spec)


def _quantize_variant(model: str, preset: str, method: str, patches: str, seed: int, calibration: list[Path],
                      folder: Path, args) -> dict:
    """Write ``folder`` (a model folder) for one variant; what was done beyond ``quantize_model``."""
    from PTQLogic.core.spec import load_spec
    from PTQLogic.pipeline import quantize_model
    from calibration_variants import requantize

    if method.endswith(BIAS):
        return _bias_variant(model, preset, method, patches, seed, calibration, folder, args)
    name, _, percentile = method.partition("-")  # "percentile-99.99"
    options = dict(PRESETS[preset], method=name, **({"percentile": float(percentile)} if percentile else {}))
    quantize_model(SAMPLES / f"{model}.json", calibration, folder, guard=None, target_cpu=args.target_cpu,
                   num_patches=8 if patches == "windows" else int(patches), seed=seed, **options)
    if patches != "windows":
        return {}
    windows = _window_calibration(calibration, load_spec(SAMPLES / f"{model}.json"))
    requantize(folder, windows)
    return {"calibration_patches": len(windows)}


def _bias_variant(model: str, preset: str, method: str, patches: str, seed: int, calibration: list[Path],
                  folder: Path, args) -> dict:
    """"METHOD+bias": METHOD's folder (made first unless there), copied, with empirically corrected conv biases
    computed on the very patches METHOD was calibrated on."""
    from PTQLogic.core.spec import load_spec
    from calibration_variants import bias_corrected, quantize_patches

    base_method = method[:-len(BIAS)]
    base = folder.with_name(folder.name.replace(f"-{method}-", f"-{base_method}-"))
    if base == folder:
        raise SystemExit("METHOD+bias variants need the method in the folder name: pass --methods or --seeds")
    if not (base / "quantization.json").is_file():
        _quantize_variant(model, preset, base_method, patches, seed, calibration, base, args)
    spec = load_spec(SAMPLES / f"{model}.json")
    drawn = _window_calibration(calibration, spec) if patches == "windows" else \
        quantize_patches(calibration, spec, int(patches), seed)
    return {"bias_correction": bias_corrected(base, folder, drawn, args.bias_one_pass)}


def _summary(rows: list[dict]) -> list[dict]:
    """Per variant and runtime: mean agreement over the seeds, its range, and the per-seed values."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        for runtime, result in row["runtimes"].items():
            key = (row["model"], row["preset"], row["method"], str(row["patches"]), runtime)
            groups.setdefault(key, []).append(result["agreement_mean"])
    return [{"model": m, "preset": p, "method": me, "patches": pa, "runtime": r,
             "agreement_mean_over_seeds": statistics.fmean(v), "agreement_range_over_seeds": [min(v), max(v)],
             "per_seed": v} for (m, p, me, pa, r), v in groups.items()]


def _variants(args):
    """(preset, method, patches, seed) of every folder to make, in order."""
    for preset in args.presets:
        for method in args.methods or [PRESETS[preset]["method"]]:
            for patches in args.patches:
                for seed in args.seeds:
                    yield preset, method, patches, seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["phantom_unet", "phantom_segresnet"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--methods", nargs="+", help="calibration methods replacing each preset's own: max, "
                        "entropy, percentile-P (e.g. percentile-99.99), each optionally with +bias")
    parser.add_argument("--bias-one-pass", action="store_true", help="+bias: correct every conv from one "
                        "measurement instead of layer by layer")
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    parser.add_argument("--held-out", type=int, default=5)
    parser.add_argument("--held-out-ct", type=Path, help="a real CT held out for ct_unet besides the phantoms")
    parser.add_argument("--ct", type=Path, help="the real-CT sample (ct_unet) instead: calibrate and evaluate on "
                        "this CT, its training CT (a relative comparison of presets, not held-out fidelity)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved FP32/INT8 runs per held-out volume")
    parser.add_argument("--patches", nargs="+", default=["32"], help="calibration patch counts, or 'windows'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds (the spread)")
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
              "calibration_held_out_by_quantize": 503, "patches": args.patches, "seeds": args.seeds, "rows": []}
    with tempfile.TemporaryDirectory(prefix="ptqseg-presets-") as tmp:
        work = Path(tmp)
        folders = args.reuse or args.keep or work / "models"
        for model in args.models:
            if args.ct:
                from PTQLogic.io.volumes import read_volume

                calibration, volumes, names = [args.ct], [read_volume(args.ct)], [args.ct.name]
                result.update(held_out_seeds=None, calibration_seeds=None, data=str(args.ct))
            else:
                calibration = [] if args.reuse else _phantoms(work / f"calibration-{model}", 4, 500, model)
                volumes, names = _held_out(args.held_out, model, args.held_out_ct)
            for preset, method, patches, seed in _variants(args):
                suffix = "" if args.methods is None and args.patches == ["32"] and args.seeds == [0] \
                    else f"-{method}-{patches}-s{seed}"
                folder = folders / f"{model}-{preset}{suffix}"
                started = time.perf_counter()
                extra = {} if args.reuse else _quantize_variant(model, preset, method, patches, seed, calibration,
                                                                folder, args)
                report = json.loads((folder / "quantization.json").read_text())
                row = {"model": model, "preset": preset, "method": method, "patches": patches, "seed": seed,
                       "quantize_seconds": time.perf_counter() - started, **extra,
                       "target_cpu": report.get("target_cpu"), "held_out": names, "runtimes": {}}
                for runtime in args.runtimes:
                    row["runtimes"][runtime] = _evaluate(folder, volumes, runtime, args.repeats)
                    print(model, preset, method, patches, seed, runtime,
                          json.dumps(row["runtimes"][runtime]["agreement_mean"]), flush=True)
                result["rows"].append(row)
                result["summary"] = _summary(result["rows"])
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")  # after each row

if __name__ == "__main__":
    main()
