"""Run a PTQLogic module in a child Python process that reports ``batch DONE TOTAL`` lines.

Calibration runs in children because ModelOpt patches ONNX Runtime's calibrators for the rest of a process once
it has run; the child's progress lines reach ``on_batch`` (which may raise ``Cancelled``: the child is killed).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence


def run_module(module: str, args: Sequence[str], on_batch: Callable[[int, int], None] | None) -> tuple[int, str]:
    """Run ``python -m module args``; (exit code, its last 3 non-progress output lines joined, or 'no output')."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("batch "):
                if on_batch is not None:
                    on_batch(*(int(v) for v in line.split()[1:3]))
            elif line.strip():
                tail = (tail + [line.strip()])[-3:]
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    return code, " | ".join(tail) or "no output"
