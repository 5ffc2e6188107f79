"""Train the real-CT sample model (PTQLogic/data/ct_unet.{json,pt}) on the labeled CT in ../shared/data.

The CT (TotalSegmentator test fixture, 122 x 101 x 30 voxels at 3 mm) comes with a TotalSegmentator
"total" mask; its 12 BTCV organs present in the crop are mapped to a 13-class BTCV-style set
(background + 12 organs; BTCV's esophagus is absent from this crop). A MONAI UNet (16-32-64-128,
batch norm, 1 residual unit) is trained on that one volume with the project's training loop
(:func:`PTQLogic.train.train_on_phantoms`: random patches, DiceCE, Adam). It is a *fidelity* model: it
is evaluated on the same CT, so its Dice says how well INT8 keeps what FP32 learned, not how well it
generalizes. Same seed and data -> the same weights on the CPU.

    python benchmarks/train_ct_model.py [--steps 800] [--device cuda] [--out PTQLogic/data] [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PTQLogic.errors import InputError  # noqa: E402
from PTQLogic.fileio import atomic_path, atomic_write_text  # noqa: E402
from PTQLogic.volume import Volume  # noqa: E402

CT_FILE, SEG_FILE = "example_ct_sm.nii.gz", "example_seg.nii.gz"
# (class name, TotalSegmentator "total" label), in BTCV order without the absent esophagus
BTCV_FROM_TOTALSEG = (
    ("spleen", 1), ("kidney_right", 2), ("kidney_left", 3), ("gallbladder", 4), ("liver", 5), ("stomach", 6),
    ("pancreas", 7), ("adrenal_gland_right", 8), ("adrenal_gland_left", 9), ("aorta", 52),
    ("inferior_vena_cava", 63), ("portal_vein_and_splenic_vein", 64),
)
COLORS = ((157, 108, 162), (185, 102, 83), (212, 126, 151), (139, 150, 98), (221, 130, 101), (216, 132, 105),
          (249, 180, 111), (244, 186, 150), (244, 186, 151), (224, 97, 76), (0, 151, 206), (0, 112, 165))
STEM = "ct_unet"
SPEC = {
    "name": "ct-btcv-unet", "architecture": "UNet",
    "classes": [{"name": "background", "color": [0, 0, 0]}]
    + [{"name": name, "color": list(color)} for (name, _), color in zip(BTCV_FROM_TOTALSEG, COLORS)],
    "in_channels": 1, "patch_size": [64, 64, 32],
    "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 1 + len(BTCV_FROM_TOTALSEG),
               "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "BATCH"},
    "preprocessing": {"orientation": "RAS", "spacing": [3.0, 3.0, 3.0], "intensity": "ct",
                      "ct_window": [-200.0, 300.0]},
    "overlap": 0.25, "blend_mode": "gaussian", "weights": f"{STEM}.pt", "weights_format": "state_dict",
}
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def map_labels(totalseg: np.ndarray) -> np.ndarray:
    """TotalSegmentator "total" labels -> BTCV-style 0..12 (everything else background)."""
    lut = np.zeros(int(totalseg.max()) + 1 if totalseg.size else 1, dtype=np.uint8)
    for index, (_, source) in enumerate(BTCV_FROM_TOTALSEG, start=1):
        if source < len(lut):
            lut[source] = index
    return lut[totalseg.astype(np.int64)]


def load_ct_pair(data_dir: str | Path) -> tuple[Volume, Volume]:
    """(CT image, mapped 13-class labels) on the same grid; InputError when the files are missing.

    ``data_dir`` may also be an ``.npz`` written by ``--save-pair`` (for machines without SimpleITK).
    """
    data_dir = Path(data_dir)
    if data_dir.suffix == ".npz" and data_dir.is_file():
        with np.load(data_dir) as pair:
            return (Volume(array=pair["image"], ijk_to_ras=pair["ijk_to_ras"]),
                    Volume(array=pair["labels"], ijk_to_ras=pair["ijk_to_ras"]))
    from PTQLogic.imageio import read_volume

    missing = [name for name in (CT_FILE, SEG_FILE) if not (data_dir / name).is_file()]
    if missing:
        raise InputError(f"Labeled CT not found: {', '.join(str(data_dir / m) for m in missing)}; "
                         "pass --data with the folder holding the TotalSegmentator example files.")
    image = read_volume(data_dir / CT_FILE)
    seg = read_volume(data_dir / SEG_FILE)
    image.require_same_grid(seg, f"Labels '{data_dir / SEG_FILE}'")
    labels = Volume(array=map_labels(np.rint(seg.array)), ijk_to_ras=seg.ijk_to_ras.copy())
    return image, labels


def main() -> None:
    from PTQLogic.evaluate import dice_per_class
    from PTQLogic.models import build_network
    from PTQLogic.spec import spec_from_dict
    from PTQLogic.train import segment_phantom, train_on_phantoms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "PTQLogic" / "data")
    parser.add_argument("--save-pair", type=Path, help="only write the mapped (image, labels) pair as .npz")
    args = parser.parse_args()
    if args.save_pair:
        image, labels = load_ct_pair(args.data)
        np.savez_compressed(args.save_pair, image=image.array, labels=labels.array, ijk_to_ras=image.ijk_to_ras)
        return
    if args.device == "cpu":
        torch.set_num_threads(2)
    image, labels = load_ct_pair(args.data)
    spec = spec_from_dict(SPEC, base_dir=args.out)
    start = time.time()
    history: list[float] = []
    state = train_on_phantoms(spec, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0,
                              phantoms=[(image, labels)], device=args.device, loss_history=history)
    seconds = time.time() - start
    model = build_network(spec)
    model.load_state_dict(state)
    predicted = segment_phantom(model, image, spec, "cpu")
    dice = dice_per_class(predicted, labels.array, list(range(1, spec.num_classes)))
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / f"{STEM}.pt") as tmp:
        torch.save(state, tmp)
    spec.save(args.out / f"{STEM}.json")
    names = [c["name"] for c in SPEC["classes"]]
    summary = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "device": str(args.device),
               "train_seconds": round(seconds, 1), "final_loss_mean_last50": round(float(np.mean(history[-50:])), 4),
               "params": sum(v.numel() for v in state.values()), "torch": torch.__version__,
               "dice_on_training_ct": {"mean": round(dice.mean or 0.0, 4),
                                       "per_class": {names[c]: round(d, 4) for c, d in dice.per_class.items()}}}
    atomic_write_text(args.out / f"{STEM}_training.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
