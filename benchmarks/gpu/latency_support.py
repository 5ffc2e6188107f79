"""Per-batch latency of an engine, for ``gpu_smoke.py`` (moved out of ``PTQLogic.evaluation.metrics``: only benchmarks use it).

Imported as a sibling module (``from latency_support import measure_latency``): running a script puts its folder
on ``sys.path``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from PTQLogic.core.errors import InputError


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(engine, patch_shape: Sequence[int], warmup: int = 3, repeats: int = 10, seed: int = 0) -> LatencyStats:
    """Wall-clock time of ``engine(batch)`` on a random (N, C, D, H, W) batch, after ``warmup`` calls.

    CUDA work is synchronized before and after each call so the time covers the whole inference.
    """
    shape = tuple(int(v) for v in patch_shape)
    if len(shape) != 5 or any(v < 1 for v in shape):
        raise InputError(f"Latency patch shape must be (N, C, D, H, W) positive sizes; got {tuple(patch_shape)}.")
    if repeats < 1 or warmup < 0:
        raise InputError(f"Latency needs repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}.")
    device = torch.device(getattr(engine, "device", "cpu"))
    generator = torch.Generator().manual_seed(seed)
    batch = torch.rand(shape, generator=generator, dtype=torch.float32).to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            engine(batch)
        _synchronize(device)
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            engine(batch)
            _synchronize(device)
            times.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return LatencyStats(statistics.median(times), p90, statistics.fmean(times), repeats)
