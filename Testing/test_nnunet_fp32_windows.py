"""``segment --fp32-windows``: the sliding-window positions where INT8 is least sure are taken from FP32.

Random-weight folders, so the tests assert structure, not agreement thresholds: which windows are chosen, that a
window taken from FP32 gives FP32's logits there (the INT8 contribution is removed exactly), what the outcome and
the CLI report, and what is refused. The agreement it buys on a trained network is a benchmark
(``benchmarks/nnunet/whole_ct.py --rows int8-fp32w``)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("nnUNet_def_n_proc", "1")

import numpy as np
import pytest
import torch

from nnunet_factory import dataset, one_thread, plans, write_folder, write_image  # noqa: F401 (autouse fixture)
from PTQLogic.app.cli import main
from PTQLogic.core.errors import InputError
from PTQLogic.inference.nnunet.engines import open_engines
from PTQLogic.inference.nnunet.fp32_windows import Fp32WindowPolicy, Fp32Windows, chosen_windows, unsure_share
from PTQLogic.inference.nnunet.predict import runner_for
from PTQLogic.inference.nnunet.segment import _fp32_windows
from PTQLogic.io.volumes import read_volume
from PTQLogic.models.nnunet.model_dir import open_nnunet_model
from PTQLogic.samples.phantom import make_phantom

LABELS = ["background", "liver", "spleen", "kidney_right"]


def test_unsure_share_counts_voxels_whose_two_top_logits_are_close():
    logits = torch.zeros(3, 4, 4, 4)
    logits[0] = 5.0  # class 0 leads everywhere by 5
    logits[1, :2] = 4.5  # ... but by 0.5 over class 1 in the first half of the first axis
    assert unsure_share(logits, margin=1.0, stride=1) == pytest.approx(0.5)
    assert unsure_share(logits, margin=0.4, stride=1) == 0.0
    assert unsure_share(logits, margin=1.0, stride=2) == pytest.approx(0.5)  # every other voxel: same halves
    channels_last = logits.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # OpenVINO's layout
    assert unsure_share(channels_last, margin=1.0, stride=1) == pytest.approx(0.5)
    assert unsure_share(logits[:1], margin=1.0) == 0.0


def test_the_most_unsure_windows_above_the_threshold_are_chosen_at_most_the_share():
    policy = Fp32WindowPolicy(max_share=0.5, unsure_share=0.01)
    shares = [0.0, 0.05, 0.02, 0.2, 0.005, 0.03]
    assert chosen_windows(shares, policy) == [1, 3, 5]  # 3 of 6; 0.02 is the fourth
    assert chosen_windows([0.005, 0.009], policy) == []  # none above the threshold
    assert chosen_windows(shares, Fp32WindowPolicy(max_share=0.1)) == []  # 10% of 6 windows: none
    assert chosen_windows(shares, Fp32WindowPolicy(max_share=1.0)) == [1, 2, 3, 5]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InputError, match="--fp32-windows"):
            Fp32WindowPolicy(max_share=bad)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A two-fold random-weight folder, quantized; and a test image needing 8 windows per fold."""
    root = tmp_path_factory.mktemp("fp32_windows")
    folder = write_folder(root, plans([1.5, 1.5, 1.5], [24, 24, 24]), dataset(LABELS), folds=(0, 1))
    calibration = [write_image(make_phantom(s, (30, 30, 30), (1.5, 1.5, 1.5))[0], root / f"cal_{s}.nii.gz")
                   for s in (21, 22)]
    image = write_image(make_phantom(23, (36, 34, 32), (1.5, 1.5, 1.5))[0], root / "test.nii.gz")
    out = root / "int8"
    assert main(["quantize", "--model", str(folder), "--calibration", *map(str, calibration), "--out", str(out),
                 "--patches", "4", "--no-guard", "--json"]) == 0
    return {"folder": out, "image": image}


def _logits(model, engines, image, fp32_windows=None):
    runner = runner_for(model)
    predicted = runner.predict_logits(read_volume(image), engines, fp32_windows=fp32_windows)
    return predicted, runner


def test_every_window_taken_from_fp32_gives_fp32s_logits_and_labels(quantized, capsys):
    model = open_nnunet_model(quantized["folder"])
    int8, _ = open_engines(model, "openvino", "int8")
    fp32, _ = open_engines(model, "openvino", "fp32")
    opened = []
    everything = Fp32Windows(Fp32WindowPolicy(max_share=1.0, margin=1e9, unsure_share=-1.0),
                             lambda: opened.append(1) or fp32)
    mixed, runner = _logits(model, int8, quantized["image"], everything)
    plain_int8, _ = _logits(model, int8, quantized["image"])
    reference, _ = _logits(model, fp32, quantized["image"])
    assert opened == [1]  # FP32 engines opened once for both folds
    assert everything.considered == 16 and everything.windows == 16  # 8 windows x 2 folds, all taken
    assert mixed.patches == plain_int8.patches == 16  # the FP32 windows' extra calls are not counted as windows
    # nnU-Net sums the windows in half precision: where the Gaussian weights are tiny (the grid's corners) its
    # rounding alone moves a logit by up to 0.5, so the logits are compared on average
    as_fp32 = (mixed.logits.float() - reference.logits.float()).abs().mean().item()
    as_int8 = (plain_int8.logits.float() - reference.logits.float()).abs().mean().item()
    assert as_int8 > 1e-3  # INT8 alone differs from FP32 ...
    assert as_fp32 < 0.05 * as_int8  # ... the windows taken from FP32 leave only half-precision rounding
    labels = [runner.export(p)[0] for p in (mixed, plain_int8, reference)]
    differ = [(labels[i] != labels[2]).mean() for i in (0, 1)]
    assert differ[1] > 0 and differ[0] < 0.1 * differ[1]


def test_no_window_is_taken_when_int8_is_sure_everywhere(quantized):
    model = open_nnunet_model(quantized["folder"])
    int8, _ = open_engines(model, "openvino", "int8")
    never = Fp32Windows(Fp32WindowPolicy(max_share=1.0, margin=0.0), lambda: pytest.fail("FP32 was opened"))
    mixed, _ = _logits(model, int8, quantized["image"], never)
    plain, _ = _logits(model, int8, quantized["image"])
    assert never.windows == 0 and never.considered == 16 and never.build_seconds == 0.0
    assert torch.equal(mixed.logits, plain.logits)


def test_segment_reports_the_fp32_windows_and_refuses_them_where_they_do_not_apply(quantized, tmp_path, capsys):
    output = tmp_path / "labels.nii.gz"
    code = main(["segment", "--model", str(quantized["folder"]), "--input", str(quantized["image"]), "--output",
                 str(output), "--runtime", "openvino", "--fp32-windows", "0.5", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    outcome = json.loads(captured.out)
    windows = outcome["fp32_windows"]
    assert windows["of"] == 16 and 0 <= windows["windows"] <= 8 and windows["max_share"] == 0.5
    assert outcome["patches"] == 16
    assert "up to 8 unsure windows again in INT8 and FP32" in outcome["estimate"]["text"]
    assert read_volume(output).array.shape == read_volume(quantized["image"]).array.shape
    code = main(["segment", "--model", str(quantized["folder"]), "--input", str(quantized["image"]), "--output",
                 str(output), "--runtime", "openvino", "--fp32-windows", "0.5"])
    assert code == 0
    assert f"{windows['windows']} of 16 windows taken from FP32" in capsys.readouterr().out

    for extra, message in ((["--precision", "fp32"], "needs --precision int8"),
                           (["--fp32-windows", "2"], "share of the windows in \\(0, 1\\]")):
        args = ["segment", "--model", str(quantized["folder"]), "--input", str(quantized["image"]), "--output",
                str(tmp_path / "refused.nii.gz"), "--fp32-windows", "0.5", *extra]
        assert main(args) == 2
        assert message.replace("\\", "") in capsys.readouterr().err
        assert not (tmp_path / "refused.nii.gz").exists()


def test_fp32_windows_are_refused_for_models_without_nnunets_sliding_window(quantized_unet, tmp_path, capsys):
    image = write_image(make_phantom(5, (40, 40, 40), (1.5, 1.5, 1.5))[0], tmp_path / "image.nii.gz")
    code = main(["segment", "--model", str(quantized_unet), "--input", str(image), "--output",
                 str(tmp_path / "out.nii.gz"), "--fp32-windows", "0.25"])
    assert code == 2
    assert "--fp32-windows is for nnU-Net models" in capsys.readouterr().err


def test_the_fp32_windows_float_layers_follow_cpu_float_and_the_reference_stays_f32(quantized, monkeypatch):
    import openvino as ov

    from PTQLogic.core.progress import Monitor
    from PTQLogic.engines.openvino_engine import native_bf16

    monkeypatch.setenv("PTQSEG_CPU_FLOAT", "bf16")  # what `ptqseg --cpu-float bf16` sets
    model = open_nnunet_model(quantized["folder"])
    int8, _ = open_engines(model, "openvino", "int8")
    reference, _ = open_engines(model, "openvino", "fp32")
    assert reference[0].float_precision == "f32"  # FP32 runs are the agreement reference: never bf16
    expected = "bf16" if native_bf16(ov.Core()) else "f32"  # emulated bf16 would be slower than f32
    windows = _fp32_windows(Fp32WindowPolicy(max_share=1.0), int8, model, None, Monitor())
    assert int8[0].float_precision == expected and windows.engine().float_precision == expected
    assert windows.float_precision == expected
    monkeypatch.setenv("PTQSEG_CPU_FLOAT", "f32")
    int8, _ = open_engines(model, "openvino", "int8")
    windows = _fp32_windows(Fp32WindowPolicy(max_share=1.0), int8, model, None, Monitor())
    assert windows.engine().float_precision == "f32"


def test_the_fp32_engine_counts_in_the_memory_check_before_any_engine_is_built(quantized, monkeypatch):
    from PTQLogic.inference.nnunet.memory import check_nnunet_memory, fp32_windows_bytes, peak_bytes_per_part

    runner, volume = runner_for(open_nnunet_model(quantized["folder"])), read_volume(quantized["image"])
    plain = peak_bytes_per_part([runner], volume, [2])[0]
    more = peak_bytes_per_part([runner], volume, [2], fp32_windows=True)[0]
    assert more - plain == fp32_windows_bytes(runner) > 2**30  # a second engine and one window's float copies
    monkeypatch.setenv("PTQSEG_MAX_MEMORY_GB", f"{(plain + more) / 2 / 2**30:.3f}")  # room for INT8 alone
    assert check_nnunet_memory([runner], volume, [2]) == plain
    with pytest.raises(InputError, match="would need about"):
        check_nnunet_memory([runner], volume, [2], fp32_windows=True)
