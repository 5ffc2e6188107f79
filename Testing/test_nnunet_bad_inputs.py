"""Bad nnU-Net inputs: one clear error, nothing written, no code from the files run or imported."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from nnunet_factory import architecture, dataset, plans, write_folder, write_image
from PTQLogic.app.cli import main
from PTQLogic.samples.phantom import make_phantom

LABELS = ["background", "liver", "spleen"]


class _CreatesFile:
    """Unpickling this would create a file (the marker) - the loader must refuse before that."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def setup(tmp_path):
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(LABELS))
    image = write_image(make_phantom(1, (32, 32, 32), (1.5, 1.5, 1.5))[0], tmp_path / "image.nii.gz")
    return folder, image, tmp_path


def _quantize_fails(folder, image, tmp_path, capsys, *extra) -> str:
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["quantize", "--model", str(folder), "--calibration", str(image), "--out", str(out),
                 "--patches", "2", *extra])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "unexpected" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return err


def _edit_plans(folder, change):
    data = json.loads((folder / "plans.json").read_text())
    change(data["configurations"]["3d_fullres"])
    (folder / "plans.json").write_text(json.dumps(data))


def test_checkpoint_whose_pickle_carries_code_is_refused_and_never_run(setup, capsys):
    folder, image, tmp_path = setup
    marker = tmp_path.parent / f"{tmp_path.name}-PWNED"
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["logging"]["evil"] = _CreatesFile(marker)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    err = _quantize_fails(folder, image, tmp_path, capsys)
    assert "Refused to load" in err and "open" in err and "checkpoint_final.pth" in err
    code = main(["segment", "--model", str(folder), "--input", str(image), "--output", str(tmp_path / "l.nii.gz"),
                 "--runtime", "torch", "--precision", "fp32"])
    assert code != 0 and "Refused" in capsys.readouterr().err and not (tmp_path / "l.nii.gz").exists()
    assert not marker.exists()


def test_missing_plans_is_one_clear_error(setup, capsys):
    folder, image, tmp_path = setup
    (folder / "plans.json").unlink()
    assert "plans.json" in _quantize_fails(folder, image, tmp_path, capsys)


def test_missing_fold_is_one_clear_error(setup, capsys):
    folder, image, tmp_path = setup
    assert "fold_3/checkpoint_final.pth" in _quantize_fails(folder, image, tmp_path, capsys, "--folds", "0", "3")
    (folder / "fold_0" / "checkpoint_final.pth").rename(folder / "fold_0" / "checkpoint_best.pth")
    assert "no fold_*/checkpoint_final.pth" in _quantize_fails(folder, image, tmp_path, capsys)
    from PTQLogic.models.nnunet.model_dir import open_nnunet_model

    best = open_nnunet_model(folder, checkpoint="checkpoint_best.pth")  # what --checkpoint checkpoint_best.pth opens
    assert best.folds == ["0"] and len(best.networks) == 1


def test_unknown_network_class_is_refused_without_importing_it(setup, capsys):
    folder, image, tmp_path = setup
    _edit_plans(folder, lambda c: c["architecture"].update(network_class_name="evil_pkg_xyz.nets.MyUNet"))
    err = _quantize_fails(folder, image, tmp_path, capsys)
    assert "evil_pkg_xyz.nets.MyUNet" in err and "not supported" in err
    assert "evil_pkg_xyz" not in sys.modules


@pytest.mark.parametrize("key, value", [("nonlin", "os.system"), ("conv_op", "builtins.exec"),
                                         ("norm_op", "torch.nn.modules.module.Module")])
def test_arch_kwargs_outside_the_allow_list_are_refused(setup, capsys, key, value):
    folder, image, tmp_path = setup
    _edit_plans(folder, lambda c: c["architecture"]["arch_kwargs"].update({key: value}))
    err = _quantize_fails(folder, image, tmp_path, capsys)
    assert key in err and value in err and "not allowed" in err


def test_other_named_code_in_plans_is_refused(setup, capsys):
    folder, image, tmp_path = setup
    _edit_plans(folder, lambda c: c.update(normalization_schemes=["MyNormalization"]))
    assert "MyNormalization" in _quantize_fails(folder, image, tmp_path, capsys)
    _edit_plans(folder, lambda c: c.update(normalization_schemes=["CTNormalization"], resampling_fn_data="evil_fn"))
    assert "evil_fn" in _quantize_fails(folder, image, tmp_path, capsys)


def test_region_based_labels_are_refused(setup, capsys):
    folder, image, tmp_path = setup
    data = json.loads((folder / "dataset.json").read_text())
    data["labels"] = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3}
    data["regions_class_order"] = [1, 2, 3]
    (folder / "dataset.json").write_text(json.dumps(data))
    assert "region" in _quantize_fails(folder, image, tmp_path, capsys)


def test_weights_that_do_not_fit_the_plans_are_one_clear_error(setup, capsys):
    folder, image, tmp_path = setup
    _edit_plans(folder, lambda c: c.update(architecture=architecture(features=(8, 16, 32))))
    err = _quantize_fails(folder, image, tmp_path, capsys)
    assert "do not fit the network built from plans.json" in err


def test_checkpoint_pickled_by_numpy_1_loads(tmp_path):
    """Checkpoints written under numpy 1.x name numpy.core.multiarray (TotalSegmentator's weights do)."""
    import zipfile

    import numpy as np

    from PTQLogic.models.nnunet.checkpoint import load_checkpoint

    torch.save({"network_weights": {"w": torch.ones(2)}, "_best_ema": np.float64(0.5), "curve": np.arange(3.0)},
               tmp_path / "new.pth")
    with zipfile.ZipFile(tmp_path / "new.pth") as src, zipfile.ZipFile(tmp_path / "old.pth", "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    loaded = load_checkpoint(tmp_path / "old.pth")
    assert loaded["_best_ema"] == 0.5 and list(loaded["curve"]) == [0.0, 1.0, 2.0]


def test_build_and_benchmark_say_what_to_use_for_nnunet_folders(tmp_path, capsys):
    (tmp_path / "nnunet_model.json").write_text("{}")
    assert main(["build", "--model", str(tmp_path), "--runtime", "onnxruntime", "--precision", "fp32"]) != 0
    assert "ptqseg segment --model FOLDER --compare" in capsys.readouterr().err


def test_progress_is_reported_and_cancel_leaves_no_output(setup):
    from PTQLogic.core.errors import Cancelled
    from PTQLogic.pipeline import segment
    from PTQLogic.core.progress import Monitor

    folder, image, tmp_path = setup
    events = []
    segment(folder, image, tmp_path / "ok.nii.gz", runtime="torch", precision="fp32",
            monitor=Monitor(on_progress=lambda *e: events.append(e)))
    windows = [e for e in events if e[0] == "nnU-Net sliding window"]
    assert windows and windows[-1][1] == windows[-1][2] == 1  # 32^3 image, 32^3 patch: one window

    monitor = Monitor()
    monitor.on_progress = lambda stage, done, total: monitor.cancel() if stage == "nnU-Net sliding window" else None
    with pytest.raises(Cancelled):
        segment(folder, image, tmp_path / "cancelled.nii.gz", runtime="torch", precision="fp32", monitor=monitor)
    assert not (tmp_path / "cancelled.nii.gz").exists() and not (tmp_path / "cancelled.nii.gz.labels.json").exists()


def test_engine_with_the_wrong_number_of_classes_is_one_clear_error(setup):
    from PTQLogic.engines.torch_engine import TorchEngine
    from PTQLogic.core.errors import ModelError
    from PTQLogic.io.volumes import read_volume
    from PTQLogic.inference.nnunet.predict import runner_for
    from PTQLogic.models.nnunet.model_dir import open_nnunet_model
    from PTQLogic.models.nnunet.network import build_network

    folder, image, _ = setup
    model = open_nnunet_model(folder)
    wrong = build_network(architecture(), 1, len(LABELS) + 2)
    with pytest.raises(ModelError, match="nnU-Net expects"):
        runner_for(model).predict(read_volume(image), [TorchEngine(wrong, "fp32", device="cpu")])


def test_nnunet_fold_that_misses_the_guard_target_writes_nothing(setup, capsys):
    folder, image, tmp_path = setup  # random weights: INT8 cannot agree perfectly with FP32 with one layer kept
    err = _quantize_fails(folder, image, tmp_path, capsys, "--min-agreement", "1.0", "--max-kept-layers", "1",
                          "--guard-runtime", "onnxruntime")
    assert "misses the accuracy target on onnxruntime" in err and "--no-guard" in err


def test_volume_too_large_for_memory_is_refused_before_any_engine(setup, capsys, monkeypatch):
    """nnunetv2 keeps fp16 logits of every class over the grid and resamples them to the input grid: a volume
    that cannot fit is refused with the numbers before an engine is built, and nothing is written."""
    import PTQLogic.inference.nnunet.segment as nnunet_segment

    folder, image, tmp_path = setup
    built = []
    real_open_engines = nnunet_segment.open_engines
    monkeypatch.setattr(nnunet_segment, "open_engines", lambda *a, **k: built.append(1) or real_open_engines(*a, **k))
    monkeypatch.setenv("PTQSEG_MAX_MEMORY_GB", "0.05")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["segment", "--model", str(folder), "--input", str(image), "--output", str(tmp_path / "l.nii.gz"),
                 "--runtime", "torch", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "GiB to segment with nnU-Net (3 classes" in err and "PTQSEG_MAX_MEMORY_GB" in err, err
    assert not built and sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.setenv("PTQSEG_MAX_MEMORY_GB", "4")
    assert main(["segment", "--model", str(folder), "--input", str(image), "--output", str(tmp_path / "l.nii.gz"),
                 "--runtime", "torch", "--precision", "fp32"]) == 0
    assert built and (tmp_path / "l.nii.gz").exists()


def test_volume_time_leaves_engine_builds_out(setup, monkeypatch):
    """The volume's seconds (and FP32's with --compare) are the predictions', as for other models; opening the
    engines is build time. An engine opening made 2 s slower shows up there only."""
    import time

    import PTQLogic.inference.nnunet.segment as nnunet_segment
    from PTQLogic.pipeline import segment

    folder, image, tmp_path = setup
    real_open_engines = nnunet_segment.open_engines
    monkeypatch.setattr(nnunet_segment, "open_engines",
                        lambda *a, **k: time.sleep(2) or real_open_engines(*a, **k))
    started = time.perf_counter()
    outcome = segment(folder, image, tmp_path / "l.nii.gz", runtime="torch", precision="fp32")
    wall = time.perf_counter() - started
    assert outcome.build_seconds >= 2 and outcome.seconds < 2 <= wall - outcome.seconds
    assert outcome.seconds >= outcome.network_seconds > 0


@pytest.mark.parametrize("runtime, precision, says", [("auto", "int8", "Quantize it first"),
                                                      ("torch", "fp16", "CUDA GPU")])
def test_original_folder_says_what_it_runs_at_other_precisions(setup, capsys, runtime, precision, says):
    """An original nnU-Net folder runs on PyTorch in FP32, and in FP16 on an NVIDIA GPU (the GPU baseline before
    quantizing): INT8, or FP16 without a GPU, is one clear error and writes nothing."""
    folder, image, tmp_path = setup
    output = tmp_path / "labels.nii.gz"
    code = main(["segment", "--model", str(folder), "--input", str(image), "--output", str(output),
                 "--runtime", runtime, "--precision", precision])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "unexpected" not in err, err
    assert not output.exists()
