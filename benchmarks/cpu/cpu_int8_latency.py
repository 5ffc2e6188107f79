"""Per-patch CPU latency of FP32 vs INT8 ONNX files on OpenVINO and ONNX Runtime, interleaved, with spread.

Self-contained (numpy, onnxruntime, openvino; torch + monai only for ``--export``) so it runs on a bare
benchmark machine. For every model NAME in ``--dir`` it times ``NAME_fp32.onnx`` and every
``NAME_<variant>.onnx`` beside it on each engine configuration. Rounds are interleaved per runtime: each
round runs every file in every configuration of that runtime once, so machine noise hits FP32, bf16 and
INT8 alike (runtimes are not mixed: ONNX Runtime's and OpenVINO's thread pools would compete). Prints
and writes JSON with median, p10, p90, min and max per configuration, the ratios against FP32 (per
runtime, and OpenVINO INT8 against OpenVINO bf16), OpenVINO's performance counters (which layers ran in
which precision) and the machine (CPU model and flags, cores, versions).

    python benchmarks/cpu/cpu_int8_latency.py --dir models --export --repeats 20 --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def machine() -> dict:
    model, flags = platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "openvino", "torch", "monai"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:
            versions[name] = f"missing ({type(exc).__name__})"
    return {"cpu": model, "flags": {f: f in flags for f in CPU_FLAGS}, "cores": os.cpu_count(),
            "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"),  # oneDNN (OpenVINO) kernels limited to this ISA
            "usable_cores": len(os.sched_getaffinity(0)), "platform": platform.platform(), "versions": versions}


def export(directory: Path, patch: int) -> None:
    """FP32 ONNX of the three benchmark networks (random weights: latency does not depend on their values)."""
    import torch
    from monai.networks.nets import SegResNet, UNet

    torch.manual_seed(0)
    nets = {
        "unet_bn": UNet(3, 1, 14, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch"),
        "unet_in": UNet(3, 1, 14, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="instance"),
        "segresnet": SegResNet(spatial_dims=3, in_channels=1, out_channels=14, init_filters=16),
    }
    for name, net in nets.items():
        path = directory / f"{name}_fp32.onnx"
        if not path.exists():
            torch.onnx.export(net.eval(), torch.randn(1, 1, patch, patch, patch), str(path), opset_version=17,
                              input_names=["input"], output_names=["logits"], dynamo=False)


# FP32 and INT8 files built by --variants (PTQLogic + ONNX Runtime's quantizer; no ModelOpt needed):
VARIANTS = {
    "fp32rw": ("fp32", {"fold_residual": True}),  # the FP32 graph with the exact CPU rewrites (fair baseline)
    "fp32sub": ("fp32", {"fold_residual": True, "subpixel": True, "shuffle": "depth_to_space"}),  # ORT's FP32 engine
    "cpus8": ("int8", {"activations": "s8", "fold_residual": False}),  # the CPU placement before the rewrites
    "s8res": ("int8", {"activations": "s8", "fold_residual": True}),  # --placement cpu (OpenVINO default)
    "s8nopad": ("int8", {"activations": "s8", "fold_residual": True, "pad_channels": False}),  # before the padding
    "u8sub": ("int8", {"activations": "u8", "fold_residual": True, "subpixel": True}),  # --activations u8 --subpixel
    # the ONNX Runtime preset before its float convs (first layer, logits conv) were left in float:
    "u8subq": ("int8", {"activations": "u8", "fold_residual": True, "subpixel": True, "ort_float": False}),
}
ORT_ONLY = ("fp32sub", "u8sub", "u8subq")  # the sub-pixel shuffle is for ONNX Runtime; it slows OpenVINO


def make_variants(directory: Path, names: list[str], patch: int, variants: list[str]) -> None:
    """Write NAME_<variant>.onnx for each FP32 NAME_fp32.onnx (random calibration: latency only)."""
    import sys

    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from PTQLogic.onnx_graph.edit import drop_unused_initializers
    from PTQLogic.onnx_graph.graph_prep import prepare_for_int8
    from PTQLogic.quantization.placement import quantize_cpu

    calibration = np.random.default_rng(0).uniform(0, 1, (4, 1, patch, patch, patch)).astype(np.float32)
    for name in names:
        for variant in variants:
            target, (kind, options) = directory / f"{name}_{variant}.onnx", VARIANTS[variant]
            if target.exists():
                continue
            if kind == "fp32":
                model = onnx.load(str(directory / f"{name}_fp32.onnx"))
                prepare_for_int8(model, **options)
                drop_unused_initializers(model)
                onnx.save(model, str(target))
            else:
                quantize_cpu(directory / f"{name}_fp32.onnx", calibration, target, **options)
            print(f"made {target.name}", flush=True)


def read_openvino(path: Path, channels_last: bool, batch: int = 1):
    """The model, with its logits handed out channels-last (N, D, H, W, C) when asked: what the output conv
    writes anyway, so OpenVINO drops the final reorder to N, C, D, H, W (as OpenVINOEngine does); with
    `batch` windows per call (the product's sliding window gives OpenVINO 4)."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    if batch != 1:
        shape = model.input(0).get_partial_shape()
        shape[0] = batch
        model.reshape({0: shape})
    if channels_last:
        ppp = ov.preprocess.PrePostProcessor(model)
        ppp.output().model().set_layout(ov.Layout("NCDHW"))
        ppp.output().tensor().set_layout(ov.Layout("NDHWC"))
        model = ppp.build()
    return model


class OpenVINORunner:
    def __init__(self, path: Path, precision_hint: str, threads: int | None, copy_output: bool = True,
                 channels_last: bool = False, batch: int = 1):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision_hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(read_openvino(path, channels_last, batch), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.path, self.hint, self.threads, self.copy_output = path, precision_hint, threads, copy_output
        self.channels_last, self.batch = channels_last, batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x}, share_inputs=True, share_outputs=not self.copy_output)[0]

    def profile(self, x: np.ndarray) -> dict:
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.hint, "PERF_COUNT": True}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        model = read_openvino(self.path, self.channels_last, self.batch)
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        for _ in range(3):
            request.infer({0: x})
        by_kind: dict = defaultdict(float)
        layers = []
        for item in request.profiling_info:
            ms = item.real_time.total_seconds() * 1e3
            if ms > 0:
                by_kind[f"{item.node_type}/{item.exec_type}"] += ms
                layers.append((round(ms, 3), item.node_type, item.exec_type, item.node_name[-70:]))
        plain = self.compiled.create_infer_request()  # without counters, outputs not copied out
        walls = []
        for _ in range(10):
            start = time.perf_counter()
            plain.infer({0: x}, share_inputs=True, share_outputs=True)
            walls.append((time.perf_counter() - start) * 1e3)
        return {"layers_total_ms": round(sum(by_kind.values()), 3), "wall_no_output_copy_ms": float(np.median(walls)),
                "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                "top_layers": sorted(layers, reverse=True)[:12]}


class OrtRunner:
    def __init__(self, path: Path, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle ORT workers spin for a while after each run and would steal cores from the next timed call
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: x})[0]


def openvino_bf16() -> bool:
    """Whether OpenVINO runs bf16 natively on this CPU (the product's own check, ISA caps included)."""
    import sys

    import openvino as ov

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from PTQLogic.engines.openvino_engine import native_bf16

    return native_bf16(ov.Core())


def runtime_of(key: str) -> str:
    """'openvino-bf16-cl/fp32' -> 'openvino', 'onnxruntime/u8sub' -> 'onnxruntime': the interleaving group."""
    return key.split("/")[0].split("-")[0]


def stats(times: list[float]) -> dict:
    a = np.asarray(times)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()), "max_ms": float(a.max()), "n": len(a)}


def bench_model(directory: Path, name: str, patch: int, repeats: int, warmup: int, threads: int | None,
                runtimes: list[str], profile: bool, only: list[str] | None = None, batch: int = 1,
                shape: tuple[int, int, int] | None = None) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 1, *(shape or (patch,) * 3))).astype(np.float32)
    # NAME_<variant>.xml: an OpenVINO IR (e.g. from OpenVINO's own quantizer, NNCF), timed on OpenVINO only
    files = {p.stem[len(name) + 1:]: p for p in sorted(directory.glob(f"{name}_*.xml"))}
    files.update({p.stem[len(name) + 1:]: p for p in sorted(directory.glob(f"{name}_*.onnx"))})
    variants = ["fp32"] + sorted(v for v in files if v != "fp32")
    runners, errors, not_run = {}, {}, {}
    bf16 = "openvino" in runtimes and openvino_bf16()
    if "openvino" in runtimes and not bf16:  # a bf16 hint would run f32 (or fail under an ISA cap): no such rows
        not_run = {"openvino-bf16-*": "OpenVINO does not run bf16 natively here (no AVX512-BF16/AMX, or "
                                      "ONEDNN_MAX_CPU_ISA caps it)"}
    for variant in variants:
        path = files[variant]
        configs = []
        if "openvino" in runtimes and variant not in ORT_ONLY:
            def openvino(hint: str, copy: bool = True, channels_last: bool = False, p: Path = path):
                return lambda: OpenVINORunner(p, hint, threads, copy, channels_last, batch)

            configs += [(f"openvino-f32/{variant}", openvino("f32")),
                        (f"openvino-f32-nocopy/{variant}", openvino("f32", False)),
                        (f"openvino-f32-cl/{variant}", openvino("f32", False, True))]
            configs += [(f"openvino-bf16-nocopy/{variant}", openvino("bf16", False)),
                        (f"openvino-bf16-cl/{variant}", openvino("bf16", False, True))] if bf16 else []
        if "onnxruntime" in runtimes and path.suffix == ".onnx" and batch == 1:  # the exported files: batch 1
            configs.append((f"onnxruntime/{variant}", lambda p=path: OrtRunner(p, threads)))
        configs = [(key, make) for key, make in configs if not only or key.split("/")[0] in only]
        for key, make in configs:
            try:
                runner = make()
                for _ in range(warmup):
                    runner(x)
                runners[key] = runner
            except Exception as exc:  # one failing runtime becomes an error entry; the others still report
                errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    times: dict = defaultdict(list)
    # one runtime at a time (their thread pools would compete); every file and configuration of it interleaved
    # round by round, so INT8 against bf16 FP32 is paired as well as INT8 against FP32
    groups: dict = defaultdict(dict)
    for key, runner in runners.items():
        groups[runtime_of(key)][key] = runner
    for group in groups.values():
        for _ in range(repeats):
            for key, runner in group.items():
                start = time.perf_counter()
                runner(x)
                times[key].append((time.perf_counter() - start) * 1e3)
    result = {key: {**stats(t), "times_ms": [round(v, 3) for v in t]} for key, t in times.items()}
    runtimes_seen = {key.split("/")[0] for key in result}
    ref = {rt: result.get(f"{rt}/fp32", {}).get("median_ms") for rt in runtimes_seen}
    # the fastest FP32 file (exported, or with the same exact rewrites as the INT8 file) per runtime configuration
    best = {rt: min(((row["median_ms"], key) for key, row in result.items()
                     if key.startswith(rt + "/") and key.split("/")[1].startswith("fp32")), default=None)
            for rt in runtimes_seen}
    bf16 = {"openvino-f32-cl": best.get("openvino-bf16-cl"), "openvino-bf16-cl": best.get("openvino-bf16-cl")}
    for key, row in result.items():
        runtime, variant = key.split("/")
        if variant.startswith("fp32"):
            continue
        if ref.get(runtime):
            row["speedup_vs_own_fp32"] = ref[runtime] / row["median_ms"]
            row["speedup_p90_worst"] = result[f"{runtime}/fp32"]["p10_ms"] / row["p90_ms"]
        if best.get(runtime):
            row["speedup_vs_best_fp32"] = best[runtime][0] / row["median_ms"]
            row["best_fp32"] = best[runtime][1].split("/")[1]
            worst = result[best[runtime][1]]["p10_ms"] / row["p90_ms"]
            row["speedup_vs_best_fp32_p10_p90"] = worst
            # rounds are interleaved, so round i of the FP32 and INT8 files saw the same machine state
            paired = np.asarray(times[best[runtime][1]]) / np.asarray(times[key])
            row["paired_speedup_p10"], row["paired_speedup_p90"] = (float(np.percentile(paired, q)) for q in (10, 90))
        bf16_fp32 = bf16.get(runtime, best.get("openvino-bf16-nocopy"))  # against bf16 FP32 of the same layout
        if runtime.startswith("openvino") and bf16_fp32:
            row["speedup_vs_openvino_bf16_fp32"] = bf16_fp32[0] / row["median_ms"]
            paired = np.asarray(times[bf16_fp32[1]]) / np.asarray(times[key])
            row["paired_vs_bf16_p10"], row["paired_vs_bf16_p90"] = (float(np.percentile(paired, q)) for q in (10, 90))
    out = {"rows": result, "errors": errors, **({"not_run": not_run} if not_run else {})}
    if profile:
        out["profiles"] = {key: runner.profile(x) for key, runner in runners.items()
                           if key.startswith(("openvino-f32/", "openvino-f32-cl/", "openvino-bf16-cl/"))}
    return out


CONV_KINDS = ("Convolution", "ConvolutionBackpropData", "Deconvolution")  # the last two: ConvTranspose


def time_split(profile: dict) -> tuple[float, float]:
    """(convolution ms, everything else ms) of one OpenVINO profile."""
    conv = sum(ms for kind, ms in profile["by_kind_ms"].items() if kind.split("/")[0] in CONV_KINDS)
    return conv, profile["layers_total_ms"] - conv


def split_markdown(report: dict) -> list[str]:
    """Where the time goes, channels-last: convolutions against everything else, FP32 (bf16 where OpenVINO runs
    it natively, else f32) against INT8.

    INT8 can beat that FP32 by no more than its convolutions do unless the other layers shrink by more: this is
    the ceiling of the INT8-vs-FP32 ratio for a network, measured layer by layer."""
    lines = []
    for name, result in report["models"].items():
        profiles = result.get("profiles", {})
        fp32 = {k: v for k, v in profiles.items() if k.startswith("openvino-bf16-cl/") and "/fp32" in k} or {
            k: v for k, v in profiles.items() if k.startswith("openvino-f32-cl/") and "/fp32" in k}
        int8 = {k: v for k, v in profiles.items() if k.startswith("openvino-f32-cl/") and "/fp32" not in k}
        if not fp32 or not int8:
            continue
        ref_key = min(fp32, key=lambda k: fp32[k]["layers_total_ms"])
        ref_conv, ref_other = time_split(fp32[ref_key])
        for key, prof in [(ref_key, fp32[ref_key])] + sorted(int8.items()):
            conv, other = time_split(prof)
            others = sorted(((ms, kind) for kind, ms in prof["by_kind_ms"].items()
                             if kind.split("/")[0] not in CONV_KINDS), reverse=True)[:3]
            ratio = "-" if key == ref_key else f"{ref_conv / conv:.2f}x / {ref_other / other:.2f}x"
            lines.append(f"| {name} | {key} | {prof['layers_total_ms']:.1f} | {conv:.1f} | {other:.1f} | {ratio} | "
                         + ", ".join(f"{kind} {ms:.1f}" for ms, kind in others) + " |")
    if not lines:
        return []
    return ["", "### Where the time goes (OpenVINO performance counters, logits channels-last)", "",
            "| Model | Runtime/file | layers ms | convolutions ms | everything else ms | the FP32 row (first) / this: "
            "convolutions / the rest | largest other kinds (ms) |", "|---|---|---|---|---|---|---|", *lines, "",
            "The first row of each model is its fastest FP32 file, bf16 where OpenVINO runs bf16 natively, else f32. "
            "INT8 can beat it by more than its convolutions do only if the rest shrinks by more."]


def to_markdown(report: dict) -> str:
    """The per-patch latency table (median, p10-p90, min-max, speedups) and the machine, as Markdown."""
    m = report["machine"]
    flags = ", ".join(k for k, v in m["flags"].items() if v) or "no AVX2/AVX-512/AMX"
    batch = report.get("batch", 1)
    size = "x".join(map(str, report["patch_shape"])) if report.get("patch_shape") else f"{report['patch']}^3"
    lines = [f"### Per-call latency, {size} patch, batch {batch} (windows per call), "
             f"{report['repeats']} interleaved repeats",
             "", f"- CPU: {m['cpu']}, {m['usable_cores']} usable cores; features: {flags}"
             + (f"; **OpenVINO kernels capped to {m['isa_cap']}** (ONEDNN_MAX_CPU_ISA: no VNNI/AMX/bf16 used)"
                if m.get("isa_cap") else ""),
             f"- threads: {report.get('threads') or 'runtime latency default'}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
             "| Model | Runtime (precision hint) | File | Median ms | p10-p90 | min-max | vs exported FP32 | "
             "vs best FP32 (worst case p90/p10; paired per-round p10-p90) | vs OpenVINO bf16 best FP32 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, result in report["models"].items():
        for key, row in result["rows"].items():
            runtime, variant = key.split("/")
            own = row.get("speedup_vs_own_fp32")
            bf16 = row.get("speedup_vs_openvino_bf16_fp32")
            best = row.get("speedup_vs_best_fp32")
            paired = (f"; paired {row['paired_speedup_p10']:.2f}-{row['paired_speedup_p90']:.2f}x"
                      if "paired_speedup_p10" in row else "")
            best_text = "-" if best is None else (f"{best:.2f}x ({row['speedup_vs_best_fp32_p10_p90']:.2f}x{paired}) "
                                                  f"vs {row['best_fp32']}")
            lines.append(f"| {name} | {runtime} | {variant} | {row['median_ms']:.1f} | {row['p10_ms']:.1f}-"
                         f"{row['p90_ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | "
                         f"{'-' if own is None else f'{own:.2f}x'} | {best_text} | "
                         f"{'-' if bf16 is None else f'{bf16:.2f}x'}"
                         + (f" (paired {row['paired_vs_bf16_p10']:.2f}-{row['paired_vs_bf16_p90']:.2f}x)"
                            if "paired_vs_bf16_p10" in row else "") + " |")
        for key, error in result["errors"].items():
            lines.append(f"| {name} | {key} | error: {error} | | | | | |")
    lines += ["", "File: fp32 = exported FP32 ONNX; fp32rw/fp32sub = the same FP32 graph with the exact rewrites of "
              "the INT8 files (BatchNorm/PReLU folding, identity residual folded into the output conv; fp32sub also "
              "ConvTranspose as sub-pixel Conv, its shuffle as DepthToSpace, the fastest float form); modelopt = ModelOpt default (TensorRT) Q/DQ placement; cpus8 = the "
              "CPU placement without the conv rewrites; s8res = `--placement cpu` (symmetric int8, residual folded); "
              "u8sub = `--placement cpu --activations u8 --subpixel` (for ONNX Runtime; convs with 1-3 input channels "
              "and the logits conv in float); u8subq = the same with every conv quantized; nncfov/nncfrw = OpenVINO's own "
              "quantizer (NNCF, `nncf_yardstick.py`) on fp32rw, OpenVINO IR / Q/DQ ONNX; s8gn = s8res with a Q/DQ on "
              "each GroupNorm's normalized values (NNCF's GroupNorm placement; not the product's). "
              + ("Rows are timed one runtime at a time, every file and configuration of it interleaved round by round "
                 "(paired ratios: per round). " if report.get("interleave") == "runtime" else
                 "Runtime rows are timed one runtime configuration at a time, its FP32 and INT8 calls interleaved "
                 "round by round. ") +
              "`openvino-f32` includes copying the logits out of the runtime (a fresh 14x96^3 float array per "
              "call); `-nocopy` rows read them in place; `-cl` rows read them in place channels-last (N, D, H, W, C), which "
              "spares OpenVINO the final reorder of the logits, as the product's sliding window does."]
    lines += split_markdown(report)
    return "\n".join(lines) + "\n"


def add_report_args(parser: argparse.ArgumentParser) -> None:
    """`--out FILE.json` (and FILE.md beside it) and `--render FILE.json`, shared by the CPU benchmark scripts."""
    parser.add_argument("--out", type=Path)
    parser.add_argument("--render", type=Path, help="only render an earlier --out JSON as Markdown (stdout)")


def write_report(report: dict, out: Path | None, to_markdown) -> None:
    if out:
        out.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(to_markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("."))
    parser.add_argument("--models", nargs="+", default=["unet_bn", "unet_in", "segresnet"])
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--patch-shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="time existing files at a non-cubic patch (e.g. an nnU-Net plan's 128 112 112)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: the runtime's latency default")
    parser.add_argument("--batch", type=int, default=1,
                        help="windows per call (OpenVINO only; the product's sliding window gives OpenVINO 4)")
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    parser.add_argument("--configs", nargs="+", help="only these runtime configurations (e.g. openvino-f32-cl)")
    parser.add_argument("--export", action="store_true", help="export missing FP32 models first (needs monai)")
    parser.add_argument("--profile", action="store_true", help="OpenVINO performance counters (INT8 files; bf16 FP32 files channels-last)")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS),
                        help="build these FP32/INT8 variants of each model first (needs PTQLogic on the path)")
    add_report_args(parser)
    args = parser.parse_args()
    if args.render:
        print(to_markdown(json.loads(args.render.read_text())), end="")
        return
    if args.export:
        export(args.dir, args.patch)
    if args.variants:
        make_variants(args.dir, args.models, args.patch, args.variants)
    report = {"machine": machine(), "patch": args.patch, "patch_shape": args.patch_shape, "repeats": args.repeats,
              "warmup": args.warmup, "threads": args.threads, "batch": args.batch, "interleave": "runtime",
              "models": {}}
    for name in args.models:
        report["models"][name] = bench_model(args.dir, name, args.patch, args.repeats, args.warmup, args.threads,
                                             args.runtimes, args.profile, args.configs, args.batch, args.patch_shape)
        for key, row in report["models"][name]["rows"].items():
            extra = "".join(f" {k}={v:.2f}" for k, v in row.items() if k.startswith("speedup"))
            print(f"{name:10s} {key:28s} median {row['median_ms']:8.1f} ms  p10-p90 {row['p10_ms']:.1f}-"
                  f"{row['p90_ms']:.1f}  min-max {row['min_ms']:.1f}-{row['max_ms']:.1f}{extra}", flush=True)
        for key, error in report["models"][name]["errors"].items():
            print(f"{name:10s} {key:28s} ERROR {error}", flush=True)
    write_report(report, args.out, to_markdown)


if __name__ == "__main__":
    main()
