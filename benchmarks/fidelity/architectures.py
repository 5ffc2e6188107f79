"""Numbers for the README support table: every architecture through the whole INT8 path.

For each small spec in ``docs/architectures/`` (or ``--archs``): train on synthetic phantoms
(``PTQLogic.samples.train``), export to ONNX, quantize with ModelOpt using the architecture's high-precision
exclusions (``PTQLogic.models.networks.HIGH_PRECISION``), check TensorRT's Q/DQ rules, then segment held-out
phantoms with ONNX Runtime FP32 (the reference) and INT8 on ONNX Runtime and OpenVINO, and report the
FP32-vs-INT8 agreement Dice, Dice vs the phantom truth and the ONNX sizes. Architectures with
exclusions are also quantized without them (``without_exclusions``), which is the evidence for them.
STU-Net S/B/L/H parameter counts are checked against the paper on the meta device (nothing allocated).

    python benchmarks/fidelity/architectures.py [--steps 300] [--archs unet swinunetr ...] [--out benchmarks/results/architectures.json]
    python benchmarks/fidelity/architectures.py --table     # the README support table from the JSON
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]  # Testing/architecture_support.py, shared with test_architectures.py

from PTQLogic.quantization.calibration import CalibrationSettings, sample_calibration_patches  # noqa: E402
from PTQLogic.engines import create_engine  # noqa: E402
from PTQLogic.evaluation.metrics import agreement_dice, dice_per_class  # noqa: E402
from PTQLogic.core.fileio import atomic_write_text  # noqa: E402
from PTQLogic.inference.segmenter import segment_volume  # noqa: E402
from PTQLogic.models.torch_models import build_network  # noqa: E402
from PTQLogic.models.networks import high_precision  # noqa: E402
from PTQLogic.quantization.quantize import quantize_settings_for  # noqa: E402
from PTQLogic.samples.phantom import make_phantom  # noqa: E402
from PTQLogic.quantization.quantize import QuantizeSettings  # noqa: E402
from PTQLogic.core.spec import load_spec  # noqa: E402
from PTQLogic.samples.train import train_on_phantoms  # noqa: E402

from architecture_support import export_and_quantize  # noqa: E402

SPECS = ROOT / "docs" / "architectures"
CALIBRATION_SEEDS = (100, 101)
HELD_OUT_SEEDS = (0, 1)
PHANTOM_SHAPE = (80, 80, 80)


def stunet_parameter_check() -> dict:
    from PTQLogic.models.networks.stunet import PUBLISHED_PARAMETERS, STUNet

    rows = {}
    for size, published in PUBLISHED_PARAMETERS.items():
        with torch.device("meta"):
            count = sum(p.numel() for p in STUNet(1, 105, size).parameters())
        rows[size] = {"parameters": count, "published": published, "ratio": round(count / published, 3)}
    return rows


def evaluate(workdir: Path, spec, volumes) -> dict:
    """Held-out phantoms: agreement with ONNX Runtime FP32 and Dice vs truth for each INT8 runtime."""
    labels = list(range(1, spec.num_classes))
    engines = {name: create_engine(runtime, precision, fp32_onnx=workdir / "fp32.onnx",
                                   int8_onnx=workdir / "int8.onnx", threads=1)
               for name, (runtime, precision) in {"fp32": ("onnxruntime", "fp32"),
                                                  "onnxruntime": ("onnxruntime", "int8"),
                                                  "openvino": ("openvino", "int8")}.items()}
    out = {name: {"agreement": [], "dice": []} for name in engines}
    for image, truth in volumes:
        maps = {name: segment_volume(image, spec, engine).labels.array for name, engine in engines.items()}
        for name, labelmap in maps.items():
            out[name]["dice"].append(dice_per_class(labelmap, truth.array, labels).mean)
            out[name]["agreement"].append(agreement_dice(labelmap, maps["fp32"], labels))
    return {name: {k: [round(float(v), 4) for v in vals] for k, vals in d.items()} for name, d in out.items()}


def run_one(stem: str, steps: int, patches: int) -> dict:
    spec = load_spec(SPECS / f"{stem}.json")
    started = time.perf_counter()
    state = train_on_phantoms(spec, steps=steps, batch_size=2, num_phantoms=8)
    train_seconds = time.perf_counter() - started
    model = build_network(spec)
    model.load_state_dict(state)
    model.eval()
    calibration_volumes = [make_phantom(s, PHANTOM_SHAPE, spec.preprocessing.spacing)[0] for s in CALIBRATION_SEEDS]
    calibration = sample_calibration_patches(calibration_volumes, spec, CalibrationSettings(num_patches=patches, seed=0))
    held_out = [make_phantom(s, PHANTOM_SHAPE, spec.preprocessing.spacing) for s in HELD_OUT_SEEDS]
    row: dict = {"spec": f"docs/architectures/{stem}.json", "architecture": spec.architecture,
                 "patch_size": list(spec.patch_size), "train_steps": steps, "train_seconds": round(train_seconds, 1),
                 "high_precision_why": high_precision(spec.architecture).why}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = export_and_quantize(model, spec, calibration, Path(tmp) / "main", quantize_settings_for(spec.architecture))
        row["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        row.update(result.to_dict())
        row["held_out"] = evaluate(Path(tmp) / "main", spec, held_out)
        if high_precision(spec.architecture).exclude_nodes or high_precision(spec.architecture).exclude_op_types:
            plain = export_and_quantize(model, spec, calibration, Path(tmp) / "plain", QuantizeSettings())
            row["without_exclusions"] = {"int8_bytes": plain.int8_bytes, "qdq_ok": plain.qdq_ok,
                                         "quantized_ops": plain.quantized_ops,
                                         "held_out": evaluate(Path(tmp) / "plain", spec, held_out)}
    return row


SHORT_WHY = {"SwinUNETR": "attention MatMuls (q·kᵀ, softmax·v)", "UNesT": "attention MatMuls (q·kᵀ, softmax·v)",
             "TransUNet3D": "attention MatMuls (q·kᵀ, softmax·v)", "VISTA3DAuto": "class head (convs, MLP, MatMul)"}


def markdown(rows: list[dict]) -> str:
    """The README support table's architecture rows."""
    mean = lambda xs: f"{np.mean(xs):.3f}"  # noqa: E731
    lines = ["| architecture | example spec | export | Q/DQ rules | agreement INT8 vs FP32: OpenVINO / ONNX Runtime "
             "(w/o exclusions) | Dice FP32 / INT8 | FP32 / INT8 ONNX | kept in FP32 | CI test |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        h, stem = r["held_out"], Path(r["spec"]).stem
        agreement = f"{mean(h['openvino']['agreement'])} / {mean(h['onnxruntime']['agreement'])}"
        if "without_exclusions" in r:
            w = r["without_exclusions"]["held_out"]
            agreement += f" ({mean(w['openvino']['agreement'])} / {mean(w['onnxruntime']['agreement'])})"
        lines.append(
            f"| {r['architecture']} | [`{stem}.json`](docs/architectures/{stem}.json) | ok ({r['export_max_abs_error']:.0e}) | "
            f"{'pass' if r['qdq_ok'] else 'FAIL'} | {agreement} | {mean(h['fp32']['dice'])} / {mean(h['openvino']['dice'])} | "
            f"{r['fp32_bytes'] / 1e6:.2f} / {r['int8_bytes'] / 1e6:.2f} MB | {SHORT_WHY.get(r['architecture'], 'nothing')} | "
            f"`test_architectures.py[{stem}]` |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--patches", type=int, default=16, help="calibration patches")
    parser.add_argument("--archs", nargs="*", default=sorted(p.stem for p in SPECS.glob("*.json")))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "architectures.json")
    parser.add_argument("--table", action="store_true", help="only print the README table from --out")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())["architectures"]))
        return
    # One thread: on a shared 2-core machine two OpenMP threads per process made training 20x slower.
    torch.set_num_threads(1)
    for stem in args.archs:
        print(f"--- {stem}", flush=True)
        row = run_one(stem, args.steps, args.patches)
        print(json.dumps(row), flush=True)
        previous = json.loads(args.out.read_text()) if args.out.is_file() else {}  # re-read: runs may overlap
        rows = {r["spec"]: r for r in previous.get("architectures", [])}
        rows[row["spec"]] = row
        result = {"machine": f"{_cpu_name()}, {torch.get_num_threads()} thread per process",
                  "torch": torch.__version__, "calibration_seeds": CALIBRATION_SEEDS, "held_out_seeds": HELD_OUT_SEEDS,
                  "phantom_shape": PHANTOM_SHAPE, "stunet_parameters": stunet_parameter_check(),
                  "architectures": sorted(rows.values(), key=lambda r: r["spec"])}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")  # after each, so partial runs keep results
        print(markdown(sorted(rows.values(), key=lambda r: r["spec"])), flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
