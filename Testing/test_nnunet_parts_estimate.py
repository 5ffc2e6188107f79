"""TotalSegmentator-style nnU-Net parts: the estimate said before the run (windows, memory, time), progress per part,
and one preprocessing shared by the parts whose plans preprocess alike (labels as when each part runs alone, and as
nnunetv2's own predictor gives them)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

os.environ.setdefault("nnUNet_def_n_proc", "1")

import numpy as np
import pytest

from conftest import ROOT
from nnunet_factory import architecture, dataset, one_thread, plans, write_folder, write_image  # noqa: F401 (autouse fixture)
from test_nnunet_parity import nnunet_reference
from PTQLogic.app.cli import main
from PTQLogic.core.errors import Cancelled
from PTQLogic.core.progress import Monitor, parse_estimate_line, parse_progress_line
from PTQLogic.core.volume import Volume
from PTQLogic.engines.torch_engine import TorchEngine
from PTQLogic.inference.nnunet.estimate import estimate_run, window_count
from PTQLogic.inference.nnunet.memory import network_grid
from PTQLogic.inference.nnunet.predict import runner_for
from PTQLogic.io.volumes import read_volume
from PTQLogic.models.nnunet.model_dir import open_nnunet_model
from PTQLogic.pipeline import segment
from PTQLogic.samples.phantom import make_phantom
from PTQLogic.slicer import support

SMALL = architecture(features=(4, 8), strides=((1, 1, 1), (2, 2, 2)), kernels=((3, 3, 3),) * 2)
WIDER = architecture(features=(6, 12), strides=((1, 1, 1), (2, 2, 2)), kernels=((3, 3, 3),) * 2)
PARTS = {  # a and b preprocess alike (TotalSegmentator's parts do); c has its own spacing and network
    "a": (plans([1.5, 1.5, 1.5], [16, 16, 16], arch=SMALL), ["background", "liver", "spleen"]),
    "b": (plans([1.5, 1.5, 1.5], [16, 16, 16], arch=SMALL), ["background", "kidney_right", "aorta"]),
    "c": (plans([2.0, 2.0, 2.0], [16, 16, 16], arch=WIDER), ["background", "stomach", "vertebra"]),
}


def _image_with_zero_border(seed: int, shape, spacing) -> Volume:
    """A CT phantom whose outer slabs are 0: nnU-Net crops them away before it tiles the grid."""
    image = make_phantom(seed, shape, spacing)[0]
    array = image.array.astype(np.float32) + 1100.0
    array[:3] = 0.0
    array[:, :, -4:] = 0.0
    return Volume(array, image.ijk_to_ras)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_parts")
    folders = {name: write_folder(root / name, plan, dataset(labels), seed=3 + i)
               for i, (name, (plan, labels)) in enumerate(PARTS.items())}
    image = write_image(_image_with_zero_border(21, (30, 32, 34), (1.5, 1.5, 1.5)), root / "ct_0000.nii.gz")
    return folders, image


def _cli(args, capsys):
    code = main(["segment", *args, "--runtime", "torch", "--precision", "fp32", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def _models(folders):
    return [a for name in ("a", "b", "c") for a in ("--model", str(folders[name]))]


@pytest.mark.parametrize("case", ["cropped", "mirroring", "two-folds", "step-0.8", "anisotropic-transposed"])
def test_estimated_windows_are_the_windows_run(tmp_path, case):
    plan = plans([1.5, 1.5, 1.5], [16, 16, 16], arch=SMALL)
    spacing = (1.5, 1.5, 1.5)
    if case == "anisotropic-transposed":
        arch = architecture(features=(4, 8), strides=((1, 1, 1), (1, 2, 2)), kernels=((1, 3, 3), (3, 3, 3)))
        plan = plans([4.0, 1.3, 1.3], [8, 16, 16], transpose_forward=(2, 0, 1), arch=arch)
        spacing = (4.0, 1.1, 1.1)
    folder = write_folder(tmp_path, plan, dataset(["background", "liver", "spleen"]),
                          folds=(0, 1) if case == "two-folds" else (0,))
    volume = _image_with_zero_border(4, (26, 30, 28), spacing)
    model = open_nnunet_model(folder)
    model.step_size = 0.8 if case == "step-0.8" else 0.5
    runner, mirroring = runner_for(model), case == "mirroring"
    estimate = estimate_run([model], [runner], volume, "torch", "fp32", mirroring)
    result = runner.predict(volume, [TorchEngine(n, "fp32", device="cpu") for n in model.networks], mirroring=mirroring)
    assert estimate.windows == estimate.parts[0].windows == result.patches
    if case == "cropped":  # the zero border is cropped before tiling: the whole grid would need more windows
        assert window_count(runner, network_grid(runner, volume), False) > result.patches
    assert estimate.parts[0].seconds is None and "measured once the engines are ready" in estimate.text()


def test_cli_says_the_estimate_before_the_work_and_progress_names_each_part(parts, capsys):
    folders, image = parts
    result, err = _cli([*_models(folders), "--input", str(image), "--output", str(image.parent / "p.nii.gz"),
                        "--progress-lines"], capsys)
    lines = err.splitlines()
    events = [(i, parse_progress_line(line)) for i, line in enumerate(lines)]
    events = [(i, e) for i, e in events if e and e[0] != "loading"]
    estimates = [(i, parse_estimate_line(line)) for i, line in enumerate(lines) if parse_estimate_line(line)]
    # a and b share a network (one timed window says both); c's is timed when it starts, then said again
    assert len(estimates) == 2 and estimates[0][0] < events[0][0]
    first, last = estimates[0][1], estimates[-1][1]
    assert first["seconds"] is None and "+ c (timed when it starts)" in first["text"]
    assert last["seconds"] > 0 and first["text"].startswith("Expected: 3 parts, ")
    assert last["windows"] == result["patches"] == sum(p["windows"] for p in last["parts"])
    assert result["estimate"] == last and last["preprocessings"] == 2
    stages = {}
    for _, (stage, done, total) in events:
        stages[stage] = (done, total)
    windows = {p["name"]: p["windows"] for p in last["parts"]}
    for index, name in enumerate("abc", 1):
        assert stages[f"part {index}/3 ({name}): sliding window"] == (windows[name], windows[name])
        done, total = stages[f"part {index}/3 ({name}): export"]  # the grid pass, then slabs of output slices
        assert done == total >= 2
    # the volume is preprocessed once for a and b, once for c
    assert sorted(s for s in stages if s.endswith("preprocessing")) == ["part 1/3 (a): preprocessing",
                                                                         "part 3/3 (c): preprocessing"]
    # what the Slicer module shows: the estimate in the results area, one bar over all parts
    shown = support.parse_estimate(lines[estimates[0][0]])
    assert dict(support.results_rows({"estimate": shown}))["Expected"].startswith("3 parts, ")
    bar = support.RunProgress()  # a part's export reports beside the next part's window: the bar must not go back
    fractions = [p[0] for p in map(bar.update, (line for line in lines if "part " in line)) if p]
    assert np.all(np.diff(fractions) > -1e-9) and fractions[0] == 0.0 and fractions[-1] == pytest.approx(1.0)
    assert len(set(fractions)) > 2 * 3  # it moves within each part


def test_without_progress_lines_the_estimate_is_one_line_on_stderr(parts, capsys):
    folders, image = parts
    result, err = _cli([*_models(folders)[:4], "--input", str(image), "--output", str(image.parent / "q.nii.gz")],
                       capsys)
    expected = [line for line in err.splitlines() if line.startswith("Expected:")]
    assert len(expected) == 1 and expected[0] == result["estimate"]["text"]
    assert expected[0].startswith(f"Expected: 2 parts, {result['patches']} windows, network ~")
    assert "1 preprocessing for 2 parts" in expected[0] and "timed on this computer" in expected[0]


def test_shared_preprocessing_gives_each_parts_own_labels(parts, capsys, tmp_path):
    folders, image = parts
    volume = read_volume(image)
    runners = {name: runner_for(open_nnunet_model(folder)) for name, folder in folders.items()}
    assert runners["a"].preprocess_key() == runners["b"].preprocess_key() != runners["c"].preprocess_key()
    shared = runners["a"].preprocess(volume)
    model_b = open_nnunet_model(folders["b"])
    engines = [TorchEngine(n, "fp32", device="cpu") for n in model_b.networks]
    alone = runners["b"].predict(volume, engines)
    reused = runners["b"].predict(volume, engines, preprocessed=shared)
    assert np.array_equal(reused.labels, alone.labels) and len(np.unique(alone.labels)) == 3
    assert np.array_equal(shared[0], runners["b"].preprocess(volume)[0])  # read only: left as it was

    # the merged map of a shared run is the merge of nnunetv2's own predictions of each part alone
    merged_result, _ = _cli([*_models(folders), "--input", str(image), "--output", str(tmp_path / "m.nii.gz")], capsys)
    merged = read_volume(tmp_path / "m.nii.gz").array
    expected = np.zeros_like(merged)
    for offset, name in zip((0, 2, 4), "abc"):
        labels = nnunet_reference(folders[name], image, (0,))[0]
        expected[labels > 0] = labels[labels > 0] + offset
    assert np.array_equal(merged, expected)
    assert set(np.unique(merged)) >= {2, 4, 6}  # every part has voxels in the map (later parts overwrite)
    assert merged_result["estimate"]["preprocessings"] == 2


def test_estimate_speed_from_the_accuracy_guard_only_where_it_was_measured(parts, tmp_path, capsys):
    folders, image = parts
    out = tmp_path / "a-int8"
    code = main(["quantize", "--model", str(folders["a"]), "--calibration", str(image), "--out", str(out),
                 "--patches", "2", "--no-guard", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    guard = json.loads((out / "quantization.json").read_text())["folds"]["0"]["guard"]
    model, volume = open_nnunet_model(out), read_volume(image)
    runner = runner_for(model)
    int8 = estimate_run([model], [runner], volume, "openvino", "int8", False)
    assert int8.parts[0].seconds_per_window == pytest.approx(guard["steps"][-1]["int8_latency_ms"] / 1000)
    assert "accuracy guard" in int8.text() and guard["device"] in int8.text()
    assert estimate_run([model], [runner], volume, "openvino", "fp32", False).seconds is None  # INT8's speed only
    assert estimate_run([model], [runner], volume, "onnxruntime", "int8", False).seconds is None
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out, elsewhere)
    report = json.loads((elsewhere / "quantization.json").read_text())
    report["folds"]["0"]["guard"]["device"] = "another CPU"
    (elsewhere / "quantization.json").write_text(json.dumps(report))
    other = open_nnunet_model(elsewhere)
    assert estimate_run([other], [runner_for(other)], volume, "openvino", "int8", False).seconds is None

    # known before any engine is built: the first thing said after loading, then the run itself
    code = main(["segment", "--model", str(out), "--input", str(image), "--output", str(tmp_path / "o.nii.gz"),
                 "--runtime", "openvino", "--progress-lines", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.err.splitlines() if '"stage": "loading"' not in line]
    said = parse_estimate_line(lines[0])
    assert said["seconds"] == pytest.approx(int8.seconds) and said["windows"] == json.loads(captured.out)["patches"]
    assert sum(1 for line in lines if parse_estimate_line(line)) == 1


@pytest.mark.parametrize("where", ["within part 2", "between parts 1 and 2"])
def test_cancel_within_and_between_parts_leaves_nothing(parts, tmp_path, where):
    folders, image = parts
    seen, monitor = [], Monitor()

    def on_progress(stage, done, total):
        seen.append(stage)
        within = stage == "part 2/3 (b): sliding window" and done == 3
        # the main thread's last event of part 1 (its export may run beside part 2's sliding window)
        between = stage == "part 1/3 (a): sliding window" and done == total
        if within if where == "within part 2" else between:
            monitor.cancel()

    monitor.on_progress = on_progress
    output = tmp_path / "cancelled.nii.gz"
    with pytest.raises(Cancelled):
        segment([folders[n] for n in "abc"], image, output, runtime="torch", precision="fp32", monitor=monitor)
    assert not any(s.startswith("part 3/3") for s in seen)
    assert any(s.startswith("part 2/3") for s in seen) == (where == "within part 2")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_the_second_part_stops_the_cli(parts, tmp_path):
    """Step 0.1: about 1000 windows per part, so part 2 is still running when Ctrl-C comes."""
    folders, image = parts
    output = tmp_path / "labels.nii.gz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "PTQLogic", "segment", *_models(folders), "--input", str(image), "--output",
         str(output), "--runtime", "torch", "--precision", "fp32", "--step-size", "0.1", "--progress-lines"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:
        event = parse_progress_line(line)
        if (event and event[0].startswith("part 2/3")) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_slicer_segments_with_a_parts_file_and_shows_its_estimate(parts, tmp_path, capsys):
    """The Model field takes a parts file; Segment's command line runs it and says the estimate first."""
    folders, image = parts
    parts_file = tmp_path / "total.json"
    labels = {"1": "liver", "2": "spleen", "3": "kidney_right", "4": "aorta"}
    parts_file.write_text(json.dumps({"parts": [str(folders["a"]), str(folders["b"])], "labels": labels}))
    source = support.choose_model_source(parts_file)
    assert source.segmentable and source.description == "nnU-Net parts file: 2 parts (a, b), 4 labels"
    support.check_segment_model(parts_file)
    with pytest.raises(Exception, match="leave it empty"):
        support.check_segment_model(parts_file, reference=True)
    with pytest.raises(Exception, match="Quantize a model first"):
        support.check_segment_model(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"parts": ["missing"]}))
    assert not support.choose_model_source(broken).segmentable
    assert "is not an nnU-Net model folder" in support.choose_model_source(broken).description

    command = support.segment_command(sys.executable, source.path, image, tmp_path / "labels.nrrd", "torch", "fp32",
                                      False)
    assert command[3] == "segment" and main(command[3:]) == 0
    out, err = capsys.readouterr()
    said = [support.parse_estimate(line) for line in err.splitlines() if support.parse_estimate(line)]
    result = support.parse_result(out)
    assert said and said[-1] == result["estimate"] and said[0]["text"].startswith("Expected: 2 parts")
    assert dict(support.results_rows(result))["Expected"] == said[-1]["text"].removeprefix("Expected: ")
    assert set(np.unique(read_volume(result["output"]).array)) <= {0, 1, 2, 3, 4}
