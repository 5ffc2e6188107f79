"""FP32 for the sliding-window positions where INT8 is least sure (``segment --fp32-windows SHARE``).

INT8's disagreement with FP32 on a trained nnU-Net gathers where the network itself hesitates between two
classes: on the 25-class organ part of the whole-CT benchmark, the 9 of 27 windows with the most voxels whose two
top logits lie within 1.0 hold enough of it that taking them from FP32 lifts agreement from 0.9705 to 0.9839
(``benchmarks/results/epyc-2core-avx512/whole_ct/organs_mixed_windows.json``). So, per model and fold: every
window runs in INT8 and its unsure share is measured; after the last window, the most unsure ones (above
``unsure_share``, at most ``max_share`` of the windows) run again in INT8 and in FP32, and their blended INT8
logits are replaced by FP32's before nnU-Net's division. Other windows keep INT8's logits unchanged.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from ...core.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Fp32WindowPolicy:
    max_share: float  # at most this share of a model's windows run again in FP32 (0 < max_share <= 1)
    margin: float = 1.0  # a voxel is unsure when its two highest logits differ by less than this
    unsure_share: float = 0.01  # a window is a candidate when more than this share of its voxels are unsure
    stride: int = 2  # the share is measured on every stride-th voxel of each axis

    def __post_init__(self) -> None:
        if not 0 < self.max_share <= 1:
            raise InputError(f"--fp32-windows must be a share of the windows in (0, 1], got {self.max_share:g} "
                             "(0 or leaving it out: every window in INT8).")

    def most(self, windows: int) -> int:
        return math.floor(self.max_share * windows + 1e-9)


def unsure_share(logits: "torch.Tensor", margin: float, stride: int = 2) -> float:
    """Share of the voxels of one window's logits ``(classes, *spatial)`` whose two highest logits differ by less
    than ``margin`` (on every ``stride``-th voxel); 0 for a single class."""
    import torch

    if logits.shape[0] < 2:
        return 0.0
    sample = logits[(slice(None),) + (slice(None, None, stride),) * (logits.ndim - 1)].float()
    top = torch.topk(sample, 2, dim=0).values
    return float(((top[0] - top[1]) < margin).float().mean())


def chosen_windows(shares: Sequence[float], policy: Fp32WindowPolicy) -> list[int]:
    """The windows to run in FP32: the most unsure first, above the policy's share, at most its count."""
    order = sorted(range(len(shares)), key=lambda i: (-shares[i], i))
    return sorted(i for i in order[:policy.most(len(shares))] if shares[i] > policy.unsure_share)


@dataclass
class Fp32Windows:
    """One model's FP32 windows: its policy, its FP32 engines (one per fold, opened on first use by ``open_fp32``),
    and what was done: windows per fold, seconds in FP32 engines and seconds building them."""

    policy: Fp32WindowPolicy
    open_fp32: Callable[[], Sequence]
    fold: int = 0
    windows: int = 0
    considered: int = 0
    shares: list[list[float]] = field(default_factory=list)
    build_seconds: float = 0.0
    float_precision: str | None = None  # what the FP32 windows' float layers ran in (OpenVINO: f32 or bf16)
    _engines: Sequence | None = None

    def engine(self):
        """The FP32 engine of the current fold."""
        if self._engines is None:
            started = time.perf_counter()
            self._engines = self.open_fp32()
            self.build_seconds += time.perf_counter() - started
            self.float_precision = getattr(self._engines[0], "float_precision", "f32")
        return self._engines[self.fold]

    def record(self, shares: list[float], chosen: list[int]) -> None:
        self.shares.append(shares)
        self.considered += len(shares)
        self.windows += len(chosen)

    def release(self) -> None:
        """Drop the FP32 engines (the counts stay): called once the model's sliding window is done."""
        self._engines = None


def summary(parts: Sequence[Fp32Windows], policy: Fp32WindowPolicy) -> dict:
    """What ``segment`` reports: FP32 windows of all windows, per part, and the policy."""
    floats = sorted({p.float_precision for p in parts if p.float_precision})
    return {"windows": sum(p.windows for p in parts), "of": sum(p.considered for p in parts),
            "per_part": [p.windows for p in parts], "max_share": policy.max_share, "margin": policy.margin,
            "unsure_share": policy.unsure_share, "float_precision": "/".join(floats) or None}
