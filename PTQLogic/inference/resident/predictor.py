"""The engine call of the GPU pipeline: batches queued without a host wait per batch.

The host queues blending of batch n and the network on batch n+1 while the GPU still runs batch n;
it waits only for the batch ``ahead`` calls back (bounded queue, memory and honest progress). Engine
time is summed from CUDA events, so timing adds no synchronization.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from ...engines.base import Engine
from ..segmenter import run_engine
from ...core.progress import Monitor
from ...core.spec import ModelSpec

STAGE = "sliding window"


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
