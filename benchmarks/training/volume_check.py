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

import train_totalseg_phantoms as training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    training.add_trained_part_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[training.TEST_SEED, training.HELD_OUT_SEED])
    p.add_argument("--overlap", type=float, nargs="+", default=[0.2])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not all(0 <= v < 1 for v in args.overlap):
        p.error("--overlap: each value in [0, 1)")

    from PTQLogic.core.sysinfo import system_info

    trained = training.load_trained_part(args, p)
    trained.network.to(args.device)
    scores: dict[str, dict] = {}
    for seed in args.seeds:
        volume = training.network_volumes(trained.runner, [seed], trained.cts, trained.models.spacing)[0]
        for overlap in args.overlap:
            started = time.perf_counter()
            score = training.volume_dice(trained.network, volume, trained.lut, trained.patch, args.device, overlap)
            scores.setdefault(str(seed), {})[str(overlap)] = score
            print(f"seed {seed}, overlap {overlap}: Dice {score['dice']}, voxels predicted/true "
                  f"{score['voxels_predicted_true']} ({time.perf_counter() - started:.0f} s)", flush=True)
    record = {"command": ["python"] + sys.argv, "machine": system_info(), "config": trained.models.name,
              "part": trained.part.name, "checkpoint": str(trained.checkpoint), "patch": trained.patch,
              "train_seeds_from": training.TRAIN_SEED_BASE, "test_seed": training.TEST_SEED,
              "scores_by_seed_and_overlap": scores}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
