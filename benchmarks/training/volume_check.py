"""FP32 Dice of one phantom-trained part on whole phantoms of any seeds, segmented as a sliding window.

The training checks each part on one held-out phantom (seed 2000). This scores a trained part on the phantoms a
user names: the test CT's own (seed 0, drawn as the training draws it), training seeds (does the network fit what
it saw?) and other held-out ones, at the window overlap asked (0.2 places windows as nnU-Net's step 0.8 does):

    python benchmarks/training/volume_check.py --config total --weights DIR --part organs --seeds 0 2000 3000 \\
        --overlap 0.2 --out check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "nnunet"), str(Path(__file__).parent)]

import totalseg_shapes as shapes  # noqa: E402
import train_totalseg_phantoms as training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["total", "fast"], default="total")
    p.add_argument("--part", default=None, help="the part's name (default: the first)")
    p.add_argument("--weights", type=Path, required=True, help="train_totalseg_phantoms.py's --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[training.TEST_SEED, training.HELD_OUT_SEED])
    p.add_argument("--overlap", type=float, nargs="+", default=[0.2])
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    p.add_argument("--work", type=Path, default=Path("/tmp/ptqseg-whole-ct"))
    p.add_argument("--labels", type=Path, default=shapes.TOTAL_LABELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny-networks", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.parts = None
    if not all(0 <= v < 1 for v in args.overlap):
        p.error("--overlap: each value in [0, 1)")

    from PTQLogic.core.sysinfo import system_info
    from PTQLogic.inference.nnunet.predict import NnUNetRunner
    from PTQLogic.models.nnunet.checkpoint import load_checkpoint
    from PTQLogic.models.nnunet.network import build_network

    cts, models, parts, plans = training.part_setup(args)
    part = next((q for q in parts if args.part in (None, q.name)), None)
    if part is None:
        p.error(f"--part: no part {args.part!r} in {[q.name for q in parts]}")
    arch = plans["configurations"]["3d_fullres"]
    network = build_network(arch["architecture"], 1, part.classes + 1)
    checkpoint = shapes.part_folder(args.weights, models, part) / "fold_0" / "checkpoint_final.pth"
    network.load_state_dict(load_checkpoint(checkpoint)["network_weights"])
    network.to(args.device)
    runner = NnUNetRunner(plans, shapes.part_dataset(part, shapes.label_names(args.labels)), "3d_fullres")
    lut = training.part_lut(part)
    scores: dict[str, dict] = {}
    for seed in args.seeds:
        volume = training.network_volumes(runner, [seed], cts, models.spacing)[0]
        for overlap in args.overlap:
            started = time.perf_counter()
            score = training.volume_dice(network, volume, lut, arch["patch_size"], args.device, overlap)
            scores.setdefault(str(seed), {})[str(overlap)] = score
            print(f"seed {seed}, overlap {overlap}: Dice {score['dice']}, voxels predicted/true "
                  f"{score['voxels_predicted_true']} ({time.perf_counter() - started:.0f} s)", flush=True)
    record = {"command": ["python"] + sys.argv, "machine": system_info(), "config": models.name, "part": part.name,
              "checkpoint": str(checkpoint), "patch": arch["patch_size"], "train_seeds_from": training.TRAIN_SEED_BASE,
              "test_seed": training.TEST_SEED, "scores_by_seed_and_overlap": scores}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
