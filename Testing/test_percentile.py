"""Percentile calibration (--method percentile): activation ranges clipped below their maximum, on both
placements (ModelOpt's: ModelOpt places, ONNX Runtime's percentile calibrator sets the scales; the CPU placement:
ONNX Runtime's quantizer itself), recorded in quantization.json, and its options checked before any work."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from PTQLogic.core.spec import load_spec
from PTQLogic.io.volumes import read_volume
from PTQLogic.quantization.calibration import CalibrationSettings, sample_calibration_patches
from PTQLogic.quantization.percentile import activation_scales
from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx

from conftest import SAMPLE_UNET


def _scales(path) -> dict[str, float]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {t: float(numpy_helper.to_array(inits[s])) for t, s in activation_scales(model).items()}


@pytest.mark.parametrize("placement", ["modelopt", "cpu"])
def test_percentile_clips_activation_ranges_below_their_maximum(quantized_unet, phantom_files, tmp_path, placement):
    patches = sample_calibration_patches([read_volume(p) for p in phantom_files["calibration"]],
                                         load_spec(SAMPLE_UNET), CalibrationSettings(num_patches=4, seed=0))
    fp32 = quantized_unet / "fp32.onnx"
    quantize_onnx(fp32, patches, tmp_path / "max.onnx", QuantizeSettings(method="max", placement=placement))
    report = quantize_onnx(fp32, patches, tmp_path / "pct.onnx",
                           QuantizeSettings(method="percentile", percentile=99.9, placement=placement))
    top, clipped = _scales(tmp_path / "max.onnx"), _scales(tmp_path / "pct.onnx")
    assert clipped.keys() == top.keys() and len(top) >= 8 and report.qdq.ok
    ratios = np.array([clipped[t] / top[t] for t in top])
    assert np.all(ratios <= 1.0 + 1e-6)  # a percentile of |x| never exceeds its maximum
    assert np.median(ratios) < 0.9  # and 99.9 clips most ranges well below it


def test_percentile_is_recorded_and_its_options_are_checked_before_work(tmp_path, capsys):
    from PTQLogic.app.cli import main

    for args, message in ((["--percentile", "99.9"], "--percentile applies to --method percentile only"),
                          (["--method", "percentile", "--percentile", "100"], "--percentile must be in (50, 100)")):
        code = main(["quantize", "--model", str(SAMPLE_UNET), "--calibration", str(tmp_path / "missing.nii.gz"),
                     "--out", str(tmp_path / "x"), *args])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "x").exists()


def test_quantize_records_the_percentile(phantom_files, tmp_path):
    from PTQLogic.pipeline import quantize_model

    result = quantize_model(SAMPLE_UNET, phantom_files["calibration"], tmp_path / "m", num_patches=4,
                            method="percentile", percentile=99.95, guard=None)
    report = json.loads((result.model_dir / "quantization.json").read_text())
    assert report["calibration"]["method"] == "percentile" and report["calibration"]["percentile"] == 99.95
    assert report["settings"]["percentile"] == 99.95 and report["qdq"]["ok"]
    assert "99.95 percentile" in (result.model_dir / "int8.modelopt.log").read_text()


def test_a_killed_calibrator_is_reported_as_out_of_memory_with_what_to_do():
    import signal

    from PTQLogic.quantization.percentile import failure_message

    killed = failure_message(-signal.SIGKILL, "", 16)
    assert "out of memory" in killed and "fewer than 8" in killed and "--method entropy" in killed
    assert "fewer than 4" in failure_message(-signal.SIGKILL, "", 4)
    other = failure_message(1, "Traceback ... ValueError: bad", 16)
    assert "exit code 1" in other and "ValueError: bad" in other and "memory" not in other
