"""A tiny nnU-Net (PlainConvUNet) trained on phantoms, saved as an nnU-Net v2 results folder, then
quantized and segmented through the nnU-Net path: Dice vs truth and FP32-vs-INT8 agreement per runtime.

    python benchmarks/fidelity/nnunet_phantom.py [--steps 250] [--out /tmp/nnunet-phantom] [--equalize] [--no-guard]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("nnUNet_def_n_proc", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nnunet_factory import architecture, checkpoint, dataset, plans, write_image  # noqa: E402
from PTQLogic.models.nnunet.network import build_network  # noqa: E402
from PTQLogic.inference.nnunet.predict import NnUNetRunner  # noqa: E402
from PTQLogic.samples.phantom import PHANTOM_CLASSES, make_phantom  # noqa: E402
from PTQLogic.pipeline import quantize_model, segment  # noqa: E402

SPACING, PATCH, SHAPE = [1.5, 1.5, 1.5], [32, 32, 32], (48, 48, 48)
LABELS = [c.name for c in PHANTOM_CLASSES]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="/tmp/nnunet-phantom")
    parser.add_argument("--equalize", action="store_true", help="quantize with --equalize (channel equalization)")
    parser.add_argument("--no-guard", action="store_true", help="quantize without the accuracy guard (raw INT8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = architecture(features=(8, 16, 32, 64), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
                        kernels=((3, 3, 3),) * 4)
    plan, data_json = plans(SPACING, PATCH, arch=arch), dataset(LABELS)
    runner = NnUNetRunner(plan, data_json, "3d_fullres")
    train = []
    for seed in range(100, 106):
        image, labels = make_phantom(seed, SHAPE, SPACING)
        data, _ = runner.preprocess(image)
        assert data.shape[1:] == labels.array.shape
        train.append((torch.from_numpy(data), torch.from_numpy(labels.array.astype(np.int64))))
    from monai.losses import DiceCELoss  # nnU-Net trains with Dice + CE as well

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    network = build_network(arch, 1, len(LABELS)).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for step in range(args.steps):
        batch_x, batch_y = [], []
        for _ in range(2):
            x, y = train[rng.integers(len(train))]
            k, j, i = (rng.integers(0, s - p + 1) for s, p in zip(y.shape, PATCH))
            batch_x.append(x[:, k:k + 32, j:j + 32, i:i + 32])
            batch_y.append(y[k:k + 32, j:j + 32, i:i + 32])
        loss = loss_fn(network(torch.stack(batch_x)), torch.stack(batch_y)[:, None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - started
    folder = out / "Dataset998_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plan, indent=2))
    (folder / "dataset.json").write_text(json.dumps(data_json, indent=2))
    torch.save(checkpoint(network.eval(), plan, data_json, 0), folder / "fold_0" / "checkpoint_final.pth")

    calibration = [write_image(make_phantom(s, SHAPE, SPACING)[0], out / f"cal_{s}.nii.gz") for s in (200, 201)]
    image, truth = make_phantom(0, (44, 52, 52), (1.4, 1.4, 1.6))  # resampled to about the training size
    image_file = write_image(image, out / "test.nii.gz")
    write_image(truth, out / "truth.nii.gz")
    guard = {"guard": None} if args.no_guard else {}
    result = quantize_model(folder, calibration, out / "int8", num_patches=16, equalize=args.equalize, **guard)
    rows = []
    for runtime, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "int8"),
                               ("onnxruntime", "int8")):
        outcome = segment(out / "int8", image_file, out / f"{runtime}-{precision}.nii.gz", runtime=runtime,
                          precision=precision, compare=precision == "int8", reference=out / "truth.nii.gz")
        rows.append({"runtime": runtime, "precision": precision, "dice": outcome.reference_dice,
                     "agreement": outcome.agreement_dice, "latency_ms": outcome.latency_ms,
                     "onnx_mb": outcome.engine_size_mb})
    summary = {"train_steps": args.steps, "train_seconds": train_seconds, "final_loss": float(loss.detach()),
               "equalize": args.equalize, "guard": not args.no_guard,
               "fp32_mb": result.fp32_bytes / 1e6, "int8_mb": result.int8_bytes / 1e6,
               "qdq_ok": result.report["qdq"]["ok"], "rows": rows}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
