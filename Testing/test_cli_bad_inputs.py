"""The bad-input matrix: each gives one clear error line, a non-zero exit, no output, untouched inputs."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from PTQLogic.app.cli import main
from PTQLogic.core.fileio import sha256_file

from conftest import ROOT, SAMPLE_UNET


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, tmp_path, *, must_mention, keep=()):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert must_mention.lower() in lines[0].lower(), lines[0]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in keep]
    assert leftovers == [], leftovers


def error_without_paths(err, *places):
    """The one `error:` line with every path under ``places`` (folders or file names) cut out, lowercased:
    what the message says, whatever the files are called."""
    line, = [line for line in err.splitlines() if line.startswith("error:")]
    for place in places:
        line = re.sub(re.escape(str(place)) + r"[^\s'\"]*", "<path>", line)
    return line.lower()


def write_image(path, array, spacing=(1.5, 1.5, 1.5), vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture()
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 100, (40, 40, 40)).astype(np.float32)
    files = {
        "ok": write_image(folder / "ok.nii.gz", ct),
        "2d": write_image(folder / "slice.nii.gz", ct[0], spacing=(1.5, 1.5)),
        "4d": write_image(folder / "pair.nrrd", np.stack([ct, ct], -1), vector=True),
        "text": folder / "notes.nii.gz",
    }
    files["text"].write_text("this is not an image")
    nan = ct.copy()
    nan[3, 4, 5] = np.nan
    files["nan"] = write_image(folder / "scan.nii.gz", nan)  # names that do not hold the words looked for
    return files


@pytest.mark.parametrize(
    "case, mention",
    [("missing", "does not exist"), ("text", "notes.nii.gz"), ("2d", "3D"), ("4d", "channel"), ("nan", "NaN")],
)
def test_segment_rejects_bad_volumes(case, mention, inputs, quantized_unet, tmp_path, capsys):
    source = inputs.get(case, tmp_path.parent / "missing.nii.gz")
    before = sha256_file(source) if source.exists() else None
    code, _, err = run_cli(["segment", "--model", str(quantized_unet), "--input", str(source),
                            "--output", str(tmp_path / "out.nii.gz"), "--runtime", "onnxruntime"], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention=mention)
    if case != "text":  # the others say what is wrong, not only which file
        assert mention.lower() in error_without_paths(err, tmp_path.parent, source.name)
    if before:
        assert sha256_file(source) == before


def test_segment_refuses_to_overwrite_its_input(inputs, quantized_unet, tmp_path, capsys):
    target = tmp_path / "in.nii.gz"
    shutil.copy(inputs["ok"], target)
    before = sha256_file(target)
    code, _, err = run_cli(["segment", "--model", str(quantized_unet), "--input", str(target),
                            "--output", str(target)], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention="input", keep={"in.nii.gz"})
    assert sha256_file(target) == before


def test_segment_rejects_non_model_folder(inputs, tmp_path, capsys):
    code, _, err = run_cli(["segment", "--model", str(tmp_path), "--input", str(inputs["ok"]),
                            "--output", str(tmp_path / "o.nii.gz")], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention="ptqseg quantize")


def _spec_with(tmp_path, **changes):
    spec = json.loads(SAMPLE_UNET.read_text())
    spec.update(changes)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    "case, mention",
    [
        ("corrupt_checkpoint", "weights"),
        ("corrupt_onnx", "onnx"),
        ("unknown_architecture", "NotANet"),
        ("wrong_keys", "missing"),
    ],
)
def test_quantize_rejects_bad_models(case, mention, inputs, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    if case == "corrupt_checkpoint":
        (models / "w.pt").write_bytes(np.random.default_rng(1).bytes(5000))
        spec = _spec_with(models, weights="w.pt")
    elif case == "corrupt_onnx":
        (models / "m.onnx").write_bytes(b"\x08\x07garbage" * 100)
        spec = _spec_with(models, architecture="onnx", weights="m.onnx", weights_format="onnx", kwargs={})
    elif case == "unknown_architecture":
        spec = _spec_with(models, architecture="NotANet", weights=str(SAMPLE_UNET.with_suffix(".pt")))
    else:
        import torch

        torch.save({"conv.weight": torch.zeros(1)}, models / "w.pt")
        spec = _spec_with(models, weights="w.pt")
    before = {p.name: sha256_file(p) for p in models.iterdir()}
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", "--model", str(spec), "--calibration", str(inputs["ok"]),
                            "--out", str(out), "--patches", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention=mention, keep={"models"})
    assert {p.name: sha256_file(p) for p in models.iterdir()} == before


def test_quantize_rejects_empty_calibration_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["quantize", "--model", str(SAMPLE_UNET), "--calibration", str(empty),
                            "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention="empty", keep={"empty"})


def test_console_entry_point_reports_errors(tmp_path):
    """The real process: one error line on stderr, exit code 2, with --json one JSON error object on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "PTQLogic", "segment", "--model", str(tmp_path), "--input", "nope.nii.gz",
         "--output", str(tmp_path / "o.nii.gz"), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"error": proc.stderr.strip()[len("error: "):], "exit_code": 2}
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_quantize_never_replaces_a_folder_with_other_files(inputs, tmp_path, capsys):
    """--out on a user's folder must not wipe it (only an earlier model folder is replaced)."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    shutil.copy(inputs["ok"], user / "ct.nii.gz")
    before = {p.name: sha256_file(p) for p in user.iterdir()}
    for out, mention in ((user, "already holds other files"), (tmp_path, "already holds other files")):
        code, _, err = run_cli(["quantize", "--model", str(SAMPLE_UNET), "--calibration", str(user / "ct.nii.gz"),
                                "--out", str(out), "--patches", "2"], capsys)
        assert code != 0 and mention in err
    assert {p.name: sha256_file(p) for p in user.iterdir()} == before


def test_quantize_rejects_negative_seed_before_work(inputs, tmp_path, capsys):
    code, _, err = run_cli(["quantize", "--model", str(SAMPLE_UNET), "--calibration", str(inputs["ok"]),
                            "--out", str(tmp_path / "out"), "--seed", "-1"], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention="seed")


def test_evaluate_refuses_labels_on_another_grid(tmp_path, capsys):
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2:5, 3:6, 4:8] = 1
    a = write_image(tmp_path / "a.nii.gz", labels)
    b = write_image(tmp_path / "b.nii.gz", labels, spacing=(1.5, 1.5, 3.0))
    code, out, _ = run_cli(["evaluate", "--prediction", str(a), "--reference", str(a), "--json"], capsys)
    assert code == 0 and json.loads(out)["mean"] == 1.0
    code, _, err = run_cli(["evaluate", "--prediction", str(a), "--reference", str(b)], capsys)
    assert code != 0 and "same voxel grid" in err
