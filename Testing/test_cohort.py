"""segment-batch on a real local Ray cluster (one per module): workers, a killed worker, resume, a corrupt volume."""
from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from PTQLogic.cohort import run_cohort  # noqa: E402
from PTQLogic.cohort.cluster import connect  # noqa: E402
from PTQLogic.core.errors import Cancelled, InputError  # noqa: E402
from PTQLogic.core.progress import Monitor  # noqa: E402

from dicom_series import write_dicom_series  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    started = connect(None, cpus=2, gpus=0)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[Path]:
    from PTQLogic.samples.phantom import make_phantom, _write_image

    folder = tmp_path_factory.mktemp("cohort")
    paths = []
    for seed in range(4):
        image, _ = make_phantom(300 + seed, shape=(40, 48, 44))
        paths.append(folder / f"case{seed}.nii.gz")
        _write_image(image, paths[-1])
    return paths


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _no_partials(out: Path) -> None:
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]


def test_two_workers_corrupt_volume_then_rerun(cluster, volumes, quantized_unet, tmp_path):
    from PTQLogic.io.volumes import read_volume
    from PTQLogic.inference.segmenter import segment_volume
    from PTQLogic.engines.open import open_engine
    from PTQLogic.models.model_folder import open_model_dir

    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in volumes:
        shutil.copy(path, inputs / path.name)
    (inputs / "broken.nii.gz").write_bytes(b"not a NIfTI volume at all" * 10)
    out = tmp_path / "out"
    summary = run_cohort(quantized_unet, [inputs], out, workers=2)
    assert (summary.total, summary.done, summary.failed) == (5, 4, 1)
    rows = {Path(r["input"]).name: r for r in _rows(out)}
    assert sorted(rows) == sorted([p.name for p in volumes] + ["broken.nii.gz"])
    broken = rows.pop("broken.nii.gz")
    assert broken["status"] == "error" and broken["output"] is None and "Could not read 'broken.nii.gz'" in broken["error"]
    assert not (out / "broken_labels.nii.gz").exists()
    assert all(r["status"] == "done" and r["error"] is None and r["precision"] == "int8" for r in rows.values())
    assert len({r["worker_pid"] for r in rows.values()}) == 2  # both workers took volumes
    # the cohort's label map is what segmenting the volume in this process gives (same runtime; INT8 kernels
    # may round differently with another thread count, so a few boundary voxels may differ)
    row = rows[volumes[0].name]
    model_dir = open_model_dir(quantized_unet)
    engine, _ = open_engine(model_dir, row["runtime"], "int8", threads=1)
    expected = segment_volume(read_volume(row["input"]), model_dir.spec(), engine).labels
    got = read_volume(row["output"])
    assert got.same_grid(expected) and np.mean(got.array == expected.array) > 0.999 and got.array.max() > 0

    # a rerun skips what is done, segments a changed input again and retries the failure
    shutil.copy(volumes[1], inputs / volumes[0].name)
    again = run_cohort(quantized_unet, [inputs], out, workers=2)
    assert (again.done, again.skipped, again.failed) == (1, 3, 1)
    rows = {Path(r["input"]).name: r for r in _rows(out)}
    assert len(rows) == 5 and rows[volumes[0].name]["sha256"] == rows[volumes[1].name]["sha256"]
    _no_partials(out)


def test_workers_get_their_threads_and_own_cpus(cluster, volumes, quantized_unet, tmp_path):
    """Each worker runs its engine on threads_per_worker threads; on a local cluster on CPUs of its own."""
    from PTQLogic.cohort.runner import worker_cpu_sets
    from PTQLogic.cohort.worker import _cpu_list

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    assert worker_cpu_sets(2, 1) == [[cpus[0]], [cpus[1]]]
    assert worker_cpu_sets(len(cpus) + 1, 1) == [None] * (len(cpus) + 1)  # more than fit: not pinned
    summary = run_cohort(quantized_unet, volumes, tmp_path / "pinned", workers=2, threads_per_worker=1)
    rows = _rows(tmp_path / "pinned")
    assert summary.done == len(volumes) and {r["threads"] for r in rows} == {1}
    by_worker = {r["worker_pid"]: r["cpus"] for r in rows}
    assert sorted(by_worker.values()) == sorted([str(cpus[0]), str(cpus[1])])  # one CPU each, not the same one
    run_cohort(quantized_unet, volumes[:1], tmp_path / "shared", workers=1, threads_per_worker=2, pin_cpus=False)
    row, = _rows(tmp_path / "shared")
    assert row["threads"] == 2 and row["cpus"] == _cpu_list() and row["status"] == "done"


def test_killed_worker_loses_only_its_volume(cluster, volumes, quantized_unet, tmp_path):
    killed: list[int] = []

    def kill_first(path: Path, pid: int) -> None:
        if not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    out = tmp_path / "out"
    summary = run_cohort(quantized_unet, volumes, out, workers=2, on_dispatch=kill_first)
    rows = _rows(out)
    assert summary.done == 4 and summary.failed == 0
    assert sorted(r["input"] for r in rows) == sorted(str(p) for p in volumes)  # each volume exactly once
    assert all(r["status"] == "done" and Path(r["output"]).is_file() for r in rows)
    assert max(r["attempts"] for r in rows) == 2  # the killed worker's volume was retried
    assert killed[0] not in {r["worker_pid"] for r in rows}
    _no_partials(out)


def test_workers_that_cannot_open_the_engine_fail_clearly(cluster, volumes, quantized_unet, tmp_path):
    from PTQLogic.core.errors import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="(?i)tensorrt"):
        run_cohort(quantized_unet, volumes[:1], tmp_path / "out", workers=2, runtime="tensorrt")
    assert not (tmp_path / "out").exists()  # no label tables, no empty folder (the next test reuses the CPUs)


def test_resume_after_interruption(cluster, volumes, quantized_unet, tmp_path):
    monitor = Monitor()

    def stop_after_first(stage: str, done: int, total: int) -> None:
        if stage == "volumes" and done >= 1:
            monitor.cancel()

    monitor.on_progress = stop_after_first
    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        run_cohort(quantized_unet, volumes, out, workers=2, monitor=monitor)
    first = _rows(out)
    assert 1 <= len(first) < len(volumes)
    written = sorted(p.name for p in out.glob("*_labels.nii.gz"))
    assert written == sorted(Path(r["output"]).name for r in first)  # no label map without its manifest row
    _no_partials(out)
    summary = run_cohort(quantized_unet, volumes, out, workers=2)
    assert (summary.skipped, summary.done) == (len(first), len(volumes) - len(first))
    assert sorted(r["input"] for r in _rows(out)) == sorted(str(p) for p in volumes)
    # a finished cohort rerun answers from the manifest: no cluster work, no workers started
    import PTQLogic.cohort.runner as runner

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(runner, "_start_workers", lambda *a, **k: pytest.fail("workers started for nothing"))
    try:
        again = run_cohort(quantized_unet, volumes, out, workers=2)
    finally:
        monkeypatch.undo()
    assert (again.skipped, again.done, again.failed) == (len(volumes), 0, 0)


def test_interrupted_run_leaves_no_worker_files(cluster, volumes, quantized_unet, tmp_path, monkeypatch):
    """Workers killed on Ctrl-C cannot clean up: their model copies and volumes live in a folder the driver removes."""
    import tempfile

    from PTQLogic.cohort import scratch

    made: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):  # the real mkdtemp, remembering the run's scratch folder
        made.append(Path(real_mkdtemp(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(scratch.tempfile, "mkdtemp", mkdtemp)
    seen: list[str] = []

    def interrupt(_input, _pid):
        seen.extend(sorted(p.name.split("-")[1] if "-" in p.name else p.name for p in made[0].iterdir()))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cohort(quantized_unet, volumes, tmp_path / "out", workers=1, on_dispatch=interrupt)
    assert made and made[0].name.startswith(f"ptqseg-batch-{os.getpid()}-")  # a later run knows whose it is
    assert seen == ["model", "volumes", "worker"]  # the model the workers copy, and the worker's own files
    assert not made[0].exists()
    _no_partials(tmp_path / "out")


def test_bad_inputs_fail_before_any_work(quantized_unet, tmp_path):
    listing = tmp_path / "cohort.txt"
    listing.write_text("missing.nii.gz\n")
    with pytest.raises(InputError, match="missing.nii.gz"):
        run_cohort(quantized_unet, [listing], tmp_path / "out")
    with pytest.raises(InputError, match="also the input folder"):
        run_cohort(quantized_unet, [tmp_path], tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "PTQLogic.app.cli", "segment-batch", "--model", str(quantized_unet),
         "--inputs", str(listing), "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().startswith("error:") and "missing.nii.gz" in result.stderr
    assert not (tmp_path / "out").exists()


def test_inputs_from_lists_and_repeated_names(tmp_path):
    from PTQLogic.cohort import collect_inputs

    for patient in ("p1", "p2"):
        (tmp_path / patient).mkdir()
        (tmp_path / patient / "ct.nii.gz").write_bytes(b"x")
    listing = tmp_path / "cohort.txt"
    listing.write_text("# two patients\np1/ct.nii.gz\n\np2/ct.nii.gz\np1/ct.nii.gz\n")
    items = collect_inputs([listing], tmp_path / "out")
    assert [i.input for i in items] == [(tmp_path / p / "ct.nii.gz").resolve() for p in ("p1", "p2")]
    assert [i.output.name for i in items] == ["p1__ct_labels.nii.gz", "p2__ct_labels.nii.gz"]
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(InputError, match="is not a volume"):
        collect_inputs([tmp_path / "notes.json"], tmp_path / "out")


def test_linked_inputs_keep_their_own_names(tmp_path):
    """git-annex/DVC/nnU-Net raw folders hold links to hashed files: label maps are named after the links."""
    from PTQLogic.cohort import collect_inputs

    store, cohort = tmp_path / "objects", tmp_path / "cohort"
    store.mkdir(), cohort.mkdir()
    (store / "SHA256E-s1--3f2a.nii.gz").write_bytes(b"x")
    (cohort / "case_001.nii.gz").symlink_to(store / "SHA256E-s1--3f2a.nii.gz")
    items = collect_inputs([cohort, cohort / "case_001.nii.gz"], tmp_path / "out")  # the same file twice
    assert [i.input for i in items] == [cohort / "case_001.nii.gz"]
    assert [i.output.name for i in items] == ["case_001_labels.nii.gz"]


def test_broken_manifest_is_refused(tmp_path):
    from PTQLogic.cohort import Manifest

    (tmp_path / "manifest.jsonl").write_text('{"input": "a"}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        Manifest(tmp_path)


def test_torch_compile_workers(quantized_unet, volumes, tmp_path):
    """--torch-compile: refused for other runtimes before any cluster starts; a torch worker compiles its
    network once, at start-up (the warm-up window), not on its first volume."""
    from PTQLogic.cohort.worker import VolumeWorker, pack_model_dir

    with pytest.raises(InputError, match="--runtime torch"):
        run_cohort(quantized_unet, volumes, tmp_path / "out", runtime="openvino", torch_compile="default")
    assert not (tmp_path / "out").exists()
    worker = VolumeWorker(pack_model_dir(quantized_unet), "torch", "fp32", None, 1, str(tmp_path), None,
                          torch_compile="default")
    assert worker.engine.compile_mode == "default" and worker.engine.compile_seconds is not None


def test_torch_runtime_runs_fp32_by_default_and_refuses_int8_before_ray(cluster, volumes, quantized_unet, tmp_path):
    """segment-batch --runtime torch without --precision runs FP32, as its help says; with int8 it fails before
    any cluster or output exists (it used to start Ray, fail late and leave labels.nii.gz.labels.json)."""
    import PTQLogic.cohort.runner as runner

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(runner, "connect", lambda *a, **k: pytest.fail("Ray was started for a refused run"))
    try:
        with pytest.raises(InputError, match="--runtime torch cannot run int8"):
            run_cohort(quantized_unet, volumes[:1], tmp_path / "refused", runtime="torch", precision="int8")
    finally:
        monkeypatch.undo()
    assert not (tmp_path / "refused").exists()
    summary = run_cohort(quantized_unet, volumes[:1], tmp_path / "out", workers=1, runtime="torch")
    row, = _rows(tmp_path / "out")
    assert summary.done == 1 and (row["runtime"], row["precision"], row["status"]) == ("torch", "fp32", "done")


def test_dicom_folders_are_volumes(cluster, quantized_unet, tmp_path):
    """A folder of DICOM-series folders (and a DICOM folder itself, or one in a list) is a cohort, as
    `segment --input FOLDER` takes one series: its label map equals that of the same voxels as NIfTI."""
    import SimpleITK as sitk

    from PTQLogic.cohort import collect_inputs
    from PTQLogic.io.volumes import read_volume
    from PTQLogic.samples.phantom import make_phantom

    image, _ = make_phantom(77, shape=(40, 48, 44))
    cohort = tmp_path / "cohort"
    write_dicom_series(image.array, cohort / "patient1", "1.2.3.4", spacing=(1.5, 1.5, 1.5))
    series = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(cohort / "patient1"))
    sitk.WriteImage(sitk.ReadImage(list(series)), str(cohort / "patient2.nii.gz"))  # the same voxels and grid
    for uid in ("1.2.3.5", "1.2.3.6"):  # two series in one folder: which one is meant is not known
        write_dicom_series(image.array[:4], tmp_path / "two", uid, spacing=(1.5, 1.5, 1.5))
    (tmp_path / "list.txt").write_text("two\n")

    assert [i.input.name for i in collect_inputs([cohort / "patient1"], tmp_path / "o")] == ["patient1"]
    with pytest.raises(InputError, match="2 DICOM series"):
        collect_inputs([tmp_path / "list.txt"], tmp_path / "o")
    out = tmp_path / "out"
    summary = run_cohort(quantized_unet, [cohort], out, workers=1)
    rows = {Path(r["input"]).name: r for r in _rows(out)}
    assert summary.done == 2 and sorted(rows) == ["patient1", "patient2.nii.gz"]
    from_dicom, from_nifti = (read_volume(out / f"{name}_labels.nii.gz") for name in ("patient1", "patient2"))
    assert from_dicom.same_grid(from_nifti) and from_dicom.array.max() > 0
    assert np.array_equal(from_dicom.array, from_nifti.array)
    again = run_cohort(quantized_unet, [cohort], out, workers=1)  # the DICOM folder's digest is stable
    assert (again.skipped, again.done) == (2, 0)


def test_killed_runs_scratch_folders_are_removed_by_the_next(tmp_path):
    """`kill -9` of segment-batch leaves its /tmp/ptqseg-batch-<pid>-* folder: the next run removes those whose
    process is gone, and keeps those of runs still going."""
    from PTQLogic.cohort.scratch import remove_stale_scratch_dirs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"ptqseg-batch-{gone.pid}-abc123"
    (stale / "ptqseg-worker-x").mkdir(parents=True)
    (stale / "ptqseg-worker-x" / "model.onnx").write_bytes(b"x" * 100)
    running = tmp_path / f"ptqseg-batch-{os.getpid()}-def456"
    running.mkdir()
    other = tmp_path / "ptqseg-batch-notapid"  # not named by a process: left alone
    other.mkdir()
    assert remove_stale_scratch_dirs(tmp_path) == [stale]
    assert not stale.exists() and running.is_dir() and other.is_dir()
