"""One command for the committed tables under benchmarks/results/<machine>/.

    python benchmarks/reproduce.py --out benchmarks/results/<machine> [--repeats 20] [--skip-latency]

1. the real-CT sample model (PTQLogic/samples/data/ct_unet.*; trained by train_ct_model.py when missing);
2. quantized on the CT three ways (ModelOpt's TensorRT placement; the CPU placement for OpenVINO; its
   ONNX Runtime preset, u8 activations + sub-pixel ConvTranspose);
3. ``ptqseg benchmark`` of both folders on the CT with its mapped reference labels: size, latency with
   spread, whole-volume stages, Dice vs reference and FP32-vs-INT8 agreement per runtime;
4. per-patch latency of the 96^3 UNet (batch and instance norm) and SegResNet, FP32 vs INT8 on OpenVINO
   and ONNX Runtime (cpu_int8_latency.py), models exported and quantized here;
5. whole-volume CPU time of both UNets on a 512x512x300 CT, the product's sliding window against MONAI's
   (cpu_whole_volume.py).
On a machine without ModelOpt, quantize elsewhere and run step 4 alone with cpu_int8_latency.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "cpu"))  # cpu_int8_latency
sys.path.insert(0, str(ROOT / "benchmarks" / "training"))  # train_ct_model


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def ct_model(data: Path) -> Path:
    spec = ROOT / "PTQLogic" / "samples" / "data" / "ct_unet.json"
    if not (ROOT / "PTQLogic" / "samples" / "data" / "ct_unet.pt").is_file():
        run("benchmarks/training/train_ct_model.py", "--data", str(data))
    return spec


def quantize_latency_models(folder: Path, patch: int) -> None:
    """FP32 exports, ModelOpt INT8 and the CPU-placement variants of the three 96^3 networks (random weights)."""
    from cpu_int8_latency import VARIANTS, export, make_variants

    from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx

    folder.mkdir(parents=True, exist_ok=True)
    export(folder, patch)
    calibration = np.random.default_rng(0).uniform(0, 1, (4, 1, patch, patch, patch)).astype(np.float32)
    for name in ("unet_bn", "unet_in", "segresnet"):
        target = folder / f"{name}_modelopt.onnx"
        if not target.exists():
            quantize_onnx(folder / f"{name}_fp32.onnx", calibration, target, QuantizeSettings())
            target.with_name(f"{name}_modelopt.modelopt.log").unlink(missing_ok=True)
    make_variants(folder, ["unet_bn", "unet_in", "segresnet"], patch, sorted(VARIANTS))


def main() -> None:
    from train_ct_model import load_ct_pair

    from PTQLogic.io.volumes import write_labelmap

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "reproduce")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-latency", action="store_true", help="skip the 96^3 per-patch latency step")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    spec = ct_model(args.data)
    ct = args.data / "example_ct_sm.nii.gz"
    _, labels = load_ct_pair(args.data)
    reference = args.work / "ct_reference_btcv.nii.gz"
    write_labelmap(labels, reference)
    placements = {"modelopt": ["--placement", "modelopt"], "cpu": ["--placement", "cpu"],
                  "cpu_ort": ["--placement", "cpu", "--activations", "u8", "--subpixel"]}
    for name, options in placements.items():
        model = args.work / f"ct_unet_{name}"
        if not (model / "int8.onnx").is_file():
            run("-m", "PTQLogic.app.cli", "quantize", "--model", str(spec), "--calibration", str(ct), "--out", str(model),
                "--patches", "16", *options, "--json")
        run("-m", "PTQLogic.app.cli", "benchmark", "--model", str(model), "--input", str(ct), "--reference",
            str(reference), "--out", str(args.out / f"ct_{name}"), "--runtimes", "openvino", "onnxruntime",
            "--repeats", str(args.repeats), "--json")
        (args.out / f"ct_{name}" / "latency_vs_size.png").unlink(missing_ok=True)
    if not args.skip_latency:
        models = args.work / "latency_models"
        quantize_latency_models(models, 96)
        run("benchmarks/cpu/cpu_int8_latency.py", "--dir", str(models), "--repeats", str(args.repeats), "--profile",
            "--out", str(args.out / "latency_96.json"))
        # the sliding window's 4 windows per OpenVINO call; INT8 against f32 and bf16 FP32, all interleaved
        run("benchmarks/cpu/cpu_int8_latency.py", "--dir", str(models), "--repeats", str(args.repeats), "--batch", "4",
            "--runtimes", "openvino", "--configs", "openvino-f32-cl", "openvino-bf16-cl",
            "--out", str(args.out / "latency_96_batch4.json"))
        for name in ("unet_bn", "unet_in"):  # whole volume: the product's sliding window vs MONAI's
            run("benchmarks/cpu/cpu_whole_volume.py", "--dir", str(models), "--name", name, "--repeats", "3",
                "--out", str(args.out / f"whole_volume_{name}.json"))
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
