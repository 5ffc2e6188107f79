"""benchmarks/training/train_totalseg_phantoms.py: phantom-trained weights for whole_ct.py's TotalSegmentator-shaped
folders (tiny widths here), and whole_ct.py run on them without nnunetv2's row (agreement then with the project's
PyTorch FP32 labels, plus Dice against the phantom's truth)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "benchmarks" / "training" / "train_totalseg_phantoms.py"
WHOLE_CT = ROOT / "benchmarks" / "nnunet" / "whole_ct.py"
CT = ["--shape", "64", "64", "40", "--spacing", "1.5", "1.5", "1.5"]
sys.path[:0] = [str(TRAIN.parent), str(WHOLE_CT.parent)]

import totalseg_shapes as shapes  # noqa: E402
import train_totalseg_phantoms as training  # noqa: E402


def test_each_part_learns_the_phantom_organs_among_its_classes():
    from PTQLogic.samples.phantom import LABELS

    parts = {p.name: p for p in shapes.MODEL_SETS["total"].parts}
    organs = training.part_lut(parts["organs"])
    assert organs[LABELS["spleen"]] == 1 and organs[LABELS["liver"]] == 5
    assert (organs[LABELS["kidney_right"]], organs[LABELS["kidney_left"]]) == (2, 3)
    assert organs[LABELS["aorta"]] == 0 and organs[LABELS["vertebra"]] == 0
    assert training.part_lut(parts["vertebrae"])[LABELS["vertebra"]] == 30 - 25 + 1  # vertebrae_L2
    assert training.part_lut(parts["cardiac"])[LABELS["aorta"]] == 52 - 51 + 1
    assert not training.part_lut(parts["ribs"]).any() and not training.part_lut(parts["muscles"]).any()
    fast = training.part_lut(shapes.MODEL_SETS["fast"].parts[0])  # one model of all 117: global values
    assert [fast[LABELS[n]] for n in shapes.PHANTOM_TO_TOTAL] == list(shapes.PHANTOM_TO_TOTAL.values())
    names = json.loads(shapes.TOTAL_LABELS.read_text()) if shapes.TOTAL_LABELS.is_file() else None
    if names:  # the names the mapping claims
        assert {names[str(v)] for v in shapes.PHANTOM_TO_TOTAL.values()} == {
            "spleen", "kidney_right", "kidney_left", "liver", "vertebrae_L2", "aorta"}


def test_class_priors_set_the_head_bias():
    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Module()
            self.decoder.seg_layers = torch.nn.ModuleList([torch.nn.Conv3d(2, 4, 1)])

    net = Head()
    training.set_class_priors(net, [np.array([0, 0, 0, 1]), np.array([0, 0, 1, 0])], 4)
    assert net.decoder.seg_layers[-1].bias.detach().numpy() == pytest.approx(
        np.log([0.75, 0.25, 1e-6, 1e-6]), rel=1e-5)


def test_nearest_labels_keep_each_voxel_centres_label():
    labels = np.arange(4 * 6 * 2).reshape(4, 6, 2)
    assert training.nearest_labels(labels, (4, 6, 2)).tolist() == labels.tolist()
    assert training.nearest_labels(labels, (2, 3, 1)).tolist() == labels[1::2, 1::2, 1:].tolist()
    assert training.nearest_labels(labels, (8, 6, 2))[::2].tolist() == labels.tolist()


def test_augmentation_resamples_the_region_as_asked():
    import augment

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(1, 12, 14, 16)).astype(np.float32))
    labels = torch.zeros(12, 14, 16, dtype=torch.int64)
    labels[3:9, 4:8, 5:13] = 2
    labels[6, 7, 8] = 5
    centre = (slice(2, 10), slice(3, 11), slice(4, 12))
    # no zoom, no turn: the region's centre, voxel for voxel
    out, lab = augment.resample(image, labels, [8, 8, 8], 1.0, 0.0)
    assert torch.equal(lab, labels[centre])
    assert torch.allclose(out, image[(slice(None), *centre)], atol=1e-5)
    # a quarter turn about K: the centre turned in the J-I plane, labels still only the ones given
    _, turned = augment.resample(image, labels, [8, 8, 8], 1.0, np.pi / 2)
    assert set(turned.unique().tolist()) <= {0, 2, 5}
    assert torch.equal(turned, torch.rot90(labels[centre], 1, (1, 2))) or torch.equal(
        turned, torch.rot90(labels[centre], -1, (1, 2)))
    # zooming out by 2: the 6x4x8 organ spans 3-4 x 2-3 x 4-5 voxels, and outside the region is background
    _, small = augment.resample(image, labels, [8, 8, 8], 2.0, 0.0)
    assert 3 * 2 * 4 - 1 <= int((small == 2).sum()) <= 4 * 3 * 5
    assert int(small[0].sum()) == 0
    # training draws: a region of REGION x the patch, returned at the patch's size
    region = augment.region_for([8, 8, 8])
    assert region == [12, 12, 12]
    a, b = augment.augment(image[:, :12, :12, :12], labels[:12, :12, :12], [8, 8, 8], rng)
    assert a.shape == (1, 8, 8, 8) and b.shape == (8, 8, 8) and b.dtype == torch.int64


def test_check_every_keeps_the_weights_of_the_best_validation_check():
    import argparse

    network = torch.nn.Conv3d(1, 3, 1)
    image = torch.randn(1, 8, 8, 8)
    labels = (image[0] > 0).long() + (image[0] > 1).long()
    args = argparse.Namespace(device="cpu", amp=False, lr=0.05, batch=1, patch=[8, 8, 8], foreground_share=0.5,
                              class_draw="balanced", augment=0.0, check_every=2)
    means, seen, checks = iter([0.5, 0.9, 0.3]), [], []

    def check(net):  # scores in turn; the weights each check saw
        seen.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return {"dice": {}, "mean": next(means)}

    training.train_part(network, [(image, labels)], np.arange(3), args, seed=0, steps=6, priors=False, check=check,
                        checks=checks)
    assert [c["step"] for c in checks] == [2, 4, 6] and [c["mean"] for c in checks] == [0.5, 0.9, 0.3]
    assert not torch.equal(seen[1]["weight"], seen[2]["weight"])  # training moved on after step 4 ...
    assert all(torch.equal(v, seen[1][k]) for k, v in network.state_dict().items())  # ... and step 4's were kept


def test_phantoms_on_the_ct_grid_are_what_the_network_meets_at_test(tmp_path):
    """grid "ct": drawn as the test CT is (its shape and spacing) and resampled by nnU-Net's own preprocessing to
    the network grid, labels alongside; "model": drawn on the network grid, preprocessing only normalizes."""
    from whole_ct_setup import plans_for

    from PTQLogic.inference.nnunet.predict import NnUNetRunner
    from PTQLogic.samples.phantom import make_phantom

    args = training.parse_args(["--config", "fast", *CT, "--tiny-networks", "--out", str(tmp_path / "w"),
                                "--work", str(tmp_path / "work")])
    (tmp_path / "ct").mkdir()
    cts = shapes.write_cts(tmp_path / "ct", args.shape, args.spacing, 0, [101])
    models, parts, _, plans = plans_for("fast", args, cts)
    runner = NnUNetRunner(plans, shapes.part_dataset(parts[0], shapes.label_names(args.labels)), "3d_fullres")
    (image, labels), = training.network_volumes(runner, [3000], cts, models.spacing, "ct")
    grid = shapes.network_grid(cts, models.spacing)  # 1.5 mm CT -> the 3 mm network grid
    assert list(image.shape) == [1, *grid] and list(labels.shape) == grid and grid != list(cts["shape_kji"])
    drawn, truth = make_phantom(3000, cts["shape_kji"], tuple(reversed(cts["spacing_kji"])))
    assert np.array_equal(image.numpy(), runner.preprocess(drawn)[0])  # the CT-grid phantom, as nnU-Net resamples it
    share = [float((truth.array == v).mean()) for v in range(1, 7)]  # every organ keeps its share of the volume
    assert [float((labels.numpy() == v).mean()) for v in range(1, 7)] == pytest.approx(share, abs=0.01)
    (image, labels), = training.network_volumes(runner, [3000], cts, models.spacing, "model")
    assert list(labels.shape) == list(training.phantom_shape(cts, models.spacing))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("totalseg-train")
    command = [sys.executable, str(TRAIN), "--config", "fast", *CT, "--tiny-networks", "--steps", "60",
               "--augment", "0.2", "--check-every", "30", "--phantoms", "2", "--threads", "1",
               "--work", str(folder / "work"), "--out", str(folder / "weights")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"folder": folder, "stdout": done.stdout,
            "log": json.loads((folder / "weights" / "training_fast.json").read_text())}


@pytest.mark.slow
def test_training_learns_and_writes_a_folder_the_project_loads(trained):
    from PTQLogic.models.nnunet.checkpoint import load_checkpoint
    from PTQLogic.models.nnunet.folder import open_nnunet_folder

    record = trained["log"]["parts"]["total_3mm"]
    losses = record["losses"]
    # seeded (initial weights included), yet float order differs between CPUs: 0.733 here without augmentation, 0.766
    # with a fifth of the patches augmented (0.80 with half: augmented patches are harder); unseeded 0.53-0.72
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert max(record["held_out_dice"].values()) > 0.5  # at least one organ found on the held-out phantom
    assert record["learned_classes"] == 6 and set(record["held_out_dice"]) <= {"1", "2", "3", "5", "30", "52"}
    # the whole held-out phantom and the first training one, windows placed as at the set's step (fast: 0.5):
    # every class either side gives, scored
    assert record["volume_check_overlap"] == 0.5 and record["held_out_volume"] != record["training_volume"]
    for whole in (record["held_out_volume"], record["training_volume"]):
        assert set(whole["dice"]) == set(whole["voxels_predicted_true"]) and whole["dice"]
        assert whole["mean"] == pytest.approx(np.mean(list(whole["dice"].values())), abs=1e-4)
        for c, (predicted, true) in whole["voxels_predicted_true"].items():
            assert predicted + true > 0
            if min(predicted, true) == 0:  # a class only one side gives scores 0
                assert whole["dice"][c] == 0
    # --check-every 30: the validation phantom (seed 2001, neither trained on nor the held-out one) at steps 30 and
    # 60; the weights kept are those of the best check
    checks = record["validation_checks"]
    assert record["validation_seed"] == 2001 and [c["step"] for c in checks] == [30, 60]
    assert record["kept_step"] == max(checks, key=lambda c: c["mean"] or -1)["step"]
    assert "step 30: validation phantom Dice" in trained["stdout"]
    scored = trained["folder"] / "validation.json"  # the saved weights are the kept step's: they score the same
    command = [sys.executable, str(TRAIN.parent / "volume_check.py"), "--config", "fast", *CT, "--tiny-networks",
               "--weights", str(trained["folder"] / "weights"), "--work", str(trained["folder"] / "work"),
               "--seeds", "2001", "--overlap", "0.5", "--out", str(scored)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kept = next(c for c in checks if c["step"] == record["kept_step"])
    assert json.loads(scored.read_text())["scores_by_seed_and_overlap"]["2001"]["0.5"]["dice"] == kept["dice"]
    assert "whole held-out phantom, Dice" in trained["stdout"]
    assert "whole training phantom (3000), Dice" in trained["stdout"]
    assert trained["log"]["train_seeds"] == [3000, 3001] and trained["log"]["held_out_seed"] == 2000
    folder = next((trained["folder"] / "weights").glob("Dataset297_*/*__3d_fullres"))
    opened = open_nnunet_folder(folder)
    assert opened.configuration == "3d_fullres" and opened.folds == ("0",)
    weights = load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")["network_weights"]
    heads = [k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".bias")]
    bias = weights[max(heads, key=lambda k: int(k.split(".")[2]))]  # the full-resolution head (the others: deep
    assert float(bias[0]) > -1  # supervision's, unused at inference); background the most frequent class
    absent = [c for c in range(118) if c not in (0, 1, 2, 3, 5, 30, 52)]
    assert float(bias[absent].max()) < -8  # from the prior log(1e-6), never raised by 60 steps


def _totalsegmentator_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("totalsegmentator") is not None


@pytest.mark.slow
def test_whole_ct_on_trained_weights_without_nnunetv2(trained):
    out = trained["folder"] / "result" / "whole_ct.json"
    # totalseg: TotalSegmentator's own resampling to the model's 3 mm and back (.ci/run installs it)
    extra = ["totalseg"] if _totalsegmentator_installed() else []
    command = [sys.executable, str(WHOLE_CT), "--config", "fast", *CT, "--tiny-networks", "--repeats", "1",
               "--calibration-patches", "4", "--threads", "1", "--rows", "fp32-torch", "int8", *extra,
               "--weights", str(trained["folder"] / "weights"), "--work", str(trained["folder"] / "work"),
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads(out.read_text())["configs"]["fast"]
    repeat = config["repeats"][0]
    assert repeat["reference"] == "fp32-torch"
    assert repeat["rows"]["fp32-torch"]["agreement"]["identical"] is True
    assert 0 < repeat["rows"]["int8"]["agreement"]["dice"] <= 1
    for row in ("fp32-torch", "int8"):  # against the phantom's labels, mapped to TotalSegmentator's values
        assert 0 <= repeat["rows"][row]["truth"]["dice"] <= 1
    if extra:  # the CT there and back: on the CT's grid, in its orientation, finding what nnunetv2's way finds
        totalseg, reference = repeat["rows"]["totalseg"], repeat["rows"]["fp32-torch"]
        assert totalseg["windows"] == reference["windows"] and totalseg["agreement"]["voxels"] > 0.9
        # 0.78 and 0.99x here; with the CT turned to RAS (a mirrored body for these networks) 0.27 and 0.74x
        assert totalseg["agreement"]["dice"] > 0.6, (totalseg, reference)
        assert totalseg["truth"]["dice"] > 0.9 * reference["truth"]["dice"] > 0, (totalseg, reference)
    text = out.with_suffix(".md").read_text()
    assert "nnunetv2's row did not run" in text and "Dice vs truth" in text and "Trained weights" in text
    assert json.loads(out.read_text())["settings"]["guard"] is True and "with the accuracy guard" in text
    quantized = next((trained["folder"] / "work").glob("models-*/fast/quantized/total_3mm"))
    assert (quantized / "quantization.json").is_file()  # the guard held: the folder was written


@pytest.mark.slow
def test_whole_ct_refuses_weights_planned_for_another_ct(trained, tmp_path):
    command = [sys.executable, str(WHOLE_CT), "--config", "fast", "--shape", "64", "64", "48",
               "--spacing", "1.5", "1.5", "1.5", "--tiny-networks", "--estimate-only", "--rows", "fp32-torch",
               "--weights", str(trained["folder"] / "weights"), "--work", str(tmp_path), "--out",
               str(tmp_path / "r.json")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode != 0 and "planned for another CT" in done.stderr


@pytest.mark.slow
def test_resume_goes_on_from_the_saved_weights(tmp_path):
    command = [sys.executable, str(TRAIN), "--config", "fast", *CT, "--tiny-networks", "--steps", "5",
               "--phantoms", "1", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "w")]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    kept = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    again = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == kept.returncode == again.returncode == 0, again.stderr[-2000:]
    assert "kept" in kept.stdout  # without --resume a trained part is left as it is
    log = json.loads((tmp_path / "w" / "training_fast.json").read_text())
    assert len(log["parts"]["total_3mm"]["losses"]) == 10 and log["settings"]["resume"] is True
    assert [r["settings"]["resume"] for r in log["earlier_runs"]] == [False]  # the "kept" run wrote nothing


def test_no_guard_is_recorded_and_said():
    import whole_ct
    import whole_ct_report

    args = whole_ct.parse_args(["--config", "fast", "--out", "/tmp/unused.json", "--no-guard"])
    assert args.no_guard is True
    settings = {"weights": "/w", "guard": False, "threads": 2, "repeats": 1}
    machine = {"cpu": {"model": "x", "usable_cores": 2}, "memory_bytes": 2**30,
               "versions": {k: "1" for k in ("torch", "openvino", "nnunetv2", "onnxruntime")}}
    text = whole_ct_report.markdown({"settings": settings, "machine": machine, "smoke": False, "configs": {},
                                     "command": ["python"]})
    assert "without the accuracy guard (--no-guard" in text


@pytest.mark.slow
def test_only_trains_the_named_parts_and_keeps_the_others(tmp_path):
    command = [sys.executable, str(TRAIN), "--config", "total", "--parts", "2", *CT, "--tiny-networks", "--steps", "2",
               "--phantoms", "1", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "w")]
    done = subprocess.run(command + ["--only", "vertebrae", "--part-steps", "vertebrae=3", "--no-volume-check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name.split("_")[-1] for p in (tmp_path / "w").glob("Dataset*")] == ["vertebrae"]
    parts = json.loads((tmp_path / "w" / "training_total.json").read_text())["parts"]
    assert set(parts) == {"vertebrae"} and len(parts["vertebrae"]["losses"]) == 3  # --part-steps over --steps
    assert parts["vertebrae"]["held_out_volume"] is None and parts["vertebrae"]["training_volume"] is None
    wrong = subprocess.run(command + ["--only", "ribs"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert wrong.returncode != 0 and "--only: no part ['ribs'] in ['organs', 'vertebrae']" in wrong.stderr
    wrong = subprocess.run(command + ["--part-steps", "ribs=3"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert wrong.returncode != 0 and "--part-steps: no part ['ribs']" in wrong.stderr
    bad = subprocess.run(command + ["--part-steps", "organs"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and "--part-steps takes PART=STEPS" in bad.stderr


def test_phantoms_prepared_in_processes_are_the_ones_prepared_in_order(tmp_path):
    """Drawn and resampled in worker processes (the runner travels by pickle), the same arrays as in order."""
    from whole_ct_setup import plans_for

    from PTQLogic.inference.nnunet.predict import NnUNetRunner

    args = training.parse_args(["--config", "fast", *CT, "--tiny-networks", "--out", str(tmp_path / "w")])
    (tmp_path / "ct").mkdir()
    cts = shapes.write_cts(tmp_path / "ct", args.shape, args.spacing, 0, [101])
    models, parts, _, plans = plans_for("fast", args, cts)
    runner = NnUNetRunner(plans, shapes.part_dataset(parts[0], shapes.label_names(args.labels)), "3d_fullres")
    serial = training.network_volumes(runner, [3000, 3001, 2000], cts, models.spacing, "ct", workers=1)
    parallel = training.network_volumes(runner, [3000, 3001, 2000], cts, models.spacing, "ct", workers=2)
    for (a, la), (b, lb) in zip(serial, parallel):
        assert a.dtype == torch.float32 and la.dtype == torch.int64 and la.shape == a.shape[1:]
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(serial[0][0], serial[1][0])


@pytest.mark.parametrize("shape", [(20, 24, 28), (6, 24, 10)])  # the second is padded to the patch
def test_a_crop_from_known_class_points_is_the_crop_that_searches_for_them(shape):
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[2:5, 3:9, 4:7] = 2
    labels[1:3, 12:14, 8:9] = 5
    image = torch.randn(1, *shape)
    points = training.class_points(labels)
    assert [len(p) for p in points] == [int((labels == 2).sum()), int((labels == 5).sum())]
    for seed in range(5):
        x, y = training.crop(image, labels, (8, 8, 8), np.random.default_rng(seed), True)
        px, py = training.crop(image, labels, (8, 8, 8), np.random.default_rng(seed), True, points)
        assert x.shape == (1, 8, 8, 8) and torch.equal(x, px) and torch.equal(y, py) and int((y > 0).sum()) > 0


def test_foreground_patches_centre_each_class_equally_often_as_nnunet_does():
    """A class of 8 voxels beside one of 8000: about half of the foreground patches are centred on the small one
    (one in a thousand if every foreground voxel were equally likely)."""
    labels = torch.zeros((60, 60, 60), dtype=torch.int64)
    labels[0:20, 0:20, 0:20] = 1
    labels[50:52, 50:52, 50:52] = 3
    image = torch.zeros(1, 60, 60, 60)
    rng, points = np.random.default_rng(0), training.class_points(labels)
    small = sum(int((training.crop(image, labels, (6, 6, 6), rng, True, points)[1] == 3).any()) for _ in range(400))
    assert 150 < small < 250
    by_voxel = sum(int((training.crop(image, labels, (6, 6, 6), rng, True, points, by_voxel=True)[1] == 3).any())
                   for _ in range(400))
    assert by_voxel < 10  # --class-draw by-voxel: 8 of 8008 foreground voxels


def test_mixed_draw_centres_the_small_class_about_half_as_often_as_balanced():
    """--class-draw mixed: each foreground patch drawn balanced or by voxel with equal chance, so a class of 8 voxels
    beside one of 8000 is centred in about a quarter of the patches (balanced: half, by voxel: almost never)."""
    from argparse import Namespace

    labels = torch.zeros((60, 60, 60), dtype=torch.int64)
    labels[0:20, 0:20, 0:20] = 1
    labels[50:52, 50:52, 50:52] = 3
    volume, points = (torch.zeros(1, 60, 60, 60), labels), training.class_points(labels)
    args = Namespace(foreground_share=1.0, class_draw="mixed", augment=0.0, patch=(6, 6, 6), device="cpu")
    rng = np.random.default_rng(0)
    small = sum(int((training.augmented_crop(volume, points, args, rng)[1] == 3).any()) for _ in range(800))
    assert 150 < small < 250


@pytest.mark.parametrize("argv, fails", [([], False),
                                         (["--foreground-share", "0.33", "--class-draw", "by-voxel"], False),
                                         (["--foreground-share", "1.5"], True), (["--class-draw", "x"], True)])
def test_patch_sampling_options_are_checked(argv, fails, capsys):
    if fails:
        with pytest.raises(SystemExit):
            training.parse_args(["--out", "w", *argv])
        assert argv[0] in capsys.readouterr().err
    else:
        args = training.parse_args(["--out", "w", *argv])
        assert (args.foreground_share, args.class_draw) == ((0.33, "by-voxel") if argv else (2 / 3, "balanced"))


@pytest.mark.slow
def test_grid_gap_scores_a_trained_part_on_both_grids(trained, tmp_path):
    out = tmp_path / "gap.json"
    command = [sys.executable, str(TRAIN.parent / "grid_gap.py"), "--config", "fast", *CT, "--tiny-networks",
               "--windows", "1", "--weights", str(trained["folder"] / "weights"),
               "--work", str(trained["folder"] / "work"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(out.read_text())["dice_by_grid"]
    assert set(scores) == {"model", "ct"}
    for grid in scores.values():  # the organs in the window, each scored
        assert grid["2000"] and all(0 <= v <= 1 for v in grid["2000"].values())


@pytest.mark.slow
def test_volume_check_scores_a_trained_part_on_whole_phantoms_of_the_seeds_asked(trained, tmp_path):
    out = tmp_path / "check.json"
    command = [sys.executable, str(TRAIN.parent / "volume_check.py"), "--config", "fast", *CT, "--tiny-networks",
               "--seeds", "0", "3000", "--overlap", "0.2", "0.5", "--weights", str(trained["folder"] / "weights"),
               "--work", str(trained["folder"] / "work"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(out.read_text())["scores_by_seed_and_overlap"]
    assert set(scores) == {"0", "3000"} and all(set(v) == {"0.2", "0.5"} for v in scores.values())
    for score in (s for by_overlap in scores.values() for s in by_overlap.values()):
        assert score["dice"] and all(0 <= v <= 1 for v in score["dice"].values())
        assert all(true > 0 or predicted > 0 for predicted, true in score["voxels_predicted_true"].values())
    bad = subprocess.run(command[:-2] + ["--part", "ribs", "--out", str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and "--part: no part 'ribs'" in bad.stderr
