"""TensorRT on a real GPU: plan size, build time (cold and with a warm timing cache), latency, per-layer precision,
whole-volume time and agreement with the FP32 plan, for FP32 / FP16 / INT8 plans of the same network.

Networks: ``unet14`` (MONAI UNet 16-256, 2 residual units, BatchNorm, 14 classes, 96^3 windows, random weights,
seed 0: speed and size only), ``segresnet`` (MONAI SegResNet, 16 filters, GroupNorm, 14 classes, 96^3, random
weights: its norms reach TensorRT as InstanceNormalization) and, with ``--ct``, the shipped real-CT sample
``ct_unet`` (agreement on a real CT).
INT8 variants are model folders quantized by ``quantize_model`` with ModelOpt's placement (``modelopt``), the
INT8-chain placement (``cpu``, 8-bit weights: ``--target-cpu vnni``; skipped by default, it failed on 8.6.0) and
ModelOpt's with the convolutions narrower than 32 channels kept FP16 (``wide``). Stages, each resumable in one
work folder:

    python benchmarks/gpu/tensorrt_bench.py --work W --stage prepare [--ct ct.nii.gz]
    python benchmarks/gpu/tensorrt_bench.py --work W --stage build --levels 2 [--only unet14]
    python benchmarks/gpu/tensorrt_bench.py --work W --stage measure --out results/ [--ct ct.nii.gz]

Latency: CUDA events around ``--iters`` calls of one engine, engines interleaved for ``--rounds`` rounds; median
and range of the per-round means. Build logs are captured: ``tensorrt_errors`` counts TensorRT ``[E]`` lines.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

UNET14 = {"spatial_dims": 3, "in_channels": 1, "out_channels": 14, "channels": [16, 32, 64, 128, 256],
          "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "BATCH"}
# MONAI's SegResNet defaults (GroupNorm, 8 groups): its norms reach TensorRT 8.6.0 as InstanceNormalization
SEGRESNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 14, "init_filters": 16}
RANDOM_NETWORKS = {"unet14": ("unet14-bn", "UNet", UNET14), "segresnet": ("segresnet", "SegResNet", SEGRESNET)}
NETWORKS = (*RANDOM_NETWORKS, "ct_unet")
# "wide": ModelOpt's placement with convolutions narrower than 32 channels left in FP16. INT8 tensor-core kernels
# read 32-channel vectors: a 16-channel INT8 tensor is padded to 32 bytes per voxel, as many as FP16's 16 x 2.
PLACEMENTS = ("modelopt", "cpu", "wide")
NARROW = 32
SAMPLE_CT = Path(__file__).resolve().parents[2] / "PTQLogic" / "samples" / "data" / "ct_unet.json"


def log(*parts) -> None:
    print(*parts, flush=True)


@contextlib.contextmanager
def captured_output(sink: list[str]):
    """TensorRT's default logger writes to the process's stdout: keep its lines (stdout and stderr) and pass them on."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sys.stdout.write(text)
            sink.extend(text.splitlines())


def network_spec(work: Path, net: str = "unet14") -> Path:
    """The random-weight network ``net`` (a key of RANDOM_NETWORKS) as a spec file in ``work``."""
    from monai.networks import nets

    path = work / f"{net}.json"
    if path.is_file():
        return path
    torch.manual_seed(0)
    name, architecture, kwargs = RANDOM_NETWORKS[net]
    torch.save(getattr(nets, architecture)(**kwargs).state_dict(), work / f"{net}.pt")
    classes = ["background"] + [f"class{i}" for i in range(1, 14)]
    path.write_text(json.dumps({
        "name": name, "architecture": architecture, "kwargs": kwargs,
        "classes": classes, "patch_size": [96, 96, 96], "weights": f"{net}.pt", "weights_format": "state_dict",
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": "ct",
                          "ct_window": [-1024.0, 1024.0]}, "overlap": 0.5, "blend_mode": "gaussian"}))
    return path


def prepare(work: Path, ct: Path | None) -> None:
    from PTQLogic.pipeline import quantize_model
    from PTQLogic.samples.phantom import write_phantom_set

    spec = network_spec(work)
    calibration = [img for img, _ in write_phantom_set(work / "phantoms", 2, 100, shape=(96, 96, 96))]
    for placement in PLACEMENTS:
        out = work / f"unet14-{placement}"
        if not (out / "int8.onnx").is_file():
            started = time.perf_counter()
            exclude = narrow_convolutions(work / "unet14-modelopt" / "fp32.onnx") if placement == "wide" else ()
            quantize_model(spec, calibration, out, num_patches=8, guard=None, target_cpu="vnni", exclude_nodes=exclude,
                           placement="modelopt" if placement == "wide" else placement)
            log(f"quantized {out.name} in {time.perf_counter() - started:.0f} s ({len(exclude)} convolutions kept FP16)")
    if not (work / "segresnet-modelopt" / "int8.onnx").is_file():
        quantize_model(network_spec(work, "segresnet"), calibration, work / "segresnet-modelopt", num_patches=8,
                       guard=None, target_cpu="vnni", placement="modelopt")
    if ct is not None and not (work / "ct_unet" / "int8.onnx").is_file():
        # the sample was trained on this CT: agreement here compares runtimes on one graph, not fidelity
        quantize_model(SAMPLE_CT, [ct], work / "ct_unet", num_patches=16, guard=None, placement="modelopt",
                       target_cpu="vnni")


def narrow_convolutions(fp32_onnx: Path) -> list[str]:
    """Names of the Conv/ConvTranspose nodes with fewer than NARROW input or output channels."""
    import onnx

    graph = onnx.load(str(fp32_onnx)).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type in ("Conv", "ConvTranspose")
            and node.input[1] in shapes and min(shapes[node.input[1]][:2]) < NARROW]


def variants(work: Path, only: list[str] | None) -> list[tuple[str, Path, str]]:
    """(name, onnx, precision) for every plan to build."""
    rows = []
    for net, folders in (("unet14", [f"unet14-{p}" for p in PLACEMENTS]), ("segresnet", ["segresnet-modelopt"]),
                         ("ct_unet", ["ct_unet"])):
        if only and net not in only or not (work / folders[0] / "fp32.onnx").is_file():
            continue
        rows += [(f"{net} fp32", work / folders[0] / "fp32.onnx", "fp32"),
                 (f"{net} fp16", work / folders[0] / "fp32.onnx", "fp16")]
        rows += [(f"{net} int8 {f.split('-')[-1] if '-' in f else 'modelopt'}", work / f / "int8.onnx", "int8")
                 for f in folders]
    return rows


def norm_variants(rows: list[tuple[str, Path, str]], norms: list[str]) -> list[tuple[str, Path, str, str]]:
    """(label, onnx, precision, norms option) per variant and option; FP32 plans have no norm option to vary."""
    return [(f"{label} normfp32" if mode == "fp32" else label, onnx_path, precision, mode)
            for label, onnx_path, precision in rows for mode in norms if mode == "scaled" or precision != "fp32"]


def build(work: Path, levels: list[int], only: list[str] | None, warm: list[str], skip: list[str],
          norms: list[str] = ("scaled",)) -> None:
    """One plan per variant, level and ``norms`` build option (FP16/INT8 only; "fp32" variants are labelled
    "normfp32"), as the product builds it (timing cache "auto": one per network and precision, here under
    ``work/user-cache``); a variant TensorRT cannot build is recorded, not fatal."""
    from PTQLogic.core.errors import ModelError
    from PTQLogic.core.progress import Monitor
    from PTQLogic.engines.tensorrt_engine import TensorRTBuildOptions, build_tensorrt_plan, cached_plan, use_build_options

    os.environ["PTQSEG_CACHE_DIR"] = str(work / "user-cache")
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    device_name = f"{props.name} sm_{props.major}{props.minor}"
    records = json.loads((work / "builds.json").read_text()) if (work / "builds.json").is_file() else {}
    for level in levels:
        for label, onnx_path, precision, mode in norm_variants(variants(work, only), norms):
            key = f"{label} level{level}"
            if key in records or label in skip:
                continue
            lines: list[str] = []
            started = time.perf_counter()
            try:
                with use_build_options(TensorRTBuildOptions(optimization_level=level, norms=mode)), \
                        captured_output(lines):
                    plan, info = cached_plan(onnx_path, precision, work / "plans", device_name, 4, Monitor())
            except ModelError as exc:
                records[key] = {"network": label.split()[0], "variant": label, "precision": precision, "level": level,
                                "error": str(exc), "seconds": time.perf_counter() - started,
                                "tensorrt_errors": [line for line in lines if "[E]" in line][:5], "gpu": name}
                log(json.dumps(records[key]))
                (work / "builds.json").write_text(json.dumps(records, indent=1))
                continue
            cold, again = info["build_seconds"], None
            if label in warm:
                with use_build_options(TensorRTBuildOptions(optimization_level=level, norms=mode)), \
                        captured_output(lines):  # the same network again: its timing cache is warm now
                    started = time.perf_counter()
                    build_tensorrt_plan(onnx_path, precision, work / "rebuild.plan", opt_batch=4, max_batch=4,
                                        timing_cache_path=info["timing_cache"], optimization_level=level)
                    again = time.perf_counter() - started
            records[key] = {"network": label.split()[0], "variant": label, "precision": precision, "level": level,
                            "plan": str(plan), "plan_bytes": plan.stat().st_size, "build_cold_s": cold,
                            "build_warm_s": again, "tensorrt_errors": [line for line in lines if "[E]" in line][:5],
                            "timing_cache": info["timing_cache"], "gpu": name}
            log(json.dumps({k: v for k, v in records[key].items() if k != "plan"}))
            (work / "builds.json").write_text(json.dumps(records, indent=1))


def latency(engines: dict[str, object], shape: tuple[int, ...], batch: int, rounds: int, iters: int) -> dict:
    x = torch.randn((batch, *shape), device="cuda")
    per: dict[str, list[float]] = {k: [] for k in engines}
    for engine in engines.values():
        for _ in range(3):
            engine(x)
    for _ in range(rounds):
        for key, engine in engines.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                engine(x)
            end.record()
            torch.cuda.synchronize()
            per[key].append(start.elapsed_time(end) / iters)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "per_window_ms":
                statistics.median(v) / batch} for k, v in per.items()}


def layer_times(plan: str, precision: str, batch: int, iters: int = 10) -> dict[str, float]:
    """Mean ms per layer from TensorRT's IProfiler, on an engine of its own (profiling slows every call)."""
    from PTQLogic.engines.tensorrt_runner import TensorRTEngine

    engine = TensorRTEngine(plan, precision)
    trt = engine._trt

    class Profiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name, ms):
            self.times.setdefault(layer_name, []).append(ms)

    profiler = Profiler()
    engine.context.profiler = profiler
    x = torch.randn((batch, *engine_input_shape(engine)), device="cuda")
    for _ in range(iters):
        engine(x)
    torch.cuda.synchronize()
    return {k: statistics.fmean(v) for k, v in profiler.times.items()}


def save_inspector_json(engine, path: Path) -> None:
    """The engine inspector's own JSON for the plan, as TensorRT wrote it (the raw evidence behind ``layers``)."""
    trt = engine._trt
    inspector = engine.engine.create_engine_inspector()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def engine_input_shape(engine) -> tuple[int, ...]:
    return tuple(engine.engine.get_tensor_profile_shape(engine.input_name, 0)[1])[1:]


def measure(work: Path, out: Path, ct: Path | None, rounds: int, iters: int) -> None:
    from PTQLogic.engines.tensorrt_runner import TensorRTEngine
    from PTQLogic.inference.segmenter import segment_volume
    from PTQLogic.core.spec import load_spec

    records = json.loads((work / "builds.json").read_text())
    result = {"machine": {"gpu": torch.cuda.get_device_name(), "cpu": platform.processor() or platform.machine(),
                         "torch": torch.__version__}, "rounds": rounds, "iters": iters, "builds": records,
              "latency": {}, "layers": {}, "whole_volume": {}}
    import tensorrt

    result["machine"]["tensorrt"] = tensorrt.__version__
    for net in NETWORKS:
        rows = {k: r for k, r in records.items() if r["network"] == net and "plan" in r}
        if not rows:
            continue
        engines = {k: TensorRTEngine(r["plan"], r["precision"]) for k, r in rows.items()}
        shape = engine_input_shape(next(iter(engines.values())))
        for batch in (1, 4):
            result["latency"][f"{net} batch{batch}"] = latency(engines, shape, batch, rounds, iters)
            log(json.dumps(result["latency"][f"{net} batch{batch}"], indent=0))
        for key, engine in engines.items():
            try:  # the layer evidence must not cost the rest of the run
                summary = engine.layer_summary(detail=True)
                times = layer_times(rows[key]["plan"], rows[key]["precision"], 4) if net != "ct_unet" else {}
                save_inspector_json(engine, work / "inspector" / f"{key.replace(' ', '_')}.json")
            except Exception as exc:  # noqa: BLE001
                summary, times = {"error": f"{type(exc).__name__}: {exc}"}, {}
            for row in (summary or {}).get("detail", []):
                row["ms_batch4"] = times.get(row["name"])
            result["layers"][key] = summary
            result.setdefault("layer_ms_batch4", {})[key] = times
            if summary:
                log(key, {k: v for k, v in summary.items() if k != "detail"}, f"profiled {sum(times.values()):.3f} ms")
        out.mkdir(parents=True, exist_ok=True)
        (out / "tensorrt_bench.json").write_text(json.dumps(result, indent=1))  # kept if the whole volume fails
        result["whole_volume"][net] = whole_volume(net, work, engines, rows, ct, segment_volume, load_spec)
        (out / "tensorrt_bench.json").write_text(json.dumps(result, indent=1))
    log("wrote", out / "tensorrt_bench.json")


def whole_volume(net, work, engines, rows, ct, segment_volume, load_spec) -> dict:
    import numpy as np

    if net != "ct_unet":
        sys.path.insert(0, str(Path(__file__).parent))
        from gpu_pipeline import synthetic_ct

        volume, spec = synthetic_ct(0), load_spec(work / f"{net}.json")
    elif ct is not None:
        from PTQLogic.models.model_folder import open_model_dir

        volume, spec = read_ct(ct), open_model_dir(work / "ct_unet").spec()
    else:
        return {}
    out, reference = {}, None
    for key, engine in engines.items():
        times, labels = [], None
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            labels = segment_volume(volume, spec, engine, batch_size=4).labels.array
            times.append(time.perf_counter() - started)
        if rows[key]["precision"] == "fp32" and reference is None:
            reference = np.asarray(labels)
        out[key] = {"seconds": times, "median_s": statistics.median(times),
                    "agreement_with_fp32_plan": None if reference is None else
                    float((np.asarray(labels) == reference).mean())}
        log(key, json.dumps(out[key]))
    return out


def read_ct(path: Path):
    """The CT through PTQLogic's reader (SimpleITK); a NIfTI through nibabel where SimpleITK is not installed."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        import nibabel as nib
        import numpy as np

        from PTQLogic.core.volume import Volume

        image = nib.load(str(path))
        return Volume(np.asarray(image.dataobj).transpose(2, 1, 0).copy(), image.affine.astype(float))
    from PTQLogic.io.volumes import read_volume

    return read_volume(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stage", choices=("prepare", "build", "measure"), required=True)
    parser.add_argument("--ct", type=Path, default=None)
    parser.add_argument("--levels", type=int, nargs="+", default=[2])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--warm", nargs="*", default=["unet14 fp16"], help="variants rebuilt with the warm timing cache")
    parser.add_argument("--norms", nargs="+", choices=("scaled", "fp32"), default=["scaled"],
                        help="FP16/INT8 plans of decomposed InstanceNorms: the FP16-safe scale and/or FP32 layers")
    parser.add_argument("--skip", nargs="*", default=["unet14 int8 cpu"],
                        help="variants not built (the cpu placement failed on TensorRT 8.6.0 after 94 s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "prepare":
        prepare(args.work, args.ct)
    elif args.stage == "build":
        build(args.work, args.levels, args.only, args.warm, args.skip, args.norms)
    else:
        measure(args.work, args.out or args.work, args.ct, args.rounds, args.iters)


if __name__ == "__main__":
    main()
