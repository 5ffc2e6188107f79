"""whole_ct.py's report and row runner when a row is stopped by --row-timeout: the stopped row shows as taking longer
than the limit, and the other rows' speedups over it as lower bounds."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "nnunet"))

import whole_ct  # noqa: E402
import whole_ct_report as report  # noqa: E402


def _row(seconds: float) -> dict:
    return {"seconds": seconds, "stages": {s: seconds / 5 for s in report.STAGES}, "peak_rss_bytes": 2**30,
            "windows": 8}


def test_a_stopped_nnunetv2_row_gives_lower_bounds():
    stopped = {"error": "stopped after 400 s (--row-timeout)", "stopped_after": 400.0}
    repeats = [{"rows": {"nnunetv2": stopped, "int8": _row(10.0), "fp32": _row(16.0)}, "reference": None},
               {"rows": {"nnunetv2": stopped, "int8": _row(12.5), "fp32": _row(15.0)}, "reference": None}]
    summary = report.summarize(repeats, ["nnunetv2", "int8", "fp32"])
    assert summary["nnunetv2"]["seconds"] is None and summary["nnunetv2"]["stopped_after"]["min"] == 400
    assert summary["int8"]["speedup_vs_nnunetv2"] is None
    assert summary["int8"]["speedup_at_least"] == {"median": 36.0, "min": 32.0, "max": 40.0, "n": 2}
    line = report._row_line("nnunetv2", summary["nnunetv2"])
    assert "> 400 (stopped, 2 of them)" in line
    assert "| > 32.0x |" in report._row_line("int8", summary["int8"])
    assert "| > 25.0x |" in report._row_line("fp32", summary["fp32"])


def test_a_finished_nnunetv2_row_gives_plain_ratios():
    repeats = [{"rows": {"nnunetv2": _row(100.0), "int8": _row(10.0)}, "reference": "nnunetv2"}]
    summary = report.summarize(repeats, ["nnunetv2", "int8"])
    assert summary["int8"]["speedup_vs_nnunetv2"]["median"] == 10.0 and summary["int8"]["speedup_at_least"] is None
    assert "| 10.00x |" in report._row_line("int8", summary["int8"])


def test_run_child_stops_a_row_at_the_timeout(tmp_path):
    """A real child process (the row runner) stopped long before it could finish: recorded, not raised."""
    spec = {"row": "fp32", "threads": 1, "cpus": None}
    result = whole_ct.run_child("row", spec, tmp_path, 1, timeout=0.05)
    assert result == {"error": "stopped after 0.05 s (--row-timeout)", "stopped_after": 0.05}
    assert not (tmp_path / "row-result.json").exists()
