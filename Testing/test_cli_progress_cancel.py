"""CLI progress lines (what the Slicer module parses), Ctrl-C cancellation, and `ptqseg info`."""
import json
import signal
import subprocess
import sys
import time

import pytest

from PTQLogic.app.cli import main
from PTQLogic.core.progress import parse_progress_line

from conftest import ROOT, SAMPLE_UNET


def test_segment_progress_lines_and_json(quantized_unet, phantom_files, tmp_path, capsys):
    code = main(["segment", "--model", str(quantized_unet), "--input", str(phantom_files["image"]),
                 "--output", str(tmp_path / "l.nii.gz"), "--runtime", "onnxruntime", "--compare",
                 "--progress-lines", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    events = [parse_progress_line(line) for line in err.splitlines()]
    windows = [e for e in events if e and e[0] == "sliding window"]
    assert windows and windows[-1][1] == windows[-1][2] > 1
    result = json.loads(out)
    assert result["agreement_dice"] >= 0.98 and result["latency_ms"] > 0 and result["engine_size_mb"] > 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_cancels_quantize_and_leaves_nothing(signum, phantom_files, tmp_path):
    """Ctrl-C in a terminal, SIGTERM from the Slicer module's Cancel: same clean unwinding."""
    out = tmp_path / "models" / "unet-int8"
    proc = subprocess.Popen(
        [sys.executable, "-m", "PTQLogic", "quantize", "--model", str(SAMPLE_UNET), "--calibration",
         *map(str, phantom_files["calibration"]), "--out", str(out), "--patches", "64", "--progress-lines"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until real work has started (past the "loading" stage shown at once)
        event = parse_progress_line(line)
        if (event and event[0] != "loading") or time.time() > deadline:
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error:")
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_info_json_reports_runtimes(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["openvino"] and "missing" in info["versions"]["tensorrt"]
    assert "avx2" in info["cpu"]["flags"]


@pytest.mark.parametrize("cap, target", [("AVX2", "avx2"), (None, None)])
def test_info_says_which_int8_target_this_cpu_is_and_what_int8_gains(cap, target, capsys, monkeypatch):
    from PTQLogic.core.sysinfo import cpu_int8_target

    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)  # OpenVINO's kernels capped below VNNI, as such a CPU
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    target = target or cpu_int8_target()
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"int8 target cpu: {target}" in text
    assert ("no int8 dot-product instructions" in text) == (target == "avx2")
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["int8_target_cpu"] == target and bool(info["cpu_int8_note"]) == (target == "avx2")
