"""What a new user hit (issue 24, items 9, 10, 12-15): reference pairing by name in every command, FP32 from a
model as it is, unreadable files said as such, label maps refused as input, OpenVINO cache files, help nits."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from PTQLogic.app.cli import batch_summary_text, main
from PTQLogic.evaluation.metrics import compare_label_maps

from conftest import ROOT, SAMPLE_UNET, SHARED_DATA

TS_LABELS = SHARED_DATA / "totalsegmentator_total_labels.json"
# the sample UNet's classes by their TotalSegmentator values; its 'vertebra' has no TotalSegmentator name
TS_VALUES = {1: 5, 2: 1, 3: 2, 4: 3, 5: 52, 6: 200}


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def small_phantom(phantom_files, tmp_path_factory):
    """The held-out phantom, its truth, and the truth numbered like a TotalSegmentator map."""
    from PTQLogic.core.volume import Volume
    from PTQLogic.io.volumes import read_volume, write_labelmap

    labels = read_volume(phantom_files["truth"])
    relabeled = np.zeros_like(labels.array)
    for value, ts_value in TS_VALUES.items():
        relabeled[labels.array == value] = ts_value
    ts_truth = tmp_path_factory.mktemp("ts") / "ts_truth.nii.gz"
    write_labelmap(Volume(array=relabeled.astype(np.uint8), ijk_to_ras=labels.ijk_to_ras), ts_truth, None)
    return {"image": phantom_files["image"], "truth": phantom_files["truth"], "ts_truth": ts_truth}


# --- 9: classes paired with differently named labels ------------------------------------------------------

def test_value_pairing_with_another_name_is_said():
    pred = np.zeros((4, 4, 4), np.int64)
    pred[0], pred[1] = 1, 2
    ref = pred.copy()
    result = compare_label_maps(pred, ref, pred_names={1: "aorta", 2: "liver"}, ref_names={1: "lung_upper_lobe_left",
                                                                                          3: "liver"})
    assert result.pairs == {1: 1, 2: 3}
    assert any("class 1 (aorta)" in w and "lung_upper_lobe_left" in w and "--label-map 1=REF" in w
               for w in result.warnings), result.warnings
    explicit = compare_label_maps(pred, ref, pred_names={1: "aorta", 2: "liver"}, ref_names={1: "lung", 3: "liver"},
                                  label_map={1: 1})
    assert not any("class 1" in w for w in explicit.warnings)  # asked for: no warning


def test_reference_without_names_holding_other_values_warns_about_value_pairing():
    pred = np.zeros((4, 4, 4), np.int64)
    pred[0] = 1
    ref = pred.copy()
    ref[3] = 52
    warnings = compare_label_maps(pred, ref, pred_names={1: "aorta"}).warnings
    assert any("paired with reference labels by value" in w and "--reference-labels" in w for w in warnings), warnings
    same = compare_label_maps(pred, pred.copy(), pred_names={1: "aorta"}).warnings
    assert not same  # the same label set: value pairing is what is meant


def test_segment_pairs_by_name_with_reference_labels(small_phantom, tmp_path, capsys):
    if not TS_LABELS.is_file():
        pytest.skip(f"{TS_LABELS} not found")
    common = ["segment", "--model", SAMPLE_UNET, "--input", small_phantom["image"], "--precision", "fp32", "--json"]
    code, out, err = run([*common, "--output", tmp_path / "a.nii.gz", "--reference", small_phantom["truth"]], capsys)
    assert code == 0, err
    truth_dice = json.loads(out)["reference_per_class"]
    code, out, err = run([*common, "--output", tmp_path / "b.nii.gz", "--reference", small_phantom["ts_truth"]], capsys)
    assert code == 0, err
    assert "paired with reference labels by value" in err and "--reference-labels" in err
    assert json.loads(out)["reference_dice"] < 0.5
    code, out, err = run([*common, "--output", tmp_path / "c.nii.gz", "--reference", small_phantom["ts_truth"],
                          "--reference-labels", TS_LABELS], capsys)
    assert code == 0, err
    by_name = json.loads(out)["reference_per_class"]
    for name in ("1 liver", "2 spleen", "3 kidney_right", "4 kidney_left", "5 aorta"):
        assert by_name[name] == pytest.approx(truth_dice[name], abs=1e-12)
    assert "class 6 (vertebra) has no reference label of that name" in err and "6 (stomach)" in err


def test_benchmark_takes_the_same_pairing_options(quantized_unet, small_phantom, tmp_path, capsys):
    if not TS_LABELS.is_file():
        pytest.skip(f"{TS_LABELS} not found")
    common = ["benchmark", "--model", quantized_unet, "--input", small_phantom["image"], "--runtimes", "onnxruntime",
              "--precisions", "fp32", "--repeats", "1", "--warmup", "0", "--json"]
    code, out, err = run([*common, "--out", tmp_path / "truth", "--reference", small_phantom["truth"]], capsys)
    assert code == 0, err
    truth_dice = json.loads(out)["rows"][0]["dice"]
    code, out, err = run([*common, "--out", tmp_path / "named", "--reference", small_phantom["ts_truth"],
                          "--reference-labels", TS_LABELS, "--label-map", "6=200"], capsys)
    assert code == 0, err
    assert json.loads(out)["rows"][0]["dice"] == pytest.approx(truth_dice, abs=1e-12)
    code, out, err = run([*common, "--out", tmp_path / "values", "--reference", small_phantom["ts_truth"]], capsys)
    assert code == 0 and "paired with reference labels by value" in err
    assert json.loads(out)["rows"][0]["dice"] < 0.5


# --- 10: FP32 from a model as it is ---------------------------------------------------------------------------

def test_segment_runs_a_spec_in_fp32_without_quantizing(small_phantom, tmp_path, capsys):
    out = tmp_path / "fp32.nii.gz"
    code, stdout, err = run(["segment", "--model", SAMPLE_UNET, "--input", small_phantom["image"], "--output", out,
                             "--precision", "fp32", "--reference", small_phantom["truth"], "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["runtime"] == "torch" and result["precision"] == "fp32" and result["reference_dice"] > 0.9
    assert out.is_file()


@pytest.mark.parametrize("extra, said", [
    ([], "quantize it first: ptqseg quantize --model"),
    (["--precision", "int8"], "quantize it first: ptqseg quantize --model"),
    (["--precision", "fp32", "--runtime", "openvino"], "--runtime torch"),
])
def test_unquantized_model_refuses_what_it_cannot_run(extra, said, small_phantom, tmp_path, capsys):
    code, _, err = run(["segment", "--model", SAMPLE_UNET, "--input", small_phantom["image"], "--output",
                        tmp_path / "x.nii.gz", *extra], capsys)
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


# --- 12: unreadable model folder and input ------------------------------------------------------------------

def _run_unprivileged(args: list) -> subprocess.CompletedProcess:
    """``ptqseg ARGS`` where permission bits apply: as root, without the capabilities that bypass them."""
    command = [sys.executable, "-m", "PTQLogic", *map(str, args)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        probe = setpriv and subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", "true"],
                                           capture_output=True).returncode == 0
        if not probe:
            pytest.skip("running as root without setpriv able to drop CAP_DAC_OVERRIDE: permission bits do not apply")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_unreadable_model_folder_and_input_say_permission_denied(quantized_unet, small_phantom, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(quantized_unet, model)
    image = tmp_path / "image.nii.gz"
    shutil.copyfile(small_phantom["image"], image)
    model.chmod(0)
    try:
        result = _run_unprivileged(["segment", "--model", model, "--input", image, "--output", tmp_path / "a.nii.gz"])
        assert result.returncode == 2, result.stderr
        assert "cannot read model" in result.stderr.lower() and "permission denied" in result.stderr
        assert "nnunet_model.json" not in result.stderr and "unexpected" not in result.stderr
    finally:
        model.chmod(0o755)
    (model / "int8.onnx").chmod(0)
    image.chmod(0)
    result = _run_unprivileged(["build", "--model", model, "--runtime", "onnxruntime"])
    assert result.returncode == 2 and "Cannot read model '" in result.stderr and "int8.onnx': permission denied" in result.stderr
    (model / "int8.onnx").chmod(0o644)
    result = _run_unprivileged(["segment", "--model", model, "--input", image, "--output", tmp_path / "b.nii.gz"])
    assert result.returncode == 2, result.stderr
    assert f"Cannot read input '{image}': permission denied" in result.stderr
    assert "does not exist" not in result.stderr and "damaged" not in result.stderr


# --- 13: label map as input, one error line for a non-DICOM folder, guard options, demo note -----------------

def test_label_map_as_input_is_refused(small_phantom, tmp_path, capsys):
    code, _, err = run(["segment", "--model", SAMPLE_UNET, "--input", small_phantom["truth"], "--output",
                        tmp_path / "x.nii.gz", "--precision", "fp32"], capsys)
    assert code == 2 and "looks like a label map" in err and "--reference" in err, err
    assert "warning" not in err and not any(tmp_path.iterdir())


def test_folder_without_dicom_gives_one_error_line(tmp_path):
    folder = tmp_path / "not-dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    result = subprocess.run([sys.executable, "-m", "PTQLogic", "segment", "--model", str(SAMPLE_UNET), "--input",
                             str(folder), "--output", str(tmp_path / "x.nii.gz"), "--precision", "fp32"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if line.startswith("error: ")], result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "No Series" not in result.stderr


def test_min_agreement_and_max_dice_drop_exclude_each_other(tmp_path, capsys):
    code, _, err = run(["quantize", "--model", SAMPLE_UNET, "--calibration", tmp_path, "--out", tmp_path / "m",
                        "--min-agreement", "0.9", "--max-dice-drop", "0.05"], capsys)
    assert code == 2 and "not allowed with" in err and "usage: ptqseg quantize" in err


def test_demo_gives_the_no_vnni_note_segment_gives(monkeypatch):
    from PTQLogic.app.demo import _int8_notes, format_demo
    from PTQLogic.core.sysinfo import cpu_int8_note

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a CPU without int8 dot-product instructions
    note = cpu_int8_note()
    assert note
    rows = [{"precision": "fp32", "device": "CPU"}, {"precision": "int8", "device": "CPU", "error": None}]
    result = {"markdown": "| table |", "quantize_seconds": 1.0, "qdq_ok": True, "placement": {},
              "output_dir": "out", "notes": _int8_notes(rows)}
    assert f"note: {note}" in format_demo(result)
    assert _int8_notes([{"precision": "int8", "device": "GPU 0 (H200)", "error": None}]) == []


# --- 14: OpenVINO cache files --------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_openvino_cache_blobs_follow_the_umask_and_leave_no_lock(umask, tmp_path):
    pytest.importorskip("openvino")
    import torch

    from PTQLogic.engines.openvino_engine import OpenVINOEngine

    path = tmp_path / "net.onnx"
    torch.onnx.export(torch.nn.Conv3d(1, 2, 3, padding=1).eval(), torch.zeros(1, 1, 8, 8, 8), str(path),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)
    cache = tmp_path / "cache"
    old = os.umask(umask)
    try:
        OpenVINOEngine(path, "fp32", cache_dir=cache, patch_size=(8, 8, 8))
    finally:
        os.umask(old)
    blobs = list(cache.glob("*.blob"))
    assert blobs
    assert {stat.S_IMODE(blob.stat().st_mode) for blob in blobs} == {0o666 & ~umask}
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".blob")] == []


def test_file_lock_excludes_and_leaves_no_file(tmp_path):
    from PTQLogic.engines.cache import file_lock

    lock = tmp_path / "x.lock"
    inside, most = [0], [0]
    guard = threading.Lock()

    def work():
        for _ in range(5):
            with file_lock(lock):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.002)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and not lock.exists()


# --- 15: help and messages -------------------------------------------------------------------------------------

def test_help_names_every_command_and_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "segment-batch" in capsys.readouterr().out.split("\n\n")[1]
    for command in ("evaluate", "info"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--cache-dir" not in text and "--cpu-float" not in text
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = capsys.readouterr().out
    assert "--cache-dir" in text and "--reference-labels" in text
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "calibration patch sampling seed (default: 0)" in " ".join(capsys.readouterr().out.split())


def test_unknown_option_shows_the_commands_usage(capsys):
    code, _, err = run(["segment", "--model", "m", "--input", "i", "--output", "o.nii.gz", "--bogus"], capsys)
    assert code == 2 and err.startswith("usage: ptqseg segment") and "unrecognized arguments: --bogus" in err


def test_one_worker_is_singular():
    from PTQLogic.cohort.runner import CohortSummary

    one = CohortSummary(1, 1, 0, 0, 2.0, 1.0, 1.0, 1, "out", "out/manifest.jsonl", {})
    assert "on 1 worker)" in batch_summary_text(one)
    assert "on 2 workers)" in batch_summary_text(CohortSummary(2, 2, 0, 0, 2.0, 1.0, 1.0, 2, "o", "m", {}))


@pytest.mark.parametrize("command", [["segment", "--input", "in.nii.gz", "--output", "o.nii.gz"], ["build"],
                                     ["benchmark", "--input", "in.nii.gz", "--out", "o"]])
def test_missing_model_is_said_to_not_exist(command, tmp_path, capsys):
    code, _, err = run([command[0], "--model", tmp_path / "nope", *command[1:]], capsys)
    assert code == 2 and "does not exist" in err and "not a quantized model folder" not in err, err


def test_info_lists_only_what_can_run_here(capsys):
    code, out, err = run(["info"], capsys)
    assert code == 0, err
    assert "AzureExecutionProvider" not in out
    info = json.loads(run(["info", "--json"], capsys)[1])
    trt = info["versions"]["tensorrt"]
    if not info["gpus"] and isinstance(trt, dict) and "installed" not in trt["missing"]:
        assert not any(line.startswith("tensorrt") for line in out.splitlines())
