"""Whole-volume GPU pipeline vs a MONAI-bundle style baseline, same run, same machine.

Baseline (what a MONAI bundle does): MONAI ``Orientation``/``Spacing`` + CT intensity scaling on CPU
threads, PyTorch FP32 ``sliding_window_inference`` (overlap 0.5, batch 4) on the GPU with MONAI's
classes x volume float32 output, argmax, nearest resampling back on the CPU. GPU pipeline:
:func:`PTQLogic.inference.resident.segment_volume_resident` (everything on the GPU, slab-deep blending).
Input: a synthetic CT of 512x512x300 voxels at 0.8x0.8x1.5 mm (LPS-like axes, as CT NIfTIs come),
network grid 1.5 mm RAS; random-weight SegResNets (105 and 14 classes, 96^3 windows). File I/O is
excluded: the volume is in memory. Prints and writes (``--out``) JSON and Markdown after every row.

One row per PyTorch engine speed option (``VARIANTS``: eager, cudnn.benchmark, channels_last, batch 8,
``torch.compile`` modes), each with a fresh engine: the first volume's seconds (compiling included),
the engine alone (ms per window), then the median end to end; ``--only`` picks rows by name.

    python benchmarks/gpu/gpu_pipeline.py --out results/ [--repeats 3] [--classes 105 14] [--only compile]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from PTQLogic.core.volume import Volume

SHAPE_KJI = (300, 512, 512)
SPACING = (0.8, 0.8, 1.5)


def synthetic_ct(seed: int = 0) -> Volume:
    """Air, an elliptic trunk (fat rim, soft tissue), random organ ellipsoids, a spine, noise; int16 HU."""
    gen = torch.Generator().manual_seed(seed)
    k, j, i = (torch.linspace(-1, 1, n) for n in SHAPE_KJI)
    kk, jj, ii = k[:, None, None], j[None, :, None], i[None, None, :]
    hu = torch.full(SHAPE_KJI, -1000.0)
    hu = torch.where((ii / 0.85) ** 2 + (jj / 0.6) ** 2 < 1, torch.tensor(-100.0), hu)
    hu = torch.where((ii / 0.78) ** 2 + (jj / 0.53) ** 2 < 1, torch.tensor(40.0), hu)
    for _ in range(12):
        c = (torch.rand(3, generator=gen) - 0.5) * torch.tensor([1.2, 0.5, 0.9])
        r = 0.08 + 0.2 * torch.rand(3, generator=gen)
        inside = ((kk - c[0]) / (2 * r[0])) ** 2 + ((jj - c[1]) / r[1]) ** 2 + ((ii - c[2]) / r[2]) ** 2 < 1
        hu = torch.where(inside, 60 + 200 * torch.rand(1, generator=gen), hu)
    hu = torch.where(((ii / 0.08) ** 2 + ((jj + 0.35) / 0.08) ** 2) < 1, torch.tensor(700.0), hu)
    hu += 20 * torch.randn(SHAPE_KJI, generator=gen)
    matrix = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    matrix[:3, 3] = [SPACING[0] * (SHAPE_KJI[2] - 1) / 2, SPACING[1] * (SHAPE_KJI[1] - 1) / 2,
                     -SPACING[2] * (SHAPE_KJI[0] - 1) / 2]
    return Volume(hu.round().clamp(-1024, 3071).to(torch.int16).numpy(), matrix)


def make_spec(classes: int):
    from PTQLogic.core.spec import spec_from_dict

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": classes, "init_filters": 32,
              "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    return spec_from_dict({
        "name": f"segresnet-{classes}", "architecture": "SegResNet", "kwargs": kwargs,
        "classes": ["background"] + [f"class{c}" for c in range(1, classes)], "patch_size": [96, 96, 96],
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": "ct",
                          "ct_window": [-1024.0, 1024.0]},
        "overlap": 0.5, "blend_mode": "gaussian",
    }), kwargs


def baseline(volume: Volume, spec, model: torch.nn.Module, batch: int = 4):
    """MONAI-bundle style: CPU preprocessing, GPU FP32 sliding window into a full output, argmax, CPU resample."""
    from monai.inferers import sliding_window_inference

    from PTQLogic.inference.preprocess import labels_to_input_grid, to_network_space

    stages = {}
    t0 = time.perf_counter()
    image, grid = to_network_space(volume, spec)
    t1 = time.perf_counter()
    stages["cpu_preprocess"] = t1 - t0
    with torch.inference_mode():
        x = image[None].cuda()
        logits = sliding_window_inference(x, tuple(spec.patch_size), batch, model, overlap=spec.overlap,
                                          mode=spec.blend_mode)
        labels = logits[0].argmax(0).to(torch.uint8)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        stages["gpu_sliding_window_argmax"] = t2 - t1
        del logits
        labels_np = labels.cpu().numpy()
    t3 = time.perf_counter()
    stages["download"] = t3 - t2
    out = labels_to_input_grid(labels_np, grid)
    stages["cpu_resample_back"] = time.perf_counter() - t3
    return out, stages


def resident(volume: Volume, spec, engine, batch: int = 4, accumulate=None):
    from PTQLogic.inference.resident import segment_volume_resident

    result = segment_volume_resident(volume, spec, engine, batch_size=batch, accumulate=accumulate)
    return result.labels.array, dict(result.stages, network_in_sliding_window=result.network_seconds)


def measure(fn, repeats: int) -> dict:
    fn()  # warm-up: cuDNN algorithm choice, allocator
    times, stage_runs, peaks = [], [], []
    labels = None
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        labels, stages = fn()
        times.append(time.perf_counter() - start)
        stage_runs.append(stages)
        peaks.append(torch.cuda.max_memory_allocated())
    stages = {k: statistics.median(s[k] for s in stage_runs) for k in stage_runs[0]}
    return {"seconds_median": statistics.median(times), "seconds_min": min(times), "seconds_max": max(times),
            "stages_median": stages, "peak_gpu_bytes": max(peaks), "labels": labels}


BASELINE = "baseline (CPU prep, MONAI SW FP32)"
# (row, precision, TorchEngine speed options, window batch, blending dtype: None = the pipeline's default)
VARIANTS = [
    ("FP32 eager, fp32 blending (previous default)", "fp32", {"cudnn_benchmark": False}, 4, "float32"),
    ("FP16 eager, fp16 blending (previous default)", "fp16", {"cudnn_benchmark": False}, 4, None),
    ("FP32 cudnn.benchmark", "fp32", {}, 4, "float32"),
    ("FP32 cudnn.benchmark + channels_last", "fp32", {"channels_last": True}, 4, "float32"),
    ("FP16 cudnn.benchmark", "fp16", {}, 4, None),
    ("FP16 cudnn.benchmark + channels_last", "fp16", {"channels_last": True}, 4, None),
    ("FP16 cudnn.benchmark + channels_last, batch 8", "fp16", {"channels_last": True}, 8, None),
    ("FP16 compile default", "fp16", {"compile": "default"}, 4, None),
    ("FP16 compile reduce-overhead (CUDA graphs)", "fp16", {"compile": "reduce-overhead"}, 4, None),
    ("FP16 compile max-autotune-no-cudagraphs", "fp16", {"compile": "max-autotune-no-cudagraphs"}, 4, None),
    ("FP32 compile default", "fp32", {"compile": "default"}, 4, "float32"),
    ("FP32 compile reduce-overhead (CUDA graphs)", "fp32", {"compile": "reduce-overhead"}, 4, "float32"),
    ("FP16 compile reduce-overhead (CUDA graphs), batch 8", "fp16", {"compile": "reduce-overhead"}, 8, None),
]


def engine_alone(engine, spec, batch: int, repeats: int = 10) -> dict:
    """The engine alone on random windows: ms per window."""
    x = torch.randn((batch, 1, *spec.patch_size), device="cuda")
    for _ in range(3):
        engine.forward_native(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        engine.forward_native(x)
    torch.cuda.synchronize()
    return {"ms_per_window": 1000 * (time.perf_counter() - start) / (repeats * batch)}


def run(classes: int, volume: Volume, repeats: int, only: list[str], save) -> dict:
    from monai.networks.nets import SegResNet

    from PTQLogic.engines.torch_engine import TorchEngine

    spec, kwargs = make_spec(classes)
    torch.manual_seed(0)
    model = SegResNet(**kwargs).eval().cuda()
    results: dict = {}
    results[BASELINE] = measure(lambda: baseline(volume, spec, model), repeats)
    reference = results[BASELINE].pop("labels")
    results[BASELINE]["agreement_with_baseline"] = 1.0
    save(results)
    for name, precision, options, batch, blending in VARIANTS:
        if only and not any(word in name for word in only):
            continue
        row = f"GPU pipeline {name}"
        try:
            torch._dynamo.reset()  # each row compiles afresh (and the recompile limit is per code object)
            engine = TorchEngine(model, precision, device="cuda", **options)
            accumulate = None if blending is None else getattr(torch, blending)
            torch.cuda.synchronize()
            start = time.perf_counter()
            resident(volume, spec, engine, batch, accumulate)  # what one volume costs with a fresh engine
            first_volume = time.perf_counter() - start
            alone = engine_alone(engine, spec, batch)
            r = measure(lambda: resident(volume, spec, engine, batch, accumulate), repeats)
            r["agreement_with_baseline"] = float(np.mean(r.pop("labels") == reference))
            r.update(batch=batch, precision=precision, options=engine.options(), engine_alone=alone,
                     compile_seconds=engine.compile_seconds, first_volume_seconds=first_volume)
        except Exception as exc:  # one failing option (a compile mode) must not lose the other rows
            r = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        results[row] = r
        print(row, {k: v for k, v in r.items() if k != "stages_median"}, flush=True)
        engine = None
        torch.cuda.empty_cache()
        save(results)
    results["engine alone, other precisions"] = other_precisions(model, spec)
    save(results)
    return results


class _Cast:
    """Bench-only engines: autocast over FP32 weights, or bfloat16 weights (cudnn.benchmark + channels_last)."""

    def __init__(self, model, dtype, autocast: bool):
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
        if not autocast:
            self.model = self.model.to(dtype)
        self.dtype, self.autocast = dtype, autocast

    def forward_native(self, x):
        x = x.contiguous(memory_format=torch.channels_last_3d)
        torch.backends.cudnn.benchmark = True
        try:
            with torch.inference_mode():
                if self.autocast:
                    with torch.autocast("cuda", dtype=self.dtype):
                        return self.model(x)
                return self.model(x.to(self.dtype))
        finally:
            torch.backends.cudnn.benchmark = False


def other_precisions(model, spec) -> dict:
    out = {}
    for name, dtype, autocast in (("fp16 autocast", torch.float16, True), ("bf16 autocast", torch.bfloat16, True),
                                  ("bf16 weights", torch.bfloat16, False)):
        try:
            out[f"{name}, batch 4"] = engine_alone(_Cast(model, dtype, autocast), spec, 4)
        except Exception as exc:
            out[f"{name}, batch 4"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        torch.cuda.empty_cache()
    return out


def sample_agreement(npz: str) -> dict:
    """Shipped sample models on a phantom: CPU path (CPU engine) vs GPU pipeline (CUDA engine), both FP32."""
    from PTQLogic.engines.torch_engine import TorchEngine
    from PTQLogic.inference.segmenter import segment_volume
    from PTQLogic.models.torch_models import load_torch_model
    from PTQLogic.core.spec import load_spec

    data = np.load(npz)
    volume = Volume(data["image"], data["ijk_to_ras"])
    out = {}
    for name in ("phantom_unet", "phantom_segresnet"):
        spec = load_spec(f"PTQLogic/samples/data/{name}.json")
        model = load_torch_model(spec)
        cpu = segment_volume(volume, spec, TorchEngine(model, "fp32", device="cpu"), batch_size=4).labels.array
        gpu = segment_volume(volume, spec, TorchEngine(model, "fp32", device="cuda"), batch_size=4).labels.array
        out[name] = {"agreement_cpu_path_vs_gpu_pipeline": float(np.mean(cpu == gpu)),
                     "foreground_voxels": int(np.count_nonzero(cpu))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, nargs="+", default=[105, 14])
    parser.add_argument("--only", nargs="*", default=[], help="run only the option rows whose names hold one of these")
    parser.add_argument("--cpu-threads", type=int, default=16)
    parser.add_argument("--phantom", help="npz (image, ijk_to_ras) for the sample models' CPU-vs-GPU agreement")
    args = parser.parse_args()
    torch.set_num_threads(args.cpu_threads)
    volume = synthetic_ct()
    props = torch.cuda.get_device_properties(0)
    report = {"machine": {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                          "cpu": platform.processor() or platform.machine(), "cpu_threads": args.cpu_threads,
                          "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
              "volume": {"shape_kji": SHAPE_KJI, "spacing_mm": SPACING}, "repeats": args.repeats, "models": {}}
    import monai

    report["machine"]["monai"] = monai.__version__
    try:
        report["machine"]["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a run cut short keeps what it measured
        (out / "gpu_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "gpu_pipeline.md").write_text(markdown(report))

    if args.phantom:
        report["sample_models"] = sample_agreement(args.phantom)
        save()
    for classes in args.classes:
        key = f"SegResNet {classes} classes"

        def save_model(results: dict, key=key) -> None:
            report["models"][key] = results
            save()

        run(classes, volume, args.repeats, args.only, save_model)
        torch.cuda.empty_cache()
    save()
    print(markdown(report))


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# GPU pipeline vs MONAI-bundle baseline\n",
             f"{m['gpu']} ({m['gpu_memory_gib']} GiB), {m['cpu']} ({m['cpu_threads']} CPU threads for the baseline's "
             f"preprocessing), torch {m['torch']} CUDA {m['cuda']}, MONAI {m['monai']}, Python {m['python']}. "
             f"Synthetic CT {report['volume']['shape_kji'][::-1]} voxels at {report['volume']['spacing_mm']} mm -> "
             f"1.5 mm; file I/O excluded; median of {report['repeats']} runs after one warm-up (min-max shown).\n"]
    for model, variants in report["models"].items():
        variants = dict(variants)
        others = variants.pop("engine alone, other precisions", {})
        base = variants[BASELINE]
        lines += [f"## {model}\n", "| pipeline | end to end (s) | speedup | peak GPU (GB) | memory ratio | "
                  "agreement with baseline | engine alone (ms/window) | first volume, fresh engine (s) | stages (s, median) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in variants.items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:300].replace('|', '/')} | | | | | | | |")
                continue
            stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stages_median"].items())
            alone = r.get("engine_alone", {})
            lines.append(
                f"| {name} | {r['seconds_median']:.3f} ({r['seconds_min']:.3f}-{r['seconds_max']:.3f}) | "
                f"{base['seconds_median'] / r['seconds_median']:.2f}x | {r['peak_gpu_bytes'] / 1e9:.2f} | "
                f"{r['peak_gpu_bytes'] / base['peak_gpu_bytes']:.2f}x | {r['agreement_with_baseline']:.5f} | "
                f"{alone.get('ms_per_window', float('nan')):.2f} | {r.get('first_volume_seconds', float('nan')):.1f} | "
                f"{stages} |")
        if others:
            lines.append("\nEngine alone, batch 4, cudnn.benchmark + channels_last, ms per 96^3 window: " + ", ".join(
                f"{k} {v['ms_per_window']:.2f}" if "ms_per_window" in v else f"{k} failed ({v['error'][:200]})"
                for k, v in others.items()))
        lines.append("")
    for name, r in report.get("sample_models", {}).items():
        lines.append(f"Sample model {name} on a phantom: CPU path vs GPU pipeline agreement "
                     f"{r['agreement_cpu_path_vs_gpu_pipeline']:.5f} ({r['foreground_voxels']} foreground voxels).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
