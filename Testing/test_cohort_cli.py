"""`ptqseg segment-batch` as a user runs it: its own local Ray cluster, progress lines, Ctrl-C, rerun."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from PTQLogic.core.progress import parse_progress_line
from conftest import ROOT

pytest.importorskip("ray")


def test_ctrl_c_stops_cleanly_then_rerun_finishes(quantized_unet, tmp_path):
    from PTQLogic.samples.phantom import _write_image, make_phantom

    inputs = tmp_path / "cohort"
    inputs.mkdir()
    for seed in range(6):
        _write_image(make_phantom(500 + seed, shape=(40, 48, 44))[0], inputs / f"case{seed}.nii.gz")
    out = tmp_path / "labels"
    command = [sys.executable, "-m", "PTQLogic.app.cli", "segment-batch", "--model", str(quantized_unet),
               "--inputs", str(inputs), "--output-dir", str(out), "--workers", "1", "--progress-lines"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        for line in process.stderr:  # wait until the first volume is done, then press Ctrl-C
            parsed = parse_progress_line(line.strip())
            if parsed and parsed[0] == "volumes" and parsed[1] >= 1:
                process.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "no volume finished in time"
        _, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, rest
    assert "error: interrupted; finished volumes are kept" in rest and "Traceback" not in rest
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) < 6 and all(r["status"] == "done" for r in rows)
    assert sorted(p.name for p in out.glob("*_labels.nii.gz")) == sorted(Path(r["output"]).name for r in rows)
    assert not [p for p in out.iterdir() if ".partial" in p.name]

    done = subprocess.run(command[:-1] + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["skipped"], summary["done"], summary["failed"]) == (len(rows), 6 - len(rows), 0)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 6


def _loopback_down_available() -> bool:
    import shutil

    unshare = shutil.which("unshare")
    return bool(unshare) and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _loopback_down_available(), reason="needs `unshare -n` (root or user namespaces) to run "
                                                           "with the loopback network down")
def test_loopback_down_fails_at_once_with_one_error(quantized_unet, phantom_files, tmp_path):
    """In a network namespace whose loopback is down, Ray retried its GCS for 10 minutes ("Failed to connect
    to GCS"); now: one error line within seconds, nothing written."""
    command = ["unshare", "-n", sys.executable, "-m", "PTQLogic.app.cli", "segment-batch", "--model",
               str(quantized_unet), "--inputs", str(phantom_files["image"]), "--output-dir", str(tmp_path / "out")]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "loopback" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
