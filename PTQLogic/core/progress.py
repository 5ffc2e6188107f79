"""Progress reporting and cancellation shared by every long-running step.

Long work calls ``monitor.update(stage, done, total)``; that both reports progress and raises
:class:`~PTQLogic.core.errors.Cancelled` once cancellation was requested. Before long work, what it is expected
to cost can be said with ``monitor.estimate(summary)``. The CLI shows tqdm bars; the Slicer module runs the CLI
with ``--progress-lines`` and parses the machine-readable lines.
"""
from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, TextIO

from .errors import Cancelled

ProgressCallback = Callable[[str, int, int], None]
EstimateCallback = Callable[[dict], None]
PROGRESS_PREFIX = "PTQSEG_PROGRESS "
ESTIMATE_PREFIX = "PTQSEG_ESTIMATE "
LOADING_STAGE = "loading"  # reported by the CLI at once, before its heavy imports; ends with the first real stage


@dataclass
class Monitor:
    """Progress sink plus cancellation flag, passed to every long-running function."""

    on_progress: ProgressCallback | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    on_estimate: EstimateCallback | None = None  # gets a summary dict whose "text" is one line for people

    _loading: bool = field(default=False, init=False, repr=False)

    def update(self, stage: str, done: int, total: int) -> None:
        self.check()
        if self.on_progress is None:
            return
        if stage == LOADING_STAGE:
            self._loading = done < total
        else:
            self.end_loading()
        self.on_progress(stage, done, total)

    def estimate(self, summary: dict) -> None:
        """Say what the coming work is expected to cost (``summary["text"]``: one line, e.g. "Expected: ...")."""
        self.check()
        if self.on_estimate is not None:
            self.end_loading()
            self.on_estimate(summary)

    def end_loading(self) -> None:
        """Complete an open ``loading`` stage (the first real stage, or the end of the command, does this)."""
        if self._loading and self.on_progress is not None:
            self._loading = False
            self.on_progress(LOADING_STAGE, 1, 1)

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("Cancelled by the user; no partial output was kept.")

    def cancel(self) -> None:
        self.cancel_event.set()


def progress_line(stage: str, done: int, total: int) -> str:
    """One machine-readable progress line (parsed by :func:`parse_progress_line`)."""
    return PROGRESS_PREFIX + json.dumps({"stage": stage, "done": done, "total": total})


def parse_progress_line(line: str) -> tuple[str, int, int] | None:
    """Inverse of :func:`progress_line`; returns None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        data = json.loads(line[len(PROGRESS_PREFIX):])
        return str(data["stage"]), int(data["done"]), int(data["total"])
    except (ValueError, KeyError, TypeError):
        return None


def estimate_line(summary: dict) -> str:
    """One machine-readable estimate line (parsed by :func:`parse_estimate_line`)."""
    return ESTIMATE_PREFIX + json.dumps(summary, default=str)


def parse_estimate_line(line: str) -> dict | None:
    """Inverse of :func:`estimate_line`: the summary (with its one-line "text"); None for any other line."""
    if not line.startswith(ESTIMATE_PREFIX):
        return None
    try:
        data = json.loads(line[len(ESTIMATE_PREFIX):])
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("text"), str) else None


def line_monitor(stream: TextIO = sys.stderr) -> Monitor:
    def emit(stage: str, done: int, total: int) -> None:
        stream.write(progress_line(stage, done, total) + "\n")
        stream.flush()

    def emit_estimate(summary: dict) -> None:
        stream.write(estimate_line(summary) + "\n")
        stream.flush()

    return Monitor(on_progress=emit, on_estimate=emit_estimate)


class TqdmProgress:
    """Progress callback that keeps one tqdm bar per stage."""

    def __init__(self, stream: TextIO = sys.stderr):
        self._bars: dict[str, object] = {}
        self._stream = stream

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, file=self._stream, leave=False)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            del self._bars[stage]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
