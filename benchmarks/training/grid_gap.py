"""FP32 Dice of a phantom-trained part on held-out phantoms drawn on the model's grid and on the CT's grid.

``train_totalseg_phantoms.py --phantom-grid model`` (the runs before 2026-12-06) drew its phantoms at the model's
spacing; ``whole_ct.py``'s test CT is drawn on its own finer grid and resampled by nnU-Net's preprocessing. This
scores one trained part both ways on the same held-out seed (foreground-centred windows, as the training's own
held-out check): a large gap says the network meets at test what it never saw in training.

    python benchmarks/training/grid_gap.py --config total --weights DIR --part organs --out gap.json
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
    p.add_argument("--seeds", type=int, nargs="+", default=[training.HELD_OUT_SEED])
    p.add_argument("--windows", type=int, default=4)
    args = p.parse_args(argv)

    from PTQLogic.core.sysinfo import system_info

    trained = training.load_trained_part(args, p)
    scores = {}
    for grid in ("model", "ct"):
        started = time.perf_counter()
        scores[grid] = {str(seed): training.held_out_dice(
            trained.network, training.network_volumes(trained.runner, [seed], trained.cts, trained.models.spacing,
                                                      grid)[0],
            trained.lut, trained.patch, "cpu", args.windows) for seed in args.seeds}
        print(f"{grid} grid: {scores[grid]} ({time.perf_counter() - started:.0f} s)", flush=True)
    record = {"command": ["python"] + sys.argv, "machine": system_info(), "config": trained.models.name,
              "part": trained.part.name, "checkpoint": str(trained.checkpoint), "windows": args.windows,
              "patch": trained.patch, "dice_by_grid": scores}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
