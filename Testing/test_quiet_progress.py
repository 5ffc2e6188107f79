"""Issue 8 item 8: progress is ours only, starts at once, and never collides with the error line.

ModelOpt's and ONNX Runtime's calibrators draw their own unlabelled tqdm bars (entropy: one "0/27" bar per
calibration batch) on stderr even without a terminal, and ModelOpt logs "ERROR - Failed to get GPU count"
on every CPU machine. Neither may reach the user; our Monitor reports the calibration batches.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time

import pytest

from PTQLogic.app import cli
from PTQLogic.core.progress import LOADING_STAGE, Monitor, TqdmProgress, parse_progress_line

from conftest import ROOT, SAMPLE_UNET


@pytest.mark.parametrize("placement, stage", [(["--placement", "cpu"], "calibration (ONNX Runtime)"),
                                              ([], "calibration (ModelOpt)")],
                         ids=["cpu", "default-auto-modelopt"])
def test_entropy_quantize_shows_only_our_progress_lines(phantom_files, tmp_path, placement, stage):
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "PTQLogic", "quantize", "--model", str(SAMPLE_UNET), "--calibration",
         *map(str, phantom_files["calibration"]), "--out", str(tmp_path / "m"), "--patches", "3",
         "--method", "entropy", "--progress-lines", *placement],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first = proc.stderr.readline()
    first_seconds = time.perf_counter() - started
    rest, _ = proc.communicate(timeout=600)[::-1]
    assert proc.returncode == 0, rest[-2000:]
    # something shows at once: the loading stage comes before the heavy imports (was ~5 s of silence)
    assert parse_progress_line(first) == (LOADING_STAGE, 0, 1), first
    assert first_seconds < 5, first_seconds
    lines = [line for line in (first + rest).splitlines() if line.strip()]
    strays = [line for line in lines if parse_progress_line(line) is None]
    assert strays == [], strays[:5]  # no third-party bars, warnings or log lines in between
    stages = [parse_progress_line(line)[0] for line in lines]
    assert stages.index(LOADING_STAGE) == 0 and (LOADING_STAGE, 1, 1) in map(parse_progress_line, lines)
    assert [p for p in map(parse_progress_line, lines) if p[0] == stage][-1][1:] == (3, 3)


def test_modelopt_log_has_no_gpu_count_error_on_cpu(quantized_unet):
    import torch

    log = (quantized_unet / "int8.modelopt.log").read_text(encoding="utf-8")
    assert "Failed to get GPU count" not in log
    if not torch.cuda.is_available():
        assert " - ERROR - " not in log


def test_error_line_is_not_printed_over_a_live_bar(phantom_files, tmp_path, capsys, monkeypatch):
    """A live bar is cleared before the error line (a label map given as calibration fails after loading)."""
    stream = io.StringIO()
    progress = TqdmProgress(stream)
    monkeypatch.setattr(cli, "_make_monitor", lambda args: Monitor(on_progress=progress))
    code = cli.main(["quantize", "--model", str(SAMPLE_UNET), "--calibration", str(phantom_files["truth"]),
                     "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and "looks like a label map" in err
    assert progress._bars == {}  # the loading bar was opened, then closed before the error was printed
    assert LOADING_STAGE in stream.getvalue()
    assert not (tmp_path / "m").exists()


def test_loading_stage_ends_with_the_first_real_stage():
    events = []
    monitor = Monitor(on_progress=lambda *event: events.append(event))
    monitor.update(LOADING_STAGE, 0, 1)
    monitor.update("export", 0, 1)
    monitor.end_loading()  # already ended: nothing more
    assert events == [(LOADING_STAGE, 0, 1), (LOADING_STAGE, 1, 1), ("export", 0, 1)]


def test_close_bars_clears_an_open_bar():
    stream = io.StringIO()
    progress = TqdmProgress(stream)
    args = argparse.Namespace(monitor=Monitor(on_progress=progress))
    args.monitor.update("sliding window", 2, 10)
    assert progress._bars
    cli._close_bars(args)
    assert progress._bars == {}
