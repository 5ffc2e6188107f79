"""Phantom-trained weights for the TotalSegmentator-shaped nnU-Net folders of ``whole_ct.py`` (issue 25).

Random weights time the networks but say nothing about INT8 fidelity, and their near-tied logits make the
export stage time a network that does not exist. This trains each part on abdominal phantoms
(``PTQLogic.samples.phantom``) with the very plans ``whole_ct.py`` writes for the same CT, shape and
``--parts`` (``whole_ct_setup.plans_for``), and saves TotalSegmentator's layout for ``whole_ct.py --weights``:

    python benchmarks/training/train_totalseg_phantoms.py --config fast --steps 300 --patch 64 64 64 \\
        --out /tmp/totalseg-phantom-weights
    python benchmarks/nnunet/whole_ct.py --config fast --weights /tmp/totalseg-phantom-weights ...

Phantoms are drawn on the CT's own grid and resampled by nnU-Net's preprocessing, as the test CT is
(``--phantom-grid ct``; ``model`` draws them at the model's spacing, as runs before 2026-12-06 did).
Labels: the phantom's six organs are TotalSegmentator "total" labels (spleen 1, kidneys 2/3, liver 5,
vertebrae_L2 30 for its spine column, aorta 52); each part learns the ones among its classes, and every other
voxel as background (the muscle and rib parts see none of theirs: they learn background only). Data kept apart:
training phantoms use seeds from 3000, the held-out check seed 2000, ``whole_ct.py`` tests on seed 0 and
calibrates on 101/102.
Training: nnunetv2's own Dice + CE loss (``DC_and_CE_loss``, memory-efficient soft Dice, background excluded),
Adam with polynomial decay from the head's class priors, random patches (two in three centred on a voxel of one of the
part's classes, each class as likely as the others, as nnU-Net samples foreground; before 2026-12-06 on any foreground
voxel, so mostly on the liver).
Writes per part ``Dataset<task>_TotalSegShape_<part>/<trainer>__nnUNetPlans__3d_fullres/`` (plans.json,
dataset.json, fold_0/checkpoint_final.pth) and ``training.json`` (losses, held-out Dice per class, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
NNUNET = ROOT / "benchmarks" / "nnunet"
sys.path[:0] = [str(ROOT), str(NNUNET), str(Path(__file__).parent)]

import PTQLogic  # noqa: E402,F401 - first: no library telemetry, no caches in ~ (PTQLogic/core/offline.py)
import totalseg_shapes as shapes  # noqa: E402
from patches import augmented_crop, class_points, crop  # noqa: E402,F401 (crop, class_points: tests and callers)
from whole_ct_setup import CALIBRATION_SEEDS, TEST_SEED, plans_for, work_dir  # noqa: E402

TRAIN_SEED_BASE, HELD_OUT_SEED = 3000, 2000
VALIDATION_SEED = 2001  # --check-every picks the weights on this phantom, so that 2000 stays unseen


def part_lut(part: shapes.Part) -> np.ndarray:
    """Phantom label value -> the part's class (0 where the organ is not one of the part's classes)."""
    total = shapes.phantom_lut().astype(np.int64)
    inside = (total >= part.first_label) & (total < part.first_label + part.classes)
    return np.where(inside, total - part.first_label + 1, 0)


def phantom_shape(cts: dict[str, Any], spacing: float) -> tuple[int, int, int]:
    """KJI voxels at ``spacing`` mm covering the CT's field of view."""
    return tuple(max(8, int(round(n * s / spacing))) for n, s in zip(cts["shape_kji"], cts["spacing_kji"]))


def nearest_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``labels`` on a grid of ``shape`` over the same extent, each voxel taking the label at its centre."""
    index = [np.minimum(((np.arange(n) + 0.5) * (s / n)).astype(np.int64), s - 1) for n, s in zip(shape, labels.shape)]
    return labels[np.ix_(*index)]


def draw_phantom(seed: int, cts: dict[str, Any], spacing: float, grid: str) -> tuple[Any, Any]:
    """The phantom of ``seed`` on the CT's grid ("ct") or at the model's spacing ("model"): (image, labels)."""
    from PTQLogic.samples.phantom import make_phantom

    if grid == "ct":
        return make_phantom(seed, cts["shape_kji"], tuple(reversed(cts["spacing_kji"])))
    return make_phantom(seed, phantom_shape(cts, spacing), (spacing,) * 3)


def network_volume(seed: int, runner: Any, cts: dict[str, Any], spacing: float, grid: str) -> tuple[Any, Any]:
    """The phantom of ``seed`` as nnU-Net sees it: (normalized image (1, K, J, I) float32, labels (K, J, I) uint8)."""
    image, labels = draw_phantom(seed, cts, spacing, grid)
    data, _ = runner.preprocess(image)
    target = labels.array if grid == "model" else nearest_labels(labels.array, data.shape[1:])
    if data.shape[1:] != target.shape:  # the labels must lie on the grid nnU-Net gives the image
        raise SystemExit(f"preprocessing changed the phantom's grid {target.shape} -> {data.shape[1:]}")
    return np.ascontiguousarray(data), target


def network_volumes(runner: Any, seeds: Sequence[int], cts: dict[str, Any], spacing: float,
                    grid: str = "ct", workers: int = 1) -> list[tuple[Any, Any]]:
    """(normalized image (1, K, J, I) float32, phantom labels (K, J, I) int64) per seed, as nnU-Net sees them,
    drawn and preprocessed ``workers`` at a time in processes (a CT-grid phantom of 512x512x300 takes about 40 s
    on one core to draw and about 3 GB while drawn, then seconds to resample).

    ``grid`` "ct": each phantom is drawn on the CT's own grid, as ``whole_ct.py``'s test and calibration CTs are,
    and nnU-Net's preprocessing resamples it to the network's spacing (labels follow by nearest neighbour), so the
    networks train on what they meet at test. "model": drawn at the model's spacing over the CT's field of view,
    so preprocessing only normalizes (faster; the runs before 2026-12-06: noise and blur per voxel then differ
    from the resampled test CT's, and networks that scored 0.98 on such phantoms over-segmented the test CT).
    """
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    import torch

    one = partial(network_volume, runner=runner, cts=cts, spacing=spacing, grid=grid)
    if workers <= 1 or len(seeds) == 1:
        drawn = [one(s) for s in seeds]
    else:
        with ProcessPoolExecutor(min(workers, len(seeds))) as pool:
            drawn = list(pool.map(one, seeds))
    return [(torch.from_numpy(image), torch.from_numpy(labels.astype(np.int64))) for image, labels in drawn]


def set_class_priors(network, labels: Sequence[Any], classes: int) -> None:
    """The segmentation head's biases at the log of each class's voxel share in the training labels (a class
    never seen at 1e-6): with 100+ outputs and a handful of organs present, Adam would otherwise spend most
    of a short training pushing the absent classes' logits down one learning rate a step."""
    import torch

    counts = np.bincount(np.concatenate([np.asarray(y).ravel() for y in labels]), minlength=classes)
    head = network.decoder.seg_layers[-1]
    with torch.no_grad():
        head.bias.copy_(torch.from_numpy(np.log(np.maximum(counts / counts.sum(), 1e-6))).to(head.bias.dtype))


def train_part(network, volumes, lut: np.ndarray, args: argparse.Namespace, seed: int, steps: int,
               priors: bool = True, check=None, checks: list | None = None) -> list[float]:
    """Train ``network`` in place for ``steps`` steps (first its head's class priors, :func:`set_class_priors`,
    unless it goes on from saved weights); the loss of every step. ``check`` (network -> :func:`volume_dice`
    scores): called every ``args.check_every`` steps and at the end, each result appended to ``checks``; the
    network ends with the weights whose check scored the highest mean Dice (whole volumes can get worse while the
    patch loss still falls)."""
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lut_t = torch.from_numpy(lut)
    data = [(image, lut_t[labels]) for image, labels in volumes]
    points = [class_points(y) for _, y in data]
    if priors:
        set_class_priors(network, [y.numpy() for _, y in data], len(network.decoder.seg_layers[-1].bias))
    network.to(args.device).train()
    amp = args.amp and str(args.device).startswith("cuda")
    torch.backends.cudnn.benchmark = amp
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / steps) ** 0.9)
    losses, started, best = [], time.perf_counter(), None
    for step in range(steps):
        picks = [int(i) for i in rng.integers(len(data), size=args.batch)]
        crops = [augmented_crop(data[i], points[i], args, rng) for i in picks]
        images = torch.stack([c[0] for c in crops]).to(args.device)
        target = torch.stack([c[1] for c in crops])[:, None].to(args.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(network(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps} loss {np.mean(losses[-10:]):.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        if check is not None and ((step + 1) % max(args.check_every, 1) == 0 or step == steps - 1):
            best = _check_step(network, check, step + 1, checks, best)
    if check is not None and best[1] != steps:
        network.load_state_dict(best[2])
        print(f"  kept the weights of step {best[1]} (validation mean Dice {best[0]})", flush=True)
    return losses


def _check_step(network, check, step: int, checks: list, best):
    """One validation check during training: (mean Dice, step, weights) of the best so far."""
    score = check(network)
    network.train()
    checks.append({"step": step, **score})
    print(f"  step {step}: validation phantom Dice {score['dice']} (mean {score['mean']})", flush=True)
    mean = score["mean"] if score["mean"] is not None else -1.0
    if best is None or mean > best[0]:
        return mean, step, {k: v.detach().clone() for k, v in network.state_dict().items()}
    return best


def held_out_dice(network, volume, lut: np.ndarray, patch: Sequence[int], device: str, windows: int = 4) -> dict:
    """Dice per present class on ``windows`` foreground-centred patches of a held-out phantom (FP32, PyTorch)."""
    import torch

    rng = np.random.default_rng(HELD_OUT_SEED)
    image, labels = volume[0], torch.from_numpy(lut)[volume[1]]
    network.eval()
    hits: dict[int, list[float]] = {}
    with torch.no_grad():
        for _ in range(windows):
            x, y = crop(image, labels, patch, rng, True)
            predicted = network(x[None].to(device)).argmax(1)[0].cpu()
            for c in (int(v) for v in torch.unique(y) if v > 0):
                a, b = predicted == c, y == c
                hits.setdefault(c, []).append(float(2 * (a & b).sum() / (a.sum() + b.sum())))
    return {str(c): round(float(np.mean(v)), 4) for c, v in sorted(hits.items())}


def volume_dice(network, volume, lut: np.ndarray, patch: Sequence[int], device: str,
                overlap: float = 0.5) -> dict:
    """A whole phantom (the held-out one, or one trained on) segmented as a sliding window (MONAI's, Gaussian
    blending, FP32; ``overlap`` 0.2 places windows as nnU-Net's step 0.8, TotalSegmentator's, does), scored by
    ``whole_ct.py``'s own agreement (``whole_ct_report.agreement``): Dice per class present in the truth or the
    prediction, so that a class the network gives where the phantom has none (a false positive away from the
    organs, which windows around the organs never see) counts as 0; and the voxels of each class predicted vs true."""
    import torch
    from monai.inferers import sliding_window_inference
    from whole_ct_report import agreement

    image, labels = volume[0], torch.from_numpy(lut)[volume[1]]
    network.eval()
    with torch.no_grad():
        logits = sliding_window_inference(image[None].to(device), list(patch), 2, network, overlap=overlap,
                                          mode="gaussian", sw_device=device, device="cpu")
    scores = agreement(labels.numpy(), logits.argmax(1)[0].numpy())
    per_class = scores["per_class"]
    return {"dice": {c: round(v["dice"], 4) for c, v in per_class.items()},
            "mean": round(scores["dice"], 4) if per_class else None,
            "voxels_predicted_true": {c: [v["voxels"], v["reference_voxels"]] for c, v in per_class.items()}}


def part_setup(args: argparse.Namespace) -> tuple[dict[str, Any], shapes.ModelSet, list[shapes.Part], dict]:
    """The test and calibration CTs ``whole_ct.py`` writes for these settings (``--work``, ``--shape``,
    ``--spacing``), the model set, its parts and the plans nnU-Net writes for them: (cts, models, parts, plans)."""
    cts = shapes.write_cts(work_dir(args, "ct", args.shape, args.spacing), args.shape, args.spacing, TEST_SEED,
                           CALIBRATION_SEEDS)
    models, parts, _, plans = plans_for(args.config, args, cts)
    return cts, models, list(parts), plans


def add_trained_part_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the scripts that score one trained part (``grid_gap.py``, ``volume_check.py``)."""
    p.add_argument("--config", choices=["total", "fast"], default="total")
    p.add_argument("--part", default=None, help="the part's name (default: the first)")
    p.add_argument("--weights", type=Path, required=True, help="train_totalseg_phantoms.py's --out")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    p.add_argument("--work", type=Path, default=Path("/tmp/ptqseg-whole-ct"))
    p.add_argument("--labels", type=Path, default=shapes.TOTAL_LABELS)
    p.add_argument("--tiny-networks", action="store_true")
    p.add_argument("--out", type=Path, required=True)


@dataclass
class TrainedPart:
    """One part of a trained set, ready to score: its CTs' settings, network (FP32, eval), runner and label map."""

    cts: dict[str, Any]
    models: shapes.ModelSet
    part: shapes.Part
    plans: dict
    network: Any
    runner: Any
    lut: np.ndarray
    checkpoint: Path

    @property
    def patch(self) -> list[int]:
        return list(self.plans["configurations"]["3d_fullres"]["patch_size"])


def load_trained_part(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainedPart:
    """``args.part`` of the set in ``args.weights`` (options of :func:`add_trained_part_arguments`); an unknown part
    is a usage error naming the set's parts."""
    from PTQLogic.inference.nnunet.predict import NnUNetRunner
    from PTQLogic.models.nnunet.checkpoint import load_checkpoint
    from PTQLogic.models.nnunet.network import build_network

    args.parts = None
    cts, models, parts, plans = part_setup(args)
    part = next((q for q in parts if args.part in (None, q.name)), None)
    if part is None:
        parser.error(f"--part: no part {args.part!r} in {[q.name for q in parts]}")
    network = build_network(plans["configurations"]["3d_fullres"]["architecture"], 1, part.classes + 1)
    checkpoint = shapes.part_folder(args.weights, models, part) / "fold_0" / "checkpoint_final.pth"
    network.load_state_dict(load_checkpoint(checkpoint)["network_weights"])
    runner = NnUNetRunner(plans, shapes.part_dataset(part, shapes.label_names(args.labels)), "3d_fullres")
    return TrainedPart(cts, models, part, plans, network.eval(), runner, part_lut(part), checkpoint)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["total", "fast"], default="fast")
    p.add_argument("--parts", type=int, default=None, help="first K parts of 'total' (as whole_ct.py --parts)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], metavar=("X", "Y", "Z"))
    p.add_argument("--work", type=Path, default=Path("/tmp/ptqseg-whole-ct"), help="whole_ct.py's --work (CTs)")
    p.add_argument("--out", type=Path, required=True, help="weights folder for whole_ct.py --weights")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--part-steps", nargs="+", default=[], metavar="PART=STEPS",
                   help="steps for named parts instead of --steps (e.g. organs=3000 muscles=10)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, help="training patch KJI (default: the plans' patch)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--phantoms", type=int, default=6, help="training phantoms (seeds from 3000)")
    p.add_argument("--foreground-share", type=float, default=2 / 3,
                   help="share of patches centred on a foreground voxel (nnU-Net: 1/3 of a batch at least; the "
                        "rest anywhere, where the network learns what is not an organ)")
    p.add_argument("--class-draw", choices=["balanced", "by-voxel", "mixed"], default="balanced",
                   help="foreground patches: each class present equally often (nnU-Net), in proportion to its "
                        "voxels (the runs before 2026-12-06), or each patch one of the two with equal chance (mixed)")
    p.add_argument("--augment", type=float, default=0.0, metavar="CHANCE",
                   help="share of patches zoomed (0.8-1.25) and turned about the body axis (+-0.35 rad) "
                        "(augment.py); 0: none (every run before this option)")
    p.add_argument("--phantom-grid", choices=["ct", "model"], default="ct",
                   help="draw phantoms on the CT's grid and let nnU-Net resample them, as the test CT (ct), or at the "
                        "model's spacing (model: faster, the runs before 2026-12-06; see network_volumes)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--draw-workers", type=int, default=1,
                   help="processes drawing the phantoms at once (each about 3 GB on a 512x512x300 CT grid)")
    p.add_argument("--no-volume-check", action="store_true",
                   help="skip the sliding-window Dice of the whole held-out phantom and of the first training one "
                        "(held_out_volume, training_volume in training.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast on CUDA, as nnU-Net trains in mixed precision (ignored on the CPU)")
    p.add_argument("--labels", type=Path, default=shapes.TOTAL_LABELS, help="the 117 'total' label names (JSON)")
    p.add_argument("--only", nargs="+", metavar="PART",
                   help="train only these parts, in this order (e.g. muscles ribs): the others of --parts are left "
                   "as they are in --out, so parts can be trained on different machines")
    p.add_argument("--check-every", type=int, default=0, metavar="STEPS",
                   help="segment a whole validation phantom (seed 2001) every STEPS steps and at the end, and keep "
                        "the weights that scored best there (0: keep the last weights)")
    p.add_argument("--resume", action="store_true", help="train the parts already in --out further (--steps more)")
    p.add_argument("--tiny-networks", action="store_true", help="tests: feature widths / 8 (as whole_ct.py)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.phantoms < 1 or not args.lr > 0:
        p.error("--steps, --batch and --phantoms must be at least 1, --lr positive")
    if args.check_every < 0:
        p.error(f"--check-every must be 0 (off) or a number of steps, got {args.check_every}")
    if not 0 <= args.augment <= 1:
        p.error(f"--augment must be between 0 and 1, got {args.augment}")
    if not 0 <= args.foreground_share <= 1:
        p.error(f"--foreground-share must be between 0 and 1, got {args.foreground_share}")
    try:
        args.part_steps = {k: int(v) for k, v in (item.split("=", 1) for item in args.part_steps)}
    except ValueError:
        p.error(f"--part-steps takes PART=STEPS items, got {' '.join(args.part_steps)}")
    if any(v < 1 for v in args.part_steps.values()):
        p.error("--part-steps: every part needs at least 1 step")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from PTQLogic.core.sysinfo import system_info
    from PTQLogic.inference.nnunet.predict import NnUNetRunner
    from PTQLogic.models.nnunet.network import build_network

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cts, models, parts, plans = part_setup(args)
    arch = plans["configurations"]["3d_fullres"]
    args.patch = list(args.patch or arch["patch_size"])
    names = shapes.label_names(args.labels)
    on_ct = args.phantom_grid == "ct"
    shape = tuple(shapes.network_grid(cts, models.spacing)) if on_ct else phantom_shape(cts, models.spacing)
    drawn = "on the CT's grid, resampled to " if on_ct else ""
    print(f"{models.name}: {len(parts)} part(s), phantoms {drawn}{'x'.join(map(str, shape))} at {models.spacing} mm, "
          f"patch {args.patch}, {args.steps} steps of {args.batch}", flush=True)
    record: dict[str, Any] = {"config": models.name, "command": ["python"] + sys.argv, "machine": system_info(),
                              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "phantom_shape_kji": shape, "phantom_to_total": shapes.PHANTOM_TO_TOTAL,
                              "train_seeds": [TRAIN_SEED_BASE + i for i in range(args.phantoms)],
                              "held_out_seed": HELD_OUT_SEED, "parts": {}}
    log = args.out / f"training_{models.name}.json"
    if log.is_file():  # parts trained by an earlier run into --out are kept, and so is their record
        before = json.loads(log.read_text())
        record["parts"] = before.get("parts", {})
        record["earlier_runs"] = before.get("earlier_runs", []) + [
            {"command": before.get("command"), "settings": before.get("settings")}]
    volumes = held_out = validation = None
    for option, named in (("--only", args.only or []), ("--part-steps", args.part_steps)):
        unknown = set(named) - {part.name for part in parts}
        if unknown:
            raise SystemExit(f"{option}: no part {sorted(unknown)} in {[part.name for part in parts]}")
    # in --only's order: a caller can take each part as soon as its checkpoint lands (quick parts first)
    for part in [q for name in args.only for q in parts if q.name == name] if args.only else parts:
        folder = shapes.part_folder(args.out, models, part)
        target = folder / "fold_0" / "checkpoint_final.pth"
        if target.is_file() and not args.resume:
            print(f"{part.name}: kept {target}", flush=True)
            continue
        dataset = shapes.part_dataset(part, names)
        runner = NnUNetRunner(plans, dataset, "3d_fullres")
        if volumes is None:  # every part shares the plans, so the same network inputs
            extra = [HELD_OUT_SEED] + ([VALIDATION_SEED] if args.check_every else [])
            drawn = network_volumes(runner, record["train_seeds"] + extra, cts, models.spacing, args.phantom_grid,
                                    args.draw_workers)
            validation = drawn.pop() if args.check_every else None
            *volumes, held_out = drawn
        lut = part_lut(part)
        print(f"{part.name}: classes {part.classes}, learns {int((lut > 0).sum())} phantom organ(s)", flush=True)
        earlier = record["parts"].get(part.name, {})
        seed = part.task_id + len(earlier.get("losses", []))
        torch.manual_seed(seed)  # the initial weights too: a run is repeatable
        network = build_network(arch["architecture"], 1, part.classes + 1)
        if target.is_file():  # --resume: go on from the saved weights (a new schedule of --steps steps)
            from PTQLogic.models.nnunet.checkpoint import load_checkpoint

            network.load_state_dict(load_checkpoint(target)["network_weights"])
        else:
            network.apply(network.initialize)
        started = time.perf_counter()
        overlap = round(1 - models.step_size, 6)
        checks: list[dict] = []
        check = None if validation is None else (
            lambda net: volume_dice(net, validation, lut, args.patch, args.device, overlap))
        losses = train_part(network, volumes, lut, args, seed=seed, steps=args.part_steps.get(part.name, args.steps),
                            priors=not target.is_file(), check=check, checks=checks)
        losses = earlier.get("losses", []) + losses
        seconds = time.perf_counter() - started + earlier.get("seconds", 0.0)
        dice = held_out_dice(network, held_out, lut, args.patch, args.device)
        # whole phantoms with windows where nnU-Net's predictor puts them at the set's step (TotalSegmentator's 0.8):
        # the held-out one, and the first training one (a network that misses an organ there did not learn it)
        whole, fit = (None, None) if args.no_volume_check else (
            volume_dice(network, v, lut, args.patch, args.device, overlap) for v in (held_out, volumes[0]))
        weights = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        target.parent.mkdir(parents=True, exist_ok=True)
        (folder / "plans.json").write_text(json.dumps(dict(plans, dataset_name=folder.parent.name), indent=2))
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
        partial = target.with_name(target.name + ".part")
        torch.save(shapes.checkpoint_record(models, plans, dataset, weights, epoch=len(losses)), partial)
        partial.replace(target)
        record["parts"][part.name] = {"seconds": round(seconds, 1), "losses": [round(v, 5) for v in losses],
                                      "held_out_dice": dice, "held_out_volume": whole, "training_volume": fit,
                                      "volume_check_overlap": overlap,
                                      **({"validation_seed": VALIDATION_SEED, "validation_checks": checks,
                                          "kept_step": max(checks, key=lambda c: c["mean"] or -1)["step"]}
                                         if checks else {}),
                                      "learned_classes": int((lut > 0).sum())}
        print(f"{part.name}: {len(losses)} steps in {seconds / 60:.1f} min, held-out Dice {dice}", flush=True)
        for name, scores in (("held-out phantom", whole), (f"training phantom ({TRAIN_SEED_BASE})", fit)):
            if scores:
                print(f"{part.name}: whole {name}, Dice {scores['dice']} (mean {scores['mean']}), voxels "
                      f"predicted/true {scores['voxels_predicted_true']}", flush=True)
        log.write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
