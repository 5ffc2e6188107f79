"""What the accuracy guard measures on: whole held-out volumes (3+ calibration volumes), segmented as `segment`
runs them, or held-out patches from the calibration volumes themselves (1-2 volumes), preprocessed once."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("nnUNet_def_n_proc", "1")

import numpy as np
import pytest

from PTQLogic.core.progress import Monitor
from PTQLogic.core.spec import load_spec
from PTQLogic.engines import create_engine
from PTQLogic.evaluation.metrics import agreement_dice
from PTQLogic.io.volumes import read_volume
from PTQLogic.pipeline import quantize_model
from PTQLogic.quantization.calibration import (PREPROCESS_STAGE, CalibrationSettings, prepare_volume,
                                               sample_calibration_patches)
from PTQLogic.quantization.guard import GuardTarget
from PTQLogic.quantization.held_out import HeldOutPatches, calibration_and_held_out

from conftest import SAMPLE_UNET


def _recorder():
    events: list[tuple[str, int, int]] = []
    return Monitor(on_progress=lambda stage, done, total: events.append((stage, done, total))), events


def _preprocessing(events) -> list[tuple[int, int]]:
    return [(done, total) for stage, done, total in events if stage == PREPROCESS_STAGE]


def test_three_volumes_hold_the_last_out_whole_and_measure_it_as_segment_does(phantom_files, tmp_path):
    from PTQLogic.inference.segmenter import segment_volume

    volumes = [*phantom_files["calibration"], phantom_files["image"]]
    monitor, events = _recorder()
    out = tmp_path / "model"
    quantize_model(SAMPLE_UNET, volumes, out, num_patches=4, monitor=monitor,
                   guard=GuardTarget(runtime="onnxruntime"))  # measured, not enforced: one INT8 file to compare
    guard = json.loads((out / "quantization.json").read_text())["guard"]
    held = Path(phantom_files["image"]).name
    assert guard["held_out"].startswith(f"whole volume(s): {held} (")
    assert guard["held_out_detail"]["kind"] == "volumes" and guard["held_out_detail"]["volumes"] == [held]
    assert _preprocessing(events) == [(0, 3), (1, 3), (2, 3), (3, 3)]  # each volume once, the held-out one too

    spec, volume = load_spec(SAMPLE_UNET), read_volume(phantom_files["image"])
    fp32 = segment_volume(volume, spec, create_engine("onnxruntime", "fp32", fp32_onnx=out / "fp32.onnx"))
    int8 = segment_volume(volume, spec, create_engine("onnxruntime", "int8", int8_onnx=out / "int8.onnx"))
    assert guard["held_out_detail"]["windows"] == int8.patches > 1
    expected = agreement_dice(int8.labels.array, fp32.labels.array, range(1, spec.num_classes))
    assert guard["agreement"] == pytest.approx(expected, abs=1e-12) and 0.9 < expected < 1.0


def test_one_or_two_volumes_are_preprocessed_once_for_calibration_and_held_out_patches(phantom_files):
    from PTQLogic.core.volume import Volume

    spec = load_spec(SAMPLE_UNET)
    big = read_volume(phantom_files["image"])  # 64^3 at the spec's spacing: room for patches clear of each other
    volumes = [read_volume(path) for path in phantom_files["calibration"]]
    settings = CalibrationSettings(num_patches=6, seed=3)
    monitor, events = _recorder()
    names = ["a", "b"]
    patches, held_out = calibration_and_held_out(volumes, names, lambda v: prepare_volume(v, spec), spec.patch_size,
                                                 settings, segmenter=None, monitor=monitor)
    assert _preprocessing(events) == [(0, 2), (1, 2), (2, 2)]
    np.testing.assert_array_equal(patches, sample_calibration_patches(volumes, spec, settings))  # as before
    assert isinstance(held_out, HeldOutPatches) and len(held_out.patches) == 4
    assert "preprocessed once for both" in held_out.note and held_out.detail["volumes"] == names
    assert not any(np.array_equal(h, c) for h in held_out.patches for c in patches)

    # where the volume leaves room, held-out patches lie clear of every calibration patch
    wide = Volume(np.pad(big.array, 40, constant_values=-1000), big.ijk_to_ras)
    _, apart = calibration_and_held_out([wide], ["wide"], lambda v: prepare_volume(v, spec), spec.patch_size,
                                        CalibrationSettings(num_patches=2, seed=0, foreground_fraction=0.0), None)
    assert apart.detail["apart"] == 4 and apart.detail["largest_overlap"] == 0.0
    assert "all clear of every calibration patch" in apart.note


def test_unreachable_target_on_a_whole_held_out_volume_fails_with_what_to_do(tmp_path, phantom_files):
    from PTQLogic.core.errors import AccuracyError

    volumes = [*phantom_files["calibration"], phantom_files["image"]]
    with pytest.raises(AccuracyError, match=r"misses the accuracy target.*measured on whole volume\(s\): "
                                            r".*--max-kept-layers.*--no-guard") as raised:
        quantize_model(SAMPLE_UNET, volumes, tmp_path / "never", num_patches=4,
                       guard=GuardTarget(min_agreement=1.0, runtime="onnxruntime", max_kept=1))
    assert not (tmp_path / "never").exists()
    assert "First give 3 or more" not in str(raised.value)  # measured on whole volumes already


def test_nnunet_guard_measures_a_whole_held_out_volume_through_nnunets_prediction(tmp_path):
    from nnunet_factory import dataset, plans, write_folder, write_image
    from PTQLogic.inference.nnunet.predict import runner_for
    from PTQLogic.models.nnunet.model_dir import open_nnunet_model
    from PTQLogic.samples.phantom import make_phantom

    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(["background", "liver", "spleen"]))
    volumes = [write_image(make_phantom(seed, (36, 36, 36), (1.5, 1.5, 1.5))[0], tmp_path / f"cal_{seed}.nii.gz")
               for seed in (11, 12, 13)]
    out = tmp_path / "int8"
    monitor, events = _recorder()
    quantize_model(folder, volumes, out, num_patches=2, guard=GuardTarget(runtime="onnxruntime"), monitor=monitor)
    guard = json.loads((out / "quantization.json").read_text())["folds"]["0"]["guard"]
    assert guard["held_out_detail"]["kind"] == "volumes" and guard["held_out_detail"]["volumes"] == ["cal_13.nii.gz"]
    assert _preprocessing(events) == [(0, 3), (1, 3), (2, 3), (3, 3)]

    runner, volume = runner_for(open_nnunet_model(folder)), read_volume(volumes[-1])  # random weights: equality only
    fp32 = runner.predict(volume, [create_engine("onnxruntime", "fp32", fp32_onnx=out / "fold_0" / "fp32.onnx")])
    int8 = runner.predict(volume, [create_engine("onnxruntime", "int8", int8_onnx=out / "fold_0" / "int8.onnx")])
    assert guard["held_out_detail"]["windows"] == int8.patches
    assert guard["agreement"] == pytest.approx(agreement_dice(int8.labels, fp32.labels, range(1, 3)), abs=1e-12)
