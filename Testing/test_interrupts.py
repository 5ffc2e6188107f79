"""Ctrl-C while OpenVINO and ONNX Runtime engines are live: exit 130, one error line, no output folder.

Before signals were routed through a watcher thread (PTQLogic/core/interrupts.py) this crashed with
"Segmentation fault" (exit -11/139): the signal frame landed on a thread running native kernels.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from PTQLogic.core.progress import parse_progress_line

from conftest import ROOT


def test_ctrl_c_during_openvino_then_onnxruntime_benchmark(quantized_unet, phantom_files, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.Popen(
        [sys.executable, "-m", "PTQLogic", "benchmark", "--model", str(quantized_unet), "--input",
         str(phantom_files["image"]), "--out", str(out), "--runtimes", "openvino", "onnxruntime",
         "--repeats", "2", "--progress-lines"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
    )
    starts, deadline = 0, time.time() + 240
    for line in proc.stderr:  # OpenVINO fp32, OpenVINO int8, then ONNX Runtime fp32: interrupt that one
        progress = parse_progress_line(line)
        if progress and progress[0] == "sliding window" and progress[1] == 0:
            starts += 1
        if (starts == 3 and progress and progress[1] == 2) or time.time() > deadline:
            break
    assert starts == 3, "the benchmark never reached the ONNX Runtime engine"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert not out.exists()


_NATIVE_DAEMON = """
import sys, threading, time
import torch
from PTQLogic.core.interrupts import exit_process
x = torch.randn(1, 48, 48, 48)
started = threading.Event()
def produce():  # what nnunetv2's sliding-window producer does while an interrupted consumer unwinds
    started.set()
    while True:
        torch.clone(x[:, 2:46, 2:46, 2:46], memory_format=torch.contiguous_format)
threading.Thread(target=produce, daemon=True).start()
started.wait(); time.sleep(0.05)
import atexit; atexit.register(lambda: print("exit handler ran", flush=True))
{exit}(130)
"""


def test_the_cli_exit_survives_a_daemon_thread_inside_torch():
    """sys.exit with such a thread alive aborts (-6, "terminate called"); exit_process gives 130 and runs exit handlers."""
    def run(exit_call):
        return subprocess.run([sys.executable, "-c", _NATIVE_DAEMON.format(exit=exit_call)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    control = [run("sys.exit") for _ in range(3)]
    assert any(p.returncode != 130 and "terminate called" in p.stderr for p in control), \
        [(p.returncode, p.stderr[-300:]) for p in control]
    for _ in range(5):
        done = run("exit_process")
        assert (done.returncode, done.stdout, done.stderr) == (130, "exit handler ran\n", "")
