"""The engine call inside the sliding window: checked output, timing, progress and cancel per batch.

:class:`CountingPredictor` serves the CPU path (one host wait per batch); :class:`QueuedPredictor` the
GPU path: the host queues blending of batch n and the network on batch n+1 while the GPU still runs batch n,
and waits only for the batch ``ahead`` calls back (bounded queue, memory and honest progress). Its engine
time is summed from CUDA events, so timing adds no synchronization.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from ..core.errors import ModelError, PTQError
from ..core.progress import Monitor
from ..core.spec import ModelSpec
from ..engines.base import Engine

STAGE = "sliding window"


def auto_batch_size(engine: Engine, spec: ModelSpec) -> int:
    """The engine's preferred windows per call for ``spec`` (``engine.preferred_batch``), else 1."""
    preferred = getattr(engine, "preferred_batch", None)
    return max(1, int(preferred(spec.num_classes, spec.patch_size))) if preferred else 1


def run_engine(engine: Engine, batch: torch.Tensor, spec: ModelSpec, method: str = "__call__") -> torch.Tensor:
    """``engine.<method>(batch)`` with one-line errors and the logits' shape checked against ``spec``."""
    try:
        logits = getattr(engine, method)(batch)
    except PTQError:
        raise
    except Exception as exc:  # an engine failing mid-run is a model/runtime problem, said in one line
        raise ModelError(f"The engine failed on a batch of shape {tuple(batch.shape)}: {exc}") from exc
    expected = (batch.shape[0], spec.num_classes, *batch.shape[2:])
    if tuple(logits.shape) != expected:
        raise ModelError(
            f"The engine returned logits of shape {tuple(logits.shape)} for a batch of {tuple(batch.shape)}; "
            f"expected {expected} ({spec.num_classes} classes in the spec). "
            "Check that the spec's classes match the network's output channels."
        )
    return logits


class CountingPredictor:
    """Calls the engine, checks its output, times it and reports progress per batch."""

    def __init__(self, engine: Engine, spec: ModelSpec, total: int, monitor: Monitor, native: bool = False):
        self.engine, self.spec, self.total, self.monitor = engine, spec, total, monitor
        # native: keep the engine's own output precision (FP16) when it offers that, instead of float32 copies
        self.native = native and hasattr(engine, "forward_native")
        # the sliding window blends each batch's logits before it asks for the next: no copy out needed
        self.transient = not self.native and hasattr(engine, "forward_transient")
        self.patches = 0
        self.seconds = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.monitor.check()
        batch = batch.to(device=self.engine.device, dtype=torch.float32).contiguous()
        started = time.perf_counter()
        method = "forward_native" if self.native else "forward_transient" if self.transient else "__call__"
        logits = run_engine(self.engine, batch, self.spec, method)
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.seconds += time.perf_counter() - started
        self.patches = min(self.patches + batch.shape[0], self.total)  # padded windows are not counted
        self.monitor.update(STAGE, self.patches, self.total)
        return logits if self.native else logits.float()


class QueuedPredictor:
    """Calls ``engine`` (its native precision where offered), checks the logits' shape and times it."""

    def __init__(self, engine: Engine, spec: ModelSpec, total: int, monitor: Monitor, ahead: int = 2):
        self.engine, self.spec, self.total, self.monitor, self.ahead = engine, spec, total, monitor, ahead
        self.native = hasattr(engine, "forward_native")
        self.device = torch.device(engine.device)
        self.patches = 0  # windows the engine ran (padding of a fixed-size last batch included)
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._queued: deque[tuple[torch.cuda.Event, int]] = deque()
        self._done = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.monitor.check()
        real = batch.shape[0]
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            started = time.perf_counter()
        logits = run_engine(self.engine, batch, self.spec, "forward_native" if self.native else "__call__")
        self.patches += batch.shape[0]
        if cuda:
            end.record()
            self._events.append((start, end))
            self._queued.append((end, real))
            while len(self._queued) > self.ahead:
                self._retire()
        else:
            self._seconds += time.perf_counter() - started
            self._done = min(self._done + real, self.total)
            self.monitor.update(STAGE, self._done, self.total)
        return logits

    def _retire(self) -> None:
        event, real = self._queued.popleft()
        event.synchronize()
        self._done = min(self._done + real, self.total)  # a padded last batch does not overshoot
        self.monitor.update(STAGE, self._done, self.total)

    def finish(self) -> float:
        """Wait for every queued batch; the engine's seconds in all."""
        while self._queued:
            self._retire()
        seconds = self._seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        self._events.clear()
        return seconds
