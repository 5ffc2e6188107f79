"""Guarantees a hospital install relies on: no network, no files outside the outputs and the cache,
read-only model folders work, permissions follow the umask, unwritable outputs fail before work."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from PTQLogic.io.volumes import label_table_paths

from PTQLogic.core.fileio import atomic_write_text, current_umask, make_temp_dir

from conftest import ROOT, SAMPLE_UNET

NETGUARD = Path(__file__).parent / "netguard"


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``folder`` with its size, mtime and mode: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*"))} | {".": (0, folder.stat().st_mtime_ns, folder.stat().st_mode)}


def cli(args, env=None, cwd=ROOT, timeout=600, umask=None):
    return subprocess.run([sys.executable, "-m", "PTQLogic", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def test_every_command_makes_no_network_call_and_writes_nothing_to_home(quantized_unet, phantom_files, tmp_path):
    """Also: with umask 022 every folder is 0755 and every file 0644 (they were 0700/0600)."""
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "network.log"
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": f"{NETGUARD}{os.pathsep}{ROOT}",
           "PTQSEG_NETGUARD_LOG": str(log), "PTQSEG_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("XDG_CACHE_HOME", None)
    image, truth = phantom_files["image"], phantom_files["truth"]
    model = tmp_path / "model"
    commands = [
        ["info"],
        ["quantize", "--model", SAMPLE_UNET, "--calibration", *phantom_files["calibration"], "--out", model,
         "--patches", "2"],
        ["build", "--model", model, "--runtime", "openvino"],
        ["segment", "--model", model, "--input", image, "--output", tmp_path / "seg.nii.gz", "--runtime", "onnxruntime"],
        ["evaluate", "--prediction", tmp_path / "seg.nii.gz", "--reference", truth],
        ["benchmark", "--model", quantized_unet, "--input", image, "--out", tmp_path / "bench",
         "--runtimes", "openvino", "--precisions", "int8", "--repeats", "1"],
        # `demo` is quantize + benchmark on phantoms (both above); left out to keep CI time down
    ]
    for command in commands:
        result = cli(command, env=env, umask=0o022)
        assert result.returncode == 0, (command[0], result.stderr[-2000:])
    assert not log.exists(), log.read_text()
    assert not (home / "intel").exists(), "OpenVINO telemetry files were written"
    # third-party caches (matplotlib's ~/.config, ModelOpt's CuPy kernels in ~/.cupy) may appear; our files never
    assert not [p for p in home.rglob("*") if "ptqseg" in p.name.lower()]
    written = [model, *model.iterdir(), tmp_path / "seg.nii.gz", *label_table_paths(tmp_path / "seg.nii.gz"),
               *(tmp_path / "bench").iterdir()]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_network_guard_catches_a_connection(tmp_path):
    """The guard itself works (otherwise the test above could not fail)."""
    log = tmp_path / "network.log"
    env = {**os.environ, "PYTHONPATH": str(NETGUARD), "PTQSEG_NETGUARD_LOG": str(log)}
    code = "import socket\ntry:\n    socket.create_connection(('203.0.113.1', 80), timeout=0.1)\nexcept OSError:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert "203.0.113.1" in log.read_text()


def test_importing_openvino_through_ptqlogic_writes_no_telemetry(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "import PTQLogic, openvino; openvino.Core()"], env=env, cwd=ROOT,
                   check=True, timeout=120)
    assert not (tmp_path / "intel").exists()


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
        out = tmp_path / "nobody"
        out.mkdir()
        out.chmod(0o777)
        for path in (tmp_path, phantom_files["image"].parent):
            path.chmod(path.stat().st_mode | 0o055)
        env = {**os.environ, "HOME": str(out), "PTQSEG_CACHE_DIR": str(out / "cache")}
        result = subprocess.run([*as_nobody, "-m", "PTQLogic", "segment", "--model", str(model), "--input", str(phantom_files["image"]),
                                 "--output", str(out / "labels.nii.gz"), "--runtime", "openvino"],
                                cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (out / "labels.nii.gz").is_file()
        assert snapshot(model) == before


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
