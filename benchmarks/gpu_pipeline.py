"""Whole-volume GPU pipeline vs a MONAI-bundle style baseline, same run, same machine.

Baseline (what a MONAI bundle does): MONAI ``Orientation``/``Spacing`` + CT intensity scaling on CPU
threads, PyTorch FP32 ``sliding_window_inference`` (overlap 0.5, batch 4) on the GPU with MONAI's
classes x volume float32 output, argmax, nearest resampling back on the CPU. GPU pipeline:
:func:`PTQLogic.resident.segment_volume_resident` (everything on the GPU, slab-deep blending).
Input: a synthetic CT of 512x512x300 voxels at 0.8x0.8x1.5 mm (LPS-like axes, as CT NIfTIs come),
network grid 1.5 mm RAS; random-weight SegResNets (105 and 14 classes, 96^3 windows). File I/O is
excluded: the volume is in memory. Prints and writes (``--out``) JSON and Markdown.

    python benchmarks/gpu_pipeline.py --out results/ [--repeats 3] [--classes 105 14]
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

from PTQLogic.volume import Volume

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
    from PTQLogic.spec import spec_from_dict

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

    from PTQLogic.preprocess import labels_to_input_grid, to_network_space

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
    from PTQLogic.resident import segment_volume_resident

    result = segment_volume_resident(volume, spec, engine, batch_size=batch, accumulate=accumulate)
    return result.labels.array, dict(result.stages)


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


def run(classes: int, volume: Volume, repeats: int) -> dict:
    from monai.networks.nets import SegResNet

    from PTQLogic.engines.torch_engine import TorchEngine

    spec, kwargs = make_spec(classes)
    torch.manual_seed(0)
    model = SegResNet(**kwargs).eval().cuda()
    fp32 = TorchEngine(model, "fp32", device="cuda")
    fp16 = TorchEngine(model, "fp16", device="cuda")
    f32, f16 = torch.float32, torch.float16
    variants = {
        "baseline (CPU prep, MONAI SW FP32)": lambda: baseline(volume, spec, model),
        "GPU pipeline FP32 engine, fp32 blending": lambda: resident(volume, spec, fp32, accumulate=f32),
        "GPU pipeline FP32 engine, fp16 blending": lambda: resident(volume, spec, fp32, accumulate=f16),
        "GPU pipeline FP16 engine, fp32 blending": lambda: resident(volume, spec, fp16, accumulate=f32),
        "GPU pipeline FP16 engine, fp16 blending (default for FP16)": lambda: resident(volume, spec, fp16),
    }
    results = {name: measure(fn, repeats) for name, fn in variants.items()}
    reference = results["baseline (CPU prep, MONAI SW FP32)"]["labels"]
    for r in results.values():
        r["agreement_with_baseline"] = float(np.mean(r["labels"] == reference))
    for r in results.values():
        del r["labels"]
    results["network only, ms per window"] = network_only(spec, {"fp32": fp32, "fp16": fp16})
    return results


def network_only(spec, engines: dict) -> dict:
    """The engine alone on random windows: ms per window by batch size (what bounds any pipeline)."""
    out = {}
    for name, engine in engines.items():
        for batch in (1, 2, 4):
            x = torch.randn((batch, 1, *spec.patch_size), device="cuda")
            for _ in range(2):
                engine.forward_native(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                engine.forward_native(x)
            torch.cuda.synchronize()
            out[f"{name} batch {batch}"] = 1000 * (time.perf_counter() - start) / (5 * batch)
    return out


def sample_agreement(npz: str) -> dict:
    """Shipped sample models on a phantom: CPU path (CPU engine) vs GPU pipeline (CUDA engine), both FP32."""
    from PTQLogic.engines.torch_engine import TorchEngine
    from PTQLogic.inference import segment_volume
    from PTQLogic.models import load_torch_model
    from PTQLogic.spec import load_spec

    data = np.load(npz)
    volume = Volume(data["image"], data["ijk_to_ras"])
    out = {}
    for name in ("phantom_unet", "phantom_segresnet"):
        spec = load_spec(f"PTQLogic/data/{name}.json")
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
    for classes in args.classes:
        report["models"][f"SegResNet {classes} classes"] = run(classes, volume, args.repeats)
        torch.cuda.empty_cache()
    if args.phantom:
        report["sample_models"] = sample_agreement(args.phantom)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_pipeline.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU pipeline vs MONAI-bundle baseline\n",
             f"{m['gpu']} ({m['gpu_memory_gib']} GiB), {m['cpu']} ({m['cpu_threads']} CPU threads for the baseline's "
             f"preprocessing), torch {m['torch']} CUDA {m['cuda']}, MONAI {m['monai']}, Python {m['python']}. "
             f"Synthetic CT {report['volume']['shape_kji'][::-1]} voxels at {report['volume']['spacing_mm']} mm -> "
             f"1.5 mm; file I/O excluded; median of {report['repeats']} runs after one warm-up (min-max shown).\n"]
    for model, variants in report["models"].items():
        variants = dict(variants)
        network = variants.pop("network only, ms per window", {})
        base = variants["baseline (CPU prep, MONAI SW FP32)"]
        lines += [f"## {model}\n", "| pipeline | end to end (s) | speedup | peak GPU (GB) | memory ratio | "
                  "agreement with baseline | stages (s, median) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in variants.items():
            stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stages_median"].items())
            lines.append(
                f"| {name} | {r['seconds_median']:.3f} ({r['seconds_min']:.3f}-{r['seconds_max']:.3f}) | "
                f"{base['seconds_median'] / r['seconds_median']:.2f}x | {r['peak_gpu_bytes'] / 1e9:.2f} | "
                f"{r['peak_gpu_bytes'] / base['peak_gpu_bytes']:.2f}x | {r['agreement_with_baseline']:.5f} | {stages} |")
        if network:
            lines.append("Engine alone, ms per 96^3 window: " + ", ".join(f"{k} {v:.1f}" for k, v in network.items()))
        lines.append("")
    for name, r in report.get("sample_models", {}).items():
        lines.append(f"Sample model {name} on a phantom: CPU path vs GPU pipeline agreement "
                     f"{r['agreement_cpu_path_vs_gpu_pipeline']:.5f} ({r['foreground_voxels']} foreground voxels).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
