"""Accuracy guard: a model that plain INT8 breaks is rescued by keeping its sensitive layers in FP32.

The network is built so that per-tensor activation quantization must fail: one channel feeding each
of two convolutions is scaled up 1000x (and the consuming weights down 1000x), which leaves the FP32
function unchanged but makes the INT8 activation step so coarse that every other channel rounds to 0.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from PTQLogic.core.errors import AccuracyError
from PTQLogic.core.progress import Monitor
from PTQLogic.pipeline import quantize_model
from PTQLogic.quantization.guard import GuardTarget
from PTQLogic.quantization.sensitivity import rank_sensitivity

SCALE = 1000.0
OUTLIER_NODES = {"/conv2/Conv", "/head/Conv"}
ROOT = Path(__file__).resolve().parents[1]


class OutlierNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv3d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(32, 32, 3, padding=1)
        self.head = torch.nn.Conv3d(32, 3, 1)
        with torch.no_grad():
            for producer, consumer in ((self.conv1, self.conv2), (self.conv2, self.head)):
                producer.weight[0] *= SCALE
                producer.bias[0] *= SCALE
                consumer.weight[:, 0] /= SCALE

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x * 4.0 - 2.0)))))


@pytest.fixture(scope="module")
def outlier_spec(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outlier")
    torch.onnx.export(OutlierNet().eval(), torch.zeros(1, 1, 16, 16, 16), str(folder / "outlier.onnx"),
                      input_names=["image"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    spec = {"name": "outlier", "architecture": "onnx", "weights": "outlier.onnx", "weights_format": "onnx",
            "classes": ["background", "a", "b"], "patch_size": [16, 16, 16],
            "preprocessing": {"orientation": "RAS", "intensity": "ct", "ct_window": [-200, 300]}}
    (folder / "outlier.json").write_text(json.dumps(spec))
    return folder / "outlier.json"


def test_ranking_finds_the_layers_with_outlier_inputs(outlier_spec, phantom_files, tmp_path):
    model_dir = quantize_model(outlier_spec, phantom_files["calibration"], tmp_path / "plain", num_patches=8,
                               guard=None).model_dir
    from PTQLogic.quantization.calibration import CalibrationSettings, load_calibration_volumes, sample_calibration_patches
    from PTQLogic.core.spec import load_spec

    patches = sample_calibration_patches(load_calibration_volumes(phantom_files["calibration"]),
                                         load_spec(outlier_spec), CalibrationSettings(num_patches=4, seed=5), None)
    seen = []
    ranking = rank_sensitivity(model_dir / "fp32.onnx", model_dir / "int8.onnx", patches,
                               Monitor(on_progress=lambda *step: seen.append(step)))
    assert {name for name, _ in ranking[:2]} == OUTLIER_NODES, ranking
    assert seen == [("ranking layers", i, len(patches)) for i in range(len(patches) + 1)]  # progress per patch
    assert ranking[1][1] > 5 * abs(ranking[2][1])


PEAK_RSS = """
import re, sys
import numpy as np
from PTQLogic.quantization.sensitivity import rank_sensitivity
patches = np.random.default_rng(0).random((int(sys.argv[2]), 1, 16, 16, 16), dtype=np.float32)
ranking = rank_sensitivity(sys.argv[1] + "/fp32.onnx", sys.argv[1] + "/int8.onnx", patches)
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())  # ru_maxrss survives exec: not this
print(int(peak.group(1)) // 1024, *[name for name, _ in ranking[:2]])
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from /proc/self/status (Linux)")
def test_ranking_holds_one_patch_of_activations_at_a_time(outlier_spec, phantom_files, tmp_path):
    """Every layer's FP32 inputs and output for one patch are a whole network's activations (3.4 GB per 128^3
    window of TotalSegmentator's 1.5 mm network): holding them for all 8 held-out patches killed a 24 GiB machine.
    Here, holding 240 patches' values at once raised the peak from 93 to 850 MB; one at a time keeps it flat."""
    model_dir = quantize_model(outlier_spec, phantom_files["calibration"], tmp_path / "plain", num_patches=4,
                               guard=None).model_dir

    def peak_mb(count: int) -> tuple[int, set[str]]:
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(model_dir), str(count)], capture_output=True,
                              text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peak, *top = done.stdout.split()
        return int(peak), set(top)

    few, top_few = peak_mb(2)
    many, top_many = peak_mb(240)
    assert top_few == top_many == OUTLIER_NODES
    assert many - few < 150, (few, many)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_guard_rescues_a_model_that_plain_int8_breaks(outlier_spec, phantom_files, tmp_path, runtime):
    target = GuardTarget(min_agreement=0.99, runtime=runtime)
    result = quantize_model(outlier_spec, phantom_files["calibration"], tmp_path / "guarded", num_patches=8,
                            guard=target)
    guard = json.loads((result.model_dir / "quantization.json").read_text())["guard"]
    assert guard["runtime"] == runtime
    assert guard["initial_agreement"] < 0.97  # plain INT8 misses the target ...
    assert guard["final_agreement"] >= 0.99 and guard["met"]  # ... the guard brings it within
    assert set(guard["kept"]) >= OUTLIER_NODES and len(guard["kept"]) <= 2
    assert guard["size_cost"] > 1.0  # FP32 weights for the kept layers: the cost is reported
    kept_pattern = {p for p in json.loads((result.model_dir / "quantization.json").read_text())["settings"]
                    ["exclude_nodes"]}
    assert kept_pattern == {"^/conv2/Conv$", "^/head/Conv$"}
    assert result.report["qdq"]["ok"]
    steps = guard["steps"]
    assert not steps[0]["scales_reused"] and all(step["scales_reused"] for step in steps[1:])  # calibrated once


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_a_guard_step_reusing_the_first_scales_equals_calibrating_again(outlier_spec, phantom_files, tmp_path,
                                                                       method):
    """Keeping layers in FP32 leaves the other tensors' ranges as they were: the INT8 model made from the first
    quantization's scales is the one a new calibration makes, and its calibration reads one patch, not all."""
    import onnxruntime as ort

    from PTQLogic.core.spec import load_spec
    from PTQLogic.quantization.calibration import CalibrationSettings, load_calibration_volumes, sample_calibration_patches
    from PTQLogic.quantization.quantize import CALIBRATION_STAGE, QuantizeSettings, quantize_onnx
    from PTQLogic.quantization.scale_reuse import activation_scales

    fp32 = outlier_spec.with_name("outlier.onnx")
    patches = sample_calibration_patches(load_calibration_volumes(phantom_files["calibration"]),
                                         load_spec(outlier_spec), CalibrationSettings(num_patches=6, seed=3), None)
    first = quantize_onnx(fp32, patches, tmp_path / "first.onnx", QuantizeSettings(method=method))
    kept = QuantizeSettings(method=method, exclude_nodes=("^/conv2/Conv$",))
    again = quantize_onnx(fp32, patches, tmp_path / "again.onnx", kept)
    seen = []
    reused = quantize_onnx(fp32, patches, tmp_path / "reused.onnx", kept,
                           Monitor(on_progress=lambda *step: seen.append(step)), activation_scales(first.path))
    assert reused.scales_reused and not again.scales_reused
    assert {total for stage, _, total in seen if stage == CALIBRATION_STAGE} == {1}
    scales = activation_scales(again.path)
    assert activation_scales(reused.path) == scales and len(scales) < len(activation_scales(first.path))
    outputs = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": patches})[0]
               for path in (again.path, reused.path)]
    assert np.array_equal(*outputs)


def test_guard_that_cannot_meet_its_target_fails_and_writes_nothing(outlier_spec, phantom_files, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(AccuracyError, match="misses the accuracy target.*up to 1 layer.*patches.*First give 3 or "
                                            "more calibration volumes.*--max-kept-layers"):
        quantize_model(outlier_spec, phantom_files["calibration"], out, num_patches=8,
                       guard=GuardTarget(max_dice_drop=0.01, runtime="onnxruntime", max_kept=1))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_guard_is_on_by_default_and_reports_kept_layers(outlier_spec, phantom_files, tmp_path, capsys):
    from PTQLogic.app.cli import main
    from PTQLogic.core.sysinfo import cpu_int8_target

    code = main(["quantize", "--model", str(outlier_spec), "--calibration", *map(str, phantom_files["calibration"]),
                 "--out", str(tmp_path / "cli"), "--patches", "8", "--guard-runtime", "onnxruntime"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"accuracy guard on onnxruntime, {cpu_int8_target()}" in out and "(target 0.9800)" in out
    assert "/conv2/Conv" in out or "/head/Conv" in out
    guard = json.loads((tmp_path / "cli" / "quantization.json").read_text())["guard"]
    assert guard["enforced"] and guard["threshold"] == 0.98 and guard["met"] and guard["agreement"] >= 0.98
    assert guard["isa"] == cpu_int8_target() and guard["device"] and guard["kept"]
    assert guard["initial_agreement"] < 0.98 and "held_out" in guard


def test_no_guard_measures_and_records_agreement_without_enforcing_it(outlier_spec, phantom_files, tmp_path,
                                                                      capsys):
    from PTQLogic.app.cli import main

    code = main(["quantize", "--model", str(outlier_spec), "--calibration", *map(str, phantom_files["calibration"]),
                 "--out", str(tmp_path / "plain"), "--patches", "8", "--no-guard", "--guard-runtime", "onnxruntime"])
    out = capsys.readouterr().out
    assert code == 0, out
    guard = json.loads((tmp_path / "plain" / "quantization.json").read_text())["guard"]
    assert not guard["enforced"] and guard["threshold"] is None and guard["kept"] == []
    assert guard["agreement"] < 0.97 and len(guard["steps"]) == 1  # the broken INT8 is kept, and says so
    assert f"FP32-vs-INT8 agreement {guard['agreement']:.4f} on onnxruntime" in out and "not enforced" in out


def test_cpu_placement_is_checked_and_says_it_cannot_keep_layers(outlier_spec, phantom_files, tmp_path):
    with pytest.raises(AccuracyError, match="'cpu' placement cannot keep layers in FP32.*--no-guard"):
        quantize_model(outlier_spec, phantom_files["calibration"], tmp_path / "cpu", num_patches=8,
                       placement="cpu", guard=GuardTarget(min_agreement=0.98, runtime="onnxruntime"))
    assert not (tmp_path / "cpu").exists()


@pytest.mark.parametrize("args", [["--min-agreement", "1.5"], ["--max-dice-drop", "-0.1"],
                                  ["--min-agreement", "0.9", "--max-kept-layers", "0"],
                                  ["--min-agreement", "0.9", "--max-dice-drop", "0.01"],
                                  ["--no-guard", "--min-agreement", "0.9"]])
def test_guard_settings_are_validated_before_work(outlier_spec, tmp_path, capsys, args):
    from PTQLogic.app.cli import main

    code = main(["quantize", "--model", str(outlier_spec), "--calibration", str(tmp_path / "missing.nii.gz"),
                 "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(error) == 1 and "--m" in error[0] and not (tmp_path / "x").exists()
