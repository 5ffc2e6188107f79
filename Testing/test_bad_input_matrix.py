"""The bad-input matrix (docs/bad_inputs.md lists every case): each hostile input gives one clear
`error:` line naming what and where, a non-zero exit, nothing half-written, and inputs left
byte-identical. Cache cases assert the documented recovery instead (rebuild, one build, no stale lock)."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
from onnx import TensorProto, helper

from PTQLogic.engines.cache import EngineCache
from PTQLogic.app.cli import main
from PTQLogic.core.errors import Cancelled
from PTQLogic.core.fileio import sha256_file
from PTQLogic.core.progress import Monitor

from conftest import ROOT, SAMPLE_UNET
from test_cli_bad_inputs import assert_clean_failure, error_without_paths, run_cli


def image(path, array, spacing=(1.5, 1.5, 1.5)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


CT = np.random.default_rng(0).normal(0, 100, (40, 40, 40)).astype(np.float32)


def make_volume(case: str, folder: Path) -> Path:
    """One hostile input volume per case (file names never hold the words its error must say)."""
    if case == "truncated-nii.gz":
        return truncate(image(folder / "cut.nii.gz", CT.astype(np.int16)))
    if case == "truncated-nii":
        return truncate(image(folder / "cut.nii", CT))
    if case == "truncated-nrrd":
        return truncate(image(folder / "cut.nrrd", CT))
    if case == "truncated-mha":
        return truncate(image(folder / "cut.mha", CT))
    if case == "zero-bytes":
        (folder / "empty.nii.gz").write_bytes(b"")
        return folder / "empty.nii.gz"
    if case == "garbage-bytes":
        (folder / "noise.nrrd").write_bytes(os.urandom(4096))
        return folder / "noise.nrrd"
    if case == "nhdr-missing-data":
        image(folder / "vol.nhdr", CT)
        for raw in folder.glob("vol.raw*"):
            raw.unlink()
        return folder / "vol.nhdr"
    if case == "single-slice":
        return image(folder / "slice.nii.gz", CT[:1])
    if case == "zero-size-axis":
        return image(folder / "thin.nrrd", CT[:, :1, :1])
    if case == "inf-nifti":
        bad = CT.copy()
        bad[5, 5, 5] = np.inf
        return image(folder / "scan-a.nii.gz", bad)
    if case == "inf-nrrd":
        bad = CT.copy()
        bad[1, 2, 3] = -np.inf
        return image(folder / "scan-b.nrrd", bad)
    if case == "nan-nrrd":
        bad = CT.copy()
        bad[1, 2, 3] = np.nan
        return image(folder / "scan-c.nrrd", bad)
    if case == "constant":
        return image(folder / "scan-d.nii.gz", np.full((40, 40, 40), -1000, np.int16))
    if case == "zero-spacing":
        path = image(folder / "flat.nrrd", CT)
        text = path.read_bytes()
        head, sep, body = text.partition(b"\n\n")
        head = b"\n".join(b"space directions: (1.5,0,0) (0,0,0) (0,0,1.5)" if line.startswith(b"space directions")
                          else line for line in head.split(b"\n"))
        path.write_bytes(head + sep + body)
        return path
    if case == "extreme-spacing":
        return image(folder / "huge-spacing.nii.gz", CT, spacing=(1e4, 1e4, 1e4))
    if case == "time-series":
        series = sitk.JoinSeries([sitk.GetImageFromArray(CT[:8]) for _ in range(12)])
        sitk.WriteImage(series, str(folder / "series.nii.gz"))
        return folder / "series.nii.gz"
    if case == "empty-folder":
        (folder / "dicom").mkdir()
        return folder / "dicom"
    if case == "folder-without-dicom":
        (folder / "docs").mkdir()
        (folder / "docs" / "readme.txt").write_text("no images here")
        return folder / "docs"
    raise KeyError(case)


VOLUME_CASES = {  # case -> words the error line must contain
    "truncated-nii.gz": "truncated",
    "truncated-nii": "truncated",
    "truncated-nrrd": "truncated",
    "truncated-mha": "truncated",
    "zero-bytes": "empty file",
    "garbage-bytes": "could not read",
    "nhdr-missing-data": "could not read",
    "single-slice": "at least 2 voxels",
    "zero-size-axis": "at least 2 voxels",
    "inf-nifti": "infinite",
    "inf-nrrd": "infinite",
    "nan-nrrd": "nan",
    "constant": "constant",
    "zero-spacing": "spacing",
    "extreme-spacing": "gib",
    "time-series": "4d series",
    "empty-folder": "no dicom series",
    "folder-without-dicom": "no dicom series",
}


def snapshot_inputs(paths):
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*")))]
    return {str(p): sha256_file(p) for p in files if p.is_file()}


@pytest.mark.parametrize("case", sorted(VOLUME_CASES))
def test_segment_refuses_hostile_volume(case, quantized_unet, tmp_path_factory, tmp_path, capsys):
    source = make_volume(case, tmp_path_factory.mktemp("inputs"))
    before = snapshot_inputs([source, quantized_unet])
    code, _, err = run_cli(["segment", "--model", str(quantized_unet), "--input", str(source),
                            "--output", str(tmp_path / "out.nii.gz"), "--runtime", "onnxruntime"], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention=VOLUME_CASES[case])
    # says what is wrong in words of its own, not through the file's name or the test's folder
    assert VOLUME_CASES[case] in error_without_paths(err, tmp_path_factory.getbasetemp(), source.name)
    assert source.name in err or source.parent.name in err  # says where
    assert snapshot_inputs([source, quantized_unet]) == before


def test_volume_too_large_for_memory_is_refused_from_the_header(monkeypatch, tmp_path_factory, tmp_path, capsys):
    source = image(tmp_path_factory.mktemp("inputs") / "big.nii.gz", CT)
    monkeypatch.setenv("PTQSEG_MAX_MEMORY_GB", "0.0001")
    code, _, err = run_cli(["evaluate", "--prediction", str(source), "--reference", str(source)], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention="GiB of memory is available")
    assert "PTQSEG_MAX_MEMORY_GB" in err


def test_onnx_with_wrong_input_rank_is_refused(tmp_path_factory, tmp_path, capsys):
    folder = tmp_path_factory.mktemp("onnx")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])  # 2D network: rank 4
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 32, 32])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "net2d.onnx")
    spec = json.loads(SAMPLE_UNET.read_text())
    spec.update(architecture="onnx", weights="net2d.onnx", kwargs={})
    spec.pop("weights_format", None)
    (folder / "spec.json").write_text(json.dumps(spec))
    calibration = image(folder / "cal.nii.gz", CT)
    before = snapshot_inputs([folder])
    code, _, err = run_cli(["quantize", "--model", str(folder / "spec.json"), "--calibration", str(calibration),
                            "--out", str(tmp_path / "m"), "--patches", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention="net2d.onnx")
    assert snapshot_inputs([folder]) == before


@pytest.mark.parametrize("case, mention", [
    ("truncated-json", "spec"), ("unknown-architecture", "NotANet"), ("python-yaml", "spec"),
    ("truncated-weights", "weights"),
])
def test_quantize_refuses_hostile_specs(case, mention, tmp_path_factory, tmp_path, capsys):
    folder = tmp_path_factory.mktemp("spec")
    spec = json.loads(SAMPLE_UNET.read_text())
    weights = SAMPLE_UNET.with_name(spec["weights"])
    (folder / spec["weights"]).write_bytes(weights.read_bytes())
    path = folder / "spec.json"
    if case == "truncated-json":
        path.write_text(json.dumps(spec)[:50])
    elif case == "unknown-architecture":
        path.write_text(json.dumps({**spec, "architecture": "NotANet"}))
    elif case == "python-yaml":
        path = folder / "spec.yaml"
        path.write_text("name: !!python/object/apply:os.system ['touch pwned']\narchitecture: UNet\n")
    elif case == "truncated-weights":
        truncate(folder / spec["weights"])
        path.write_text(json.dumps(spec))
    calibration = image(folder / "cal.nii.gz", CT)
    before = snapshot_inputs([folder])
    code, _, err = run_cli(["quantize", "--model", str(path), "--calibration", str(calibration),
                            "--out", str(tmp_path / "m"), "--patches", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention=mention)
    assert snapshot_inputs([folder]) == before and not (ROOT / "pwned").exists()


@pytest.mark.parametrize("case, mention", [("bad-suffix", "must end with"), ("parent-is-file", "not a folder"),
                                           ("label-map", "--label-map"), ("reference-grid", "same voxel grid")])
def test_segment_refuses_bad_settings_before_work(case, mention, quantized_unet, phantom_files, tmp_path, capsys):
    output = tmp_path / ("labels.png" if case == "bad-suffix" else "labels.nii.gz")
    extra = []
    if case == "parent-is-file":
        (tmp_path / "file").write_text("x")
        output = tmp_path / "file" / "labels.nii.gz"
    if case == "label-map":
        extra = ["--reference", str(phantom_files["truth"]), "--label-map", "liver=5"]
    if case == "reference-grid":
        extra = ["--reference", str(image(tmp_path.parent / f"{tmp_path.name}-ref.nii.gz", np.zeros((9, 9, 9), np.uint8)))]
    code, _, err = run_cli(["segment", "--model", str(quantized_unet), "--input", str(phantom_files["image"]),
                            "--output", str(output), "--runtime", "onnxruntime", *extra], capsys)
    assert_clean_failure(code, err, tmp_path, must_mention=mention, keep={"file"})


def test_full_disk_leaves_no_partial_output(quantized_unet, phantom_files, tmp_path):
    """RLIMIT_FSIZE (no root mount needed) makes every write past 64 bytes fail like a full disk."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64)); "
            "from PTQLogic.app.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", code, "segment", "--model", str(quantized_unet), "--input",
                             str(phantom_files["image"]), "--output", str(out / "labels.nii.gz"), "--runtime",
                             "onnxruntime"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode != 0
    line, = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "labels" in line and ".partial" not in line and "disk space" in line, line
    assert list(out.iterdir()) == [] if out.exists() else True


# --- engine cache: wrong entries are rebuilt, concurrent builds are serialized, no stale locks -------

FIELDS = {"model_sha256": "ab" * 32, "precision": "int8", "runtime": "tensorrt", "runtime_version": "10.3.0",
          "device": "NVIDIA H100 sm_90", "shape_profile": {"max_batch": 4}}


def _counting_build(log: Path, delay: float = 0.0):
    def build(tmp: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(delay)
        tmp.write_bytes(b"plan-" + FIELDS["runtime_version"].encode() * 100)
    return build


@pytest.mark.parametrize("damage", ["truncated", "hash-mismatch", "other-runtime-version", "other-device",
                                    "missing-sidecar"])
def test_damaged_or_foreign_cache_entries_are_rebuilt(damage, tmp_path):
    cache, log = EngineCache(tmp_path / "cache"), tmp_path / "builds.log"
    path = cache.get_or_build(dict(FIELDS), _counting_build(log))
    good = path.read_bytes()
    sidecar = path.with_name(path.name.replace(".plan", ".fields.json"))
    if damage == "truncated":
        path.write_bytes(good[:10])
    elif damage == "hash-mismatch":
        path.write_bytes(good[::-1])
    elif damage in ("other-runtime-version", "other-device"):  # an entry copied in from elsewhere
        key = "runtime_version" if damage == "other-runtime-version" else "device"
        record = json.loads(sidecar.read_text())
        record[key] = "something else"
        sidecar.write_text(json.dumps(record))
    else:
        sidecar.unlink()
    assert cache.get_or_build(dict(FIELDS), _counting_build(log)) == path
    assert path.read_bytes() == good and len(log.read_text().split()) == 2  # rebuilt once, then whole again
    assert cache.get_or_build(dict(FIELDS), _counting_build(log)) == path and len(log.read_text().split()) == 2


def _build_in_process(root: str, log: str) -> None:
    EngineCache(root).get_or_build(dict(FIELDS), _counting_build(Path(log), delay=1.0))


def test_two_processes_building_the_same_engine_build_it_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_build_in_process, args=(str(tmp_path / "cache"), str(tmp_path / "log")))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert len((tmp_path / "log").read_text().split()) == 1
    assert not list((tmp_path / "cache").glob("*.lock")) and not list((tmp_path / "cache").glob(".*partial*"))


def _build_until_killed(root: str, log: str) -> None:
    """A build that writes half an engine, says so in ``log`` (its pid), then waits to be killed."""
    def build(tmp: Path) -> None:
        tmp.write_bytes(b"half a plan")
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(600)

    EngineCache(root).get_or_build(dict(FIELDS), build)


def test_a_builder_killed_mid_build_leaves_no_stale_lock_or_partial_engine(tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "log"
    code = ("import sys; sys.path.insert(0, 'Testing'); from test_bad_input_matrix import _build_until_killed; "
            f"_build_until_killed({str(cache)!r}, {str(log)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not (log.is_file() and log.read_text().endswith("\n")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        # the build really is under way: this process wrote its line, holds the lock and a partial engine, and lives
        assert log.is_file() and proc.poll() is None, f"the build never started (exit code {proc.poll()})"
        assert log.read_text().split() == [str(proc.pid)]
        assert list(cache.glob("*.plan.lock"))
        assert [p.read_bytes() for p in cache.glob(".*partial*")] == [b"half a plan"]
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait(60) == -signal.SIGKILL
    assert not [p for p in cache.glob("*.plan") if not p.name.startswith(".")]
    started = time.time()
    path = EngineCache(cache).get_or_build(dict(FIELDS), _counting_build(log))
    assert time.time() - started < 30  # the dead process's lock did not block
    assert len(log.read_text().split()) == 2 and path.read_bytes().startswith(b"plan-")  # built again, whole
    assert not list(cache.glob("*.lock")) and not list(cache.glob(".*partial*"))


# --- cancellation during calibration, engine build and inference -----------------------------------

class CancelAt(Monitor):
    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def update(self, stage, done, total):
        if self.stage in stage:
            raise Cancelled("Cancelled.")
        return super().update(stage, done, total)


def test_cancel_during_calibration_leaves_no_model_folder(phantom_files, tmp_path):
    from PTQLogic.pipeline import quantize_model

    before = snapshot_inputs(list(phantom_files["calibration"]))
    with pytest.raises(Cancelled):
        quantize_model(SAMPLE_UNET, phantom_files["calibration"], tmp_path / "m", num_patches=2,
                       monitor=CancelAt("calib"))
    assert list(tmp_path.iterdir()) == []
    assert snapshot_inputs(list(phantom_files["calibration"])) == before


def test_cancel_during_engine_build_leaves_no_partial_engine_or_lock(tmp_path):
    cache = EngineCache(tmp_path / "cache")

    def build(tmp: Path) -> None:
        tmp.write_bytes(b"half a plan")
        raise Cancelled("Cancelled.")

    with pytest.raises(Cancelled):
        cache.get_or_build(dict(FIELDS), build)
    assert list((tmp_path / "cache").iterdir()) == []


def test_cancel_during_inference_leaves_no_output(quantized_unet, phantom_files, tmp_path):
    from PTQLogic.pipeline import segment

    with pytest.raises(Cancelled):
        segment(quantized_unet, phantom_files["image"], tmp_path / "labels.nii.gz", runtime="onnxruntime",
                monitor=CancelAt("sliding"))
    assert list(tmp_path.iterdir()) == []
