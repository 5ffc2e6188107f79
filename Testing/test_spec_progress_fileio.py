"""Foundations: model spec validation, progress/cancel monitor, atomic outputs."""
import json

import numpy as np
import pytest

from PTQLogic.core.errors import Cancelled, InputError, ModelError
from PTQLogic.core.fileio import atomic_path, atomic_write_text, sha256_file
from PTQLogic.core.progress import Monitor, parse_progress_line, progress_line
from PTQLogic.core.spec import load_spec, spec_from_dict
from PTQLogic.core.volume import Volume

GOOD = {
    "name": "m",
    "architecture": "UNet",
    "classes": ["background", {"name": "liver", "color": [1, 2, 3]}],
    "patch_size": [32, 32, 16],
    "preprocessing": {"spacing": [1.5, 1.5, 3], "intensity": "zscore"},
    "weights": "w.pt",
}


def test_spec_round_trip(tmp_path):
    spec = spec_from_dict(GOOD, base_dir=tmp_path)
    assert spec.num_classes == 2 and spec.class_names == ["background", "liver"]
    assert spec.classes[1].color == (1, 2, 3) and spec.patch_size == (32, 32, 16)
    assert spec.weights_path() == tmp_path / "w.pt"
    spec.save(tmp_path / "spec.json")
    again = load_spec(tmp_path / "spec.json")
    assert again == spec


def test_spec_yaml(tmp_path):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(GOOD))
    assert load_spec(tmp_path / "s.yaml").preprocessing.spacing == (1.5, 1.5, 3.0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": ["only"]}, "background first"),
        ({"patch_size": [32, 32]}, "patch_size"),
        ({"patch_size": [32, 0, 3]}, "positive"),
        ({"bogus": 1}, "unknown keys"),
        ({"preprocessing": {"intensity": "hu"}}, "intensity"),
        ({"preprocessing": {"ct_window": [5, 1]}}, "ct_window"),
        ({"overlap": 1.0}, "overlap"),
        ({"weights_format": "pickle"}, "weights_format"),
    ],
)
def test_spec_errors(change, message):
    with pytest.raises(ModelError, match=message):
        spec_from_dict({**GOOD, **change})


def test_spec_missing_and_corrupt(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_spec(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_spec(tmp_path / "bad.json")


def test_monitor_reports_and_cancels():
    seen = []
    monitor = Monitor(on_progress=lambda *a: seen.append(a))
    monitor.update("x", 1, 3)
    monitor.cancel()
    with pytest.raises(Cancelled):
        monitor.update("x", 2, 3)
    assert seen == [("x", 1, 3)]


def test_progress_line_round_trip():
    assert parse_progress_line(progress_line("sliding window", 3, 7)) == ("sliding window", 3, 7)
    assert parse_progress_line("some log line") is None
    assert parse_progress_line("PTQSEG_PROGRESS {broken") is None


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and len(sha256_file(target)) == 64


def test_volume_validation():
    eye = np.eye(4)
    Volume(np.zeros((4, 5, 6), np.int16), eye).validate()
    assert Volume(np.zeros((2, 4, 5, 6)), np.diag([2, 3, 4, 1.0])).spacing == (2.0, 3.0, 4.0)
    with pytest.raises(InputError, match="3D"):
        Volume(np.zeros((4, 5)), eye).validate()
    with pytest.raises(InputError, match="NaN"):
        a = np.zeros((4, 5, 6), np.float32)
        a[1, 1, 1] = np.nan
        Volume(a, eye).validate()
    with pytest.raises(InputError, match="IJK-to-RAS"):
        Volume(np.zeros((4, 5, 6)), np.zeros((4, 4))).validate()
    with pytest.raises(InputError, match="at least 2"):
        Volume(np.zeros((1, 5, 6)), eye).validate()
