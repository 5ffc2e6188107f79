"""Whole-volume inference with a real (tiny, fixed-weight) torch network whose answer is known."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from PTQLogic.engines.base import Engine, EngineInfo
from PTQLogic.core.errors import Cancelled, ModelError
from PTQLogic.io.volumes import read_volume
from PTQLogic.inference.segmenter import segment_volume
from PTQLogic.inference.sliding_window import count_windows
from PTQLogic.core.progress import Monitor
from PTQLogic.core.spec import spec_from_dict
from PTQLogic.core.volume import Volume

torch.set_num_threads(1)
from conftest import DATA_ENV, SHARED_DATA as DATA  # noqa: E402 - $PTQSEG_TEST_DATA or ../shared/data
CENTRE = np.array([2.0, -3.0, 4.0])


class ThresholdEngine:
    """A 1x1x1 Conv3d with fixed weights: after the CT window, x < 0.3 -> 0, 0.3..0.6 -> 1, > 0.6 -> 2."""

    def __init__(self, classes: int = 3):
        self.net = torch.nn.Conv3d(1, classes, kernel_size=1)
        slopes, offsets = [0.0, 10.0, 20.0, 0.0][:classes], [0.0, -3.0, -9.0, -100.0][:classes]
        with torch.no_grad():
            self.net.weight.copy_(torch.tensor(slopes).reshape(classes, 1, 1, 1, 1))
            self.net.bias.copy_(torch.tensor(offsets))
        self.device = torch.device("cpu")
        self.info = EngineInfo("torch", "fp32", "cpu", torch.__version__, 0)
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            return self.net(batch)


def expected_classes(hu: np.ndarray) -> np.ndarray:
    x = (np.clip(hu, -1000, 1000) + 1000) / 2000
    return np.where(x > 0.6, 2, np.where(x > 0.3, 1, 0)).astype(np.uint8)


def make_spec(classes=3, spacing=None, patch=(16, 16, 16)):
    return spec_from_dict({"name": "t", "architecture": "UNet", "classes": [f"c{i}" for i in range(classes)],
                           "patch_size": list(patch), "overlap": 0.25, "blend_mode": "gaussian",
                           "preprocessing": {"orientation": "RAS", "spacing": spacing, "intensity": "ct"}})


def oblique_shells(shape=(12, 30, 26)) -> Volume:
    """Oblique, anisotropic grid with two concentric spheres defined in RAS: -200 HU shell, 500 HU core."""
    a = 0.35
    rotation = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.2])
    matrix[:3, 3] = CENTRE - matrix[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2)
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ras = np.stack([i, j, k], -1) @ matrix[:3, :3].T + matrix[:3, 3]
    distance = np.linalg.norm(ras - CENTRE, axis=-1)
    hu = np.where(distance < 5, 500, np.where(distance < 10, -200, -1000)).astype(np.int16)
    return Volume(hu, matrix)


def test_oblique_volume_segmented_exactly_on_input_grid():
    volume = oblique_shells()
    original = volume.array.copy()
    engine = ThresholdEngine()
    assert isinstance(engine, Engine)
    seen = []
    result = segment_volume(volume, make_spec(), engine, monitor=Monitor(lambda *a: seen.append(a)))
    assert result.labels.array.shape == volume.array.shape and result.labels.array.dtype == np.uint8
    np.testing.assert_array_equal(result.labels.ijk_to_ras, volume.ijk_to_ras)
    np.testing.assert_array_equal(result.labels.array, expected_classes(volume.array))
    np.testing.assert_array_equal(volume.array, original)
    total = count_windows((26, 30, 12), (16, 16, 16), 0.25)
    assert result.patches == total == engine.calls and total > 1
    assert seen[0] == ("sliding window", 0, total) and seen[-1] == ("sliding window", total, total)
    assert 0 < result.network_seconds <= result.seconds


def test_resampled_volume_and_batches():
    volume = oblique_shells()
    truth = expected_classes(volume.array)
    engine = ThresholdEngine()
    result = segment_volume(volume, make_spec(spacing=(1.2, 1.2, 1.2)), engine, batch_size=3)
    assert result.labels.array.shape == volume.array.shape
    assert engine.calls == -(-result.patches // 3)
    for label in (1, 2):
        a, b = result.labels.array == label, truth == label
        assert 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()) > 0.85  # measured 0.91 (thin shells)
    k, j, i = np.nonzero(result.labels.array == 2)
    centroid = volume.ijk_to_ras[:3, :3] @ np.stack([i, j, k]).mean(axis=1) + volume.ijk_to_ras[:3, 3]
    assert np.linalg.norm(centroid - CENTRE) < 0.5


def test_cancel_and_wrong_class_count():
    volume = oblique_shells()
    monitor = Monitor()
    monitor.on_progress = lambda stage, done, total: monitor.cancel() if done >= 1 else None
    engine = ThresholdEngine()
    with pytest.raises(Cancelled):
        segment_volume(volume, make_spec(), engine, monitor=monitor)
    assert engine.calls == 1
    with pytest.raises(ModelError, match=r"4 classes in the spec"):
        segment_volume(volume, make_spec(classes=4), ThresholdEngine(classes=3))


def test_real_ct_geometry_round_trip():
    path = DATA / "example_ct_sm.nii.gz"
    if not path.exists():
        pytest.skip(f"real data not found in {DATA}; set {DATA_ENV}=/path/to/data to run it")
    volume = read_volume(path)
    reference = read_volume(path)
    native = segment_volume(volume, make_spec(patch=(32, 32, 32)), ThresholdEngine(), batch_size=4)
    # -400 and 200 HU fall exactly on a class boundary (a tie of two logits): argmax may go either way.
    decided = ~np.isin(reference.array, (-400, 200))
    np.testing.assert_array_equal(native.labels.array[decided], expected_classes(reference.array)[decided])
    np.testing.assert_array_equal(native.labels.ijk_to_ras, reference.ijk_to_ras)
    result = segment_volume(volume, make_spec(spacing=(2.0, 2.0, 2.0), patch=(32, 32, 32)), ThresholdEngine(),
                            batch_size=4)
    assert result.labels.array.shape == reference.array.shape
    np.testing.assert_array_equal(result.labels.ijk_to_ras, reference.ijk_to_ras)
    truth = expected_classes(reference.array)
    agreement = (result.labels.array == truth).mean()
    assert agreement > 0.93, agreement  # measured 0.969 (2 mm network grid vs 3 mm input)


class PerShapeEngine(ThresholdEngine):
    """Like OpenVINOEngine: compiled per batch shape, so it asks for one shape and a prepare() before timing."""

    fixed_batch = True

    def __init__(self):
        super().__init__()
        self.events: list = []

    def prepare(self, batch_size: int) -> None:
        self.events.append(("prepare", batch_size))

    def preferred_batch(self, num_classes: int, patch_size) -> int:
        return 2 if num_classes == 3 and tuple(patch_size) == (16, 16, 16) else 1

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.events.append(("call", batch.shape[0]))
        return super().__call__(batch)


def test_per_shape_engines_get_one_batch_shape_prepared_before_the_first_call():
    volume = oblique_shells()
    engine = PerShapeEngine()
    result = segment_volume(volume, make_spec(spacing=(1.2, 1.2, 1.2)), engine, batch_size=3)
    assert engine.events[0] == ("prepare", 3)
    calls = [n for kind, n in engine.events[1:] if kind == "call"]
    assert result.patches % 3 != 0 and set(calls) == {3}  # the last, partial batch was padded to 3
    assert result.patches == 3 * len(calls) - (-result.patches % 3)  # padded windows are not counted
    reference = segment_volume(volume, make_spec(spacing=(1.2, 1.2, 1.2)), ThresholdEngine(), batch_size=1)
    assert np.array_equal(result.labels.array, reference.labels.array)


def test_batch_size_left_open_is_the_engines_choice():
    engine = PerShapeEngine()
    result = segment_volume(oblique_shells(), make_spec(spacing=(1.2, 1.2, 1.2)), engine)
    assert engine.events[0] == ("prepare", 2)
    assert {n for kind, n in engine.events if kind == "call"} == {2} and result.patches > 2
    plain = ThresholdEngine()  # no preference: one window per call
    segment_volume(oblique_shells(), make_spec(spacing=(1.2, 1.2, 1.2)), plain)
    assert plain.calls == result.patches
