"""Guarantees a hospital install relies on: no telemetry, no files outside the outputs and the cache,
read-only model folders work, permissions follow the umask, unwritable outputs fail before work.
That no command reaches the network is proven at the system-call level in test_no_network.py."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from PTQLogic.core.fileio import atomic_write_text, current_umask, make_temp_dir

from conftest import ROOT


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``folder`` with its size, mtime and mode: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*"))} | {".": (0, folder.stat().st_mtime_ns, folder.stat().st_mode)}


def cli(args, env=None, cwd=ROOT, timeout=600, umask=None):
    return subprocess.run([sys.executable, "-m", "PTQLogic", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def test_importing_openvino_through_ptqlogic_writes_no_telemetry(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "import PTQLogic, openvino; openvino.Core()"], env=env, cwd=ROOT,
                   check=True, timeout=120)
    assert not (tmp_path / "intel").exists()


# the variables libonnxruntime reads to decide that it runs on a CI service (its strings, 1.32) and then sends nothing
ORT_CI_VARIABLES = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
                    "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER")


def test_onnxruntime_through_ptqlogic_keeps_no_telemetry_queue(tmp_path):
    """ONNX Runtime's telemetry (a device id and an event queue in ~/.cache/Microsoft, uploaded to
    mobile.events.data.microsoft.com) is off once PTQLogic is imported, even for a caller's own sessions."""
    code = ("import PTQLogic, onnxruntime, onnx\n"
            "from onnx import helper, TensorProto\n"
            "io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in 'xy']\n"
            "graph = helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g', io[:1], io[1:])\n"
            "model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)\n"
            "onnxruntime.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])\n")
    # ONNX Runtime stays quiet on its own where it sees a CI service (TF_BUILD, GITHUB_ACTIONS, ...): hide those so
    # that the control below (without PTQLogic) really writes its queue, wherever the suite runs
    quiet = {"ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", *ORT_CI_VARIABLES}
    env = {key: value for key, value in os.environ.items() if key not in quiet} | {"HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=120)
    assert not (tmp_path / ".cache" / "Microsoft").exists()
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        # without PTQLogic it is written (so this test can fail); in a namespace without network, as the
        # telemetry would try to upload
        subprocess.run([unshare, "-n", sys.executable, "-c", code.replace("PTQLogic, ", "")], env=env, cwd=ROOT,
                       check=True, timeout=120)
        assert (tmp_path / ".cache" / "Microsoft").exists()


def test_read_only_model_folder_is_never_written(quantized_unet, phantom_files, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(quantized_unet, model)
    for path in [model, *model.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(model)
    cache = tmp_path / "cache"
    for runtime in ("openvino", "onnxruntime"):
        result = cli(["segment", "--model", model, "--input", phantom_files["image"], "--output",
                      tmp_path / f"{runtime}.nii.gz", "--runtime", runtime, "--cache-dir", cache])
        assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(model) == before
    assert any((cache / "models").rglob("*")), "the OpenVINO cache went to --cache-dir"
    shutil.rmtree(cache)
    setpriv = shutil.which("setpriv")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable] if setpriv else []
    usable = as_nobody and os.geteuid() == 0 and subprocess.run(
        [*as_nobody, "-c", "import torch, PTQLogic"], cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    if usable:  # root ignores permission bits: run once as an unprivileged user (needs a readable Python install)
        _segment_as_nobody(as_nobody, model, phantom_files["image"])


def _segment_as_nobody(as_nobody: list[str], model: Path, image: Path) -> None:
    """Segment with the read-only model folder as user nobody, who may only read it.

    pytest's temp root is 0700 (nobody cannot enter it), so the folder, the input and the output go to a
    fresh folder under /tmp whose every parent nobody can traverse."""
    shared = Path(tempfile.mkdtemp(prefix="ptqseg-nobody-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        blocked = [p for p in shared.parents if not p.stat().st_mode & stat.S_IXOTH]
        assert not blocked, f"user nobody cannot traverse {blocked}"
        shutil.copytree(model, shared / "model")  # copy2 keeps the 0555/0444 modes
        model = shared / "model"
        assert not any(p.stat().st_mode & 0o222 for p in [model, *model.iterdir()]), "the copy is not read-only"
        before = snapshot(model)
        image = Path(shutil.copy(image, shared / image.name))
        image.chmod(0o644)
        out = shared / "nobody"
        out.mkdir()
        out.chmod(0o777)
        env = {**os.environ, "HOME": str(out), "PTQSEG_CACHE_DIR": str(out / "cache")}
        result = subprocess.run([*as_nobody, "-m", "PTQLogic", "segment", "--model", str(model), "--input", str(image),
                                 "--output", str(out / "labels.nii.gz"), "--runtime", "openvino"],
                                cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (out / "labels.nii.gz").is_file()
        assert snapshot(model) == before
    finally:
        shutil.rmtree(shared, ignore_errors=True)  # only root gets here: the read-only modes do not stop it


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_and_folders_follow_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "a" / "table.json", "{}")
        folder = make_temp_dir(".staging-", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "table.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_unwritable_output_fails_before_any_work(quantized_unet, phantom_files, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    result = cli(["segment", "--model", quantized_unet, "--input", phantom_files["image"],
                  "--output", blocked / "labels.nii.gz", "--progress-lines"])
    assert result.returncode != 0
    work = [line for line in result.stderr.splitlines() if line.startswith("PTQSEG_PROGRESS") and '"loading"' not in line]
    assert not work, "work started before the output was checked"
    line, = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "blocked" in line and ".partial" not in line


def test_write_errors_name_the_final_file_not_the_temporary_one(tmp_path):
    from PTQLogic.core.errors import InputError
    from PTQLogic.core.fileio import atomic_path

    with pytest.raises(InputError) as caught:
        with atomic_path(tmp_path / "labels.nii.gz") as tmp:
            raise OSError(28, "No space left on device", str(tmp))
    assert "labels.nii.gz" in str(caught.value) and ".partial" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
