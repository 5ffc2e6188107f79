"""Real ModelOpt INT8 quantization of an exported MONAI UNet, calibrated on CPU."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from PTQLogic.core.errors import Cancelled, InputError
from PTQLogic.models.onnx_export import export_onnx
from PTQLogic.core.fileio import sha256_file
from PTQLogic.models.torch_models import build_network
from PTQLogic.core.progress import Monitor
from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx
from PTQLogic.core.spec import spec_from_dict

torch.set_num_threads(2)
PATCH = (16, 16, 16)


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    spec = spec_from_dict({"name": "unet", "architecture": "UNet", "classes": ["bg", "a", "b"],
                           "kwargs": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]},
                           "patch_size": list(PATCH)})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fp32")
    return export_onnx(build_network(spec), spec, folder / "fp32.onnx").path


def calibration(n: int = 4, channels: int = 1, patch=PATCH) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, channels, *patch)).astype(np.float32)


def run(path, data):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": data})[0]


def test_int8_dq_only_is_small_valid_and_close(fp32_onnx, tmp_path):
    source_hash = sha256_file(fp32_onnx)
    events = []
    report = quantize_onnx(fp32_onnx, calibration(), tmp_path / "int8.onnx",
                           monitor=Monitor(lambda *e: events.append(e)))
    assert events[0] == ("quantize", 0, 1) and events[-1] == ("quantize", 1, 1)
    calibration_steps = events[1:-1]  # one per calibration batch, from ModelOpt's own data reader
    assert calibration_steps and all(e[0] == "calibration (ModelOpt)" and e[2] == 4 for e in calibration_steps)
    assert ("calibration (ModelOpt)", 4, 4) in calibration_steps
    assert report.path == tmp_path / "int8.onnx" and report.bytes == report.path.stat().st_size
    assert report.fp32_bytes == fp32_onnx.stat().st_size
    assert report.ratio == pytest.approx(report.bytes / report.fp32_bytes)
    assert report.ratio <= 0.35, f"DQ-only INT8 file is {report.ratio:.3f}x the FP32 file"
    assert report.calibration_patches == 4 and report.seconds > 0
    assert report.qdq.ok, report.qdq.violations
    assert report.qdq.counts["Conv"]["quantized"] >= 4
    # ModelOpt's intermediates stay out of the user's folder; its log is kept and referenced.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.modelopt.log", "int8.onnx"]
    assert "[modelopt][onnx]" in report.log_path.read_text()
    assert sha256_file(fp32_onnx) == source_hash
    json.dumps(report.to_dict())  # serializable for quantization.json

    data = calibration(2)[:, :, ::-1].copy()  # not the calibration patches themselves
    reference, quantized = run(fp32_onnx, data), run(report.path, data)
    assert quantized.shape == reference.shape
    error = np.abs(quantized - reference).max() / np.abs(reference).max()
    assert 0 < error < 0.15, f"INT8 relative error {error:.3f}"


def test_excluded_op_types_stay_fp32(fp32_onnx, tmp_path):
    settings = QuantizeSettings(method="entropy", exclude_op_types=("ConvTranspose",))
    report = quantize_onnx(fp32_onnx, calibration(), tmp_path / "int8.onnx", settings)
    assert report.qdq.ok
    assert report.qdq.counts["ConvTranspose"]["quantized"] == 0
    assert report.qdq.counts["Conv"]["quantized"] >= 4
    assert report.to_dict()["settings"]["exclude_op_types"] == ["ConvTranspose"]


@pytest.mark.parametrize("data, message", [
    (calibration(channels=2), "channels differ"),
    (calibration(patch=(16, 16, 8)), "patch size differ"),
    (calibration()[0], "N >= 1"),
    (np.full((2, 1, *PATCH), np.nan, np.float32), "NaN"),
])
def test_bad_calibration_is_rejected_before_work(fp32_onnx, tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        quantize_onnx(fp32_onnx, data, tmp_path / "int8.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_overwrite_and_cancel(fp32_onnx, tmp_path):
    with pytest.raises(InputError, match="method"):
        quantize_onnx(fp32_onnx, calibration(), tmp_path / "int8.onnx", QuantizeSettings(method="mse"))  # not offered
    with pytest.raises(InputError, match="overwrite"):
        quantize_onnx(fp32_onnx, calibration(), fp32_onnx)
    monitor = Monitor()
    monitor.cancel()
    with pytest.raises(Cancelled):
        quantize_onnx(fp32_onnx, calibration(), tmp_path / "int8.onnx", monitor=monitor)
    assert list(tmp_path.iterdir()) == []


def test_cancel_between_calibration_batches_stops_modelopt(fp32_onnx, tmp_path):
    monitor = Monitor()

    def cancel_after_second_batch(stage, done, total):
        if stage == "calibration (ModelOpt)" and done == 2:
            monitor.cancel()

    monitor.on_progress = cancel_after_second_batch
    with pytest.raises(Cancelled):
        quantize_onnx(fp32_onnx, calibration(), tmp_path / "int8.onnx", monitor=monitor)
    assert list(tmp_path.iterdir()) == []
