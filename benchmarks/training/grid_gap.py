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

import totalseg_shapes as shapes  # noqa: E402
import train_totalseg_phantoms as training  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["total", "fast"], default="total")
    p.add_argument("--part", default=None, help="the part's name (default: the first)")
    p.add_argument("--weights", type=Path, required=True, help="train_totalseg_phantoms.py's --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[training.HELD_OUT_SEED])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    p.add_argument("--work", type=Path, default=Path("/tmp/ptqseg-whole-ct"))
    p.add_argument("--labels", type=Path, default=shapes.TOTAL_LABELS)
    p.add_argument("--tiny-networks", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.parts = None

    from PTQLogic.core.sysinfo import system_info
    from PTQLogic.inference.nnunet.predict import NnUNetRunner
    from PTQLogic.models.nnunet.checkpoint import load_checkpoint
    from PTQLogic.models.nnunet.network import build_network

    cts, models, parts, plans = training.part_setup(args)
    part = next(q for q in parts if args.part in (None, q.name))
    arch = plans["configurations"]["3d_fullres"]
    network = build_network(arch["architecture"], 1, part.classes + 1)
    checkpoint = shapes.part_folder(args.weights, models, part) / "fold_0" / "checkpoint_final.pth"
    network.load_state_dict(load_checkpoint(checkpoint)["network_weights"])
    runner = NnUNetRunner(plans, shapes.part_dataset(part, shapes.label_names(args.labels)), "3d_fullres")
    lut = training.part_lut(part)
    scores = {}
    for grid in ("model", "ct"):
        started = time.perf_counter()
        scores[grid] = {str(seed): training.held_out_dice(
            network, training.network_volumes(runner, [seed], cts, models.spacing, grid)[0], lut,
            arch["patch_size"], "cpu", args.windows) for seed in args.seeds}
        print(f"{grid} grid: {scores[grid]} ({time.perf_counter() - started:.0f} s)", flush=True)
    record = {"command": ["python"] + sys.argv, "machine": system_info(), "config": models.name, "part": part.name,
              "checkpoint": str(checkpoint), "windows": args.windows, "patch": arch["patch_size"],
              "dice_by_grid": scores}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
