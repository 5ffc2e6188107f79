"""Train the shipped sample models (PTQLogic/samples/data/phantom_*.{json,pt}) on synthetic phantoms.

Reproducible: fixed seeds for phantoms, patches and weight init. Prints the held-out Dice (phantom
seeds 0..N-1, never used for training; training uses seeds >= train.TRAIN_SEED_BASE).

    python benchmarks/training/train_sample_models.py [--steps 1500] [--device cuda] [--out PTQLogic/samples/data]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from PTQLogic.evaluation.metrics import dice_per_class  # noqa: E402
from PTQLogic.core.fileio import atomic_path  # noqa: E402
from PTQLogic.models.torch_models import build_network  # noqa: E402
from PTQLogic.samples.phantom import PHANTOM_CLASSES, make_phantom  # noqa: E402
from PTQLogic.core.spec import spec_from_dict  # noqa: E402
from PTQLogic.samples.train import segment_phantom, train_on_phantoms  # noqa: E402

CLASSES = [{"name": c.name, "color": list(c.color)} for c in PHANTOM_CLASSES]
PREPROCESSING = {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "intensity": "ct", "ct_window": [-200.0, 300.0]}
SPECS = {
    "phantom_unet": {
        "name": "phantom-unet", "architecture": "UNet",
        "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": len(CLASSES), "channels": [16, 32, 64, 128],
                   "strides": [2, 2, 2], "num_res_units": 1, "norm": "INSTANCE"},
    },
    "phantom_segresnet": {
        "name": "phantom-segresnet", "architecture": "SegResNet",
        "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": len(CLASSES), "init_filters": 8,
                   "blocks_down": [1, 2, 2, 2], "blocks_up": [1, 1, 1]},
    },
}
HELD_OUT_SEEDS = range(0, 10)


def full_spec(stem: str) -> dict:
    return {**SPECS[stem], "in_channels": 1, "classes": CLASSES, "patch_size": [48, 48, 48],
            "preprocessing": PREPROCESSING, "overlap": 0.25, "blend_mode": "gaussian",
            "weights": f"{stem}.pt", "weights_format": "state_dict"}


def held_out_dice(spec, state_dict, device) -> dict:
    model = build_network(spec)
    model.load_state_dict(state_dict)
    model.to(device)
    per_class = {c: [] for c in range(1, len(CLASSES))}
    means = []
    for seed in HELD_OUT_SEEDS:
        image, labels = make_phantom(seed, spacing=spec.preprocessing.spacing)
        result = dice_per_class(segment_phantom(model, image, spec, device), labels.array, list(per_class))
        means.append(result.mean)
        for c, d in result.per_class.items():
            per_class[c].append(d)
    return {"mean": sum(means) / len(means), "min_volume_mean": min(means),
            "per_class": {CLASSES[c]["name"]: round(sum(v) / len(v), 4) for c, v in per_class.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--phantoms", type=int, default=24)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "PTQLogic" / "samples" / "data")
    parser.add_argument("--models", nargs="*", default=list(SPECS))
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    summary = {}
    for stem in args.models:
        data = full_spec(stem)
        spec = spec_from_dict(data, base_dir=args.out)
        start = time.time()
        history: list[float] = []
        state = train_on_phantoms(spec, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0,
                                  num_phantoms=args.phantoms, device=args.device, loss_history=history)
        seconds = time.time() - start
        dice = held_out_dice(spec, state, args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / f"{stem}.pt") as tmp:
            torch.save(state, tmp)
        spec.save(args.out / f"{stem}.json")
        summary[stem] = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "phantoms": args.phantoms,
                         "device": str(args.device), "train_seconds": round(seconds, 1),
                         "final_loss_mean_last50": round(sum(history[-50:]) / len(history[-50:]), 4),
                         "params": sum(v.numel() for v in state.values()), "held_out_dice": dice,
                         "torch": torch.__version__}
        print(stem, json.dumps(summary[stem]), flush=True)
    with atomic_path(args.out / "training_summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
