"""Dice, agreement, latency and memory measurements on hand-computed cases and a real torch engine."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from PTQLogic.engines.base import EngineInfo
from PTQLogic.core.errors import InputError
from PTQLogic.evaluation.metrics import (
    DiceResult,
    agreement_dice,
    dice_per_class,
    peak_memory_bytes,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))

from latency_support import measure_latency  # noqa: E402  (benchmarks/gpu/gpu_smoke.py's helper)


def test_dice_hand_computed_with_absent_class_excluded():
    ref = np.array([[1, 1, 1, 1, 0, 0], [2, 2, 0, 0, 0, 0]])
    pred = np.array([[1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 0, 3]])
    result = dice_per_class(pred, ref, labels=[1, 2, 3, 4])
    assert isinstance(result, DiceResult)
    assert result.per_class[1] == pytest.approx(2 * 2 / (2 + 4))  # 0.667
    assert result.per_class[2] == pytest.approx(2 * 2 / (4 + 2))  # 0.667
    assert result.per_class[3] == 0.0  # predicted but not in reference: counts as 0
    assert result.excluded == [4]  # absent from both: undefined, excluded
    assert 4 not in result.per_class
    assert result.mean == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert result.to_dict()["per_class"]["1"] == pytest.approx(2 / 3)


def test_dice_all_excluded_and_identical():
    zeros = np.zeros((4, 4, 4), np.uint8)
    result = dice_per_class(zeros, zeros, [1, 2])
    assert result.mean is None and result.excluded == [1, 2] and result.per_class == {}
    labels = np.random.default_rng(0).integers(0, 4, (8, 8, 8))
    same = dice_per_class(labels, labels.copy(), [1, 2, 3])
    assert same.mean == 1.0 and all(v == 1.0 for v in same.per_class.values())
    assert not any(math.isnan(v) for v in same.per_class.values())


def test_agreement_dice():
    a = np.array([0, 1, 1, 2, 2, 2])
    b = np.array([0, 1, 2, 2, 2, 2])
    # label 1: 2*1/(2+1); label 2: 2*3/(3+4); label 5 absent from both -> ignored
    assert agreement_dice(a, b, [1, 2, 5]) == pytest.approx((2 / 3 + 6 / 7) / 2)
    assert agreement_dice(np.zeros(5), np.zeros(5), [1]) == 1.0


def test_mismatched_shapes_raise_input_error():
    with pytest.raises(InputError, match="shapes differ"):
        dice_per_class(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), [1])
    with pytest.raises(InputError):
        agreement_dice(np.zeros((2, 3)), np.zeros((3, 2)), [1])


class TinyTorchEngine:
    """A real (small) torch Conv3d network behind the Engine protocol."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1)).eval()
        self.device = torch.device("cpu")
        self.info = EngineInfo("torch", "fp32", "cpu", torch.__version__, 0)
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(batch)


def test_measure_latency_on_real_torch_engine():
    torch.set_num_threads(1)
    engine = TinyTorchEngine()
    stats = measure_latency(engine, (1, 1, 16, 16, 16), warmup=2, repeats=5)
    assert engine.calls == 7
    assert stats.repeats == 5
    assert 0 < stats.median_ms < 5000 and 0 < stats.mean_ms < 5000
    assert stats.p90_ms >= stats.median_ms
    assert set(stats.to_dict()) == {"median_ms", "p90_ms", "mean_ms", "repeats"}
    # bigger input takes measurably longer (real timing, not a constant)
    big = measure_latency(engine, (2, 1, 48, 48, 48), warmup=1, repeats=3)
    assert big.median_ms > stats.median_ms


def test_measure_latency_rejects_bad_shapes():
    with pytest.raises(InputError):
        measure_latency(TinyTorchEngine(), (16, 16, 16))
    with pytest.raises(InputError):
        measure_latency(TinyTorchEngine(), (1, 1, 8, 8, 8), repeats=0)


def test_peak_memory():
    memory = peak_memory_bytes()
    assert memory["cpu_peak_rss"] > 10 * 2**20  # python + torch use more than 10 MiB
