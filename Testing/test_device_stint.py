"""benchmarks/nnunet/device_stint.sh (issue 25's train-quantize-table stint on a lent GPU machine), run end to end on
the CPU with tiny networks: the other parts are quantized before the organ part is done, the table quantizes only
the organ part and runs every row on the trained set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "training"))
SCRIPT = ROOT / "benchmarks" / "nnunet" / "device_stint.sh"

pytestmark = pytest.mark.slow  # about a minute: two trainings, the prepare run and the table, each importing torch


def _stint(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    labels = ROOT.parent / "shared" / "data" / "totalsegmentator_total_labels.json"
    defaults = dict(DEVICE="cpu", EXTRA="--tiny-networks --shape 48 48 32 --spacing 1.5 1.5 1.5",
                    ORGANS="--phantoms 2 --part-steps organs=2",
                    OTHERS="--phantoms 2 --part-steps vertebrae=2 cardiac=2 muscles=1 ribs=1",
                    ROWS="--rows fp32-torch int8 nnunetv2 --once fp32-torch nnunetv2 --repeats 1")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
               **{**defaults, **settings})
    if labels.is_file():
        env["LABELS"] = str(labels)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)


def _steps(out: Path) -> list[str]:
    return [line.split()[0] for line in (out / "times").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_stint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stint")
    return tmp_path, _stint(tmp_path)


def test_stint_trains_quantizes_the_other_parts_early_then_runs_the_table(first_stint):
    tmp_path, done = first_stint
    out = tmp_path / "out"
    assert done.returncode == 0, (done.stderr[-2000:], (out / "times").read_text() if (out / "times").is_file() else "")
    # the quick parts first, each packed and quantized as soon as it is trained
    assert _steps(out) == ["start", "muscles-trained", "ribs-trained", "vertebrae-trained", "cardiac-trained",
                           "others-trained", "others-quantized", "organs-trained", "organs-packed", "table-done"]
    training = json.loads((out / "training_others.json").read_text())
    assert list(training["parts"]) == ["muscles", "ribs", "vertebrae", "cardiac"]
    manifest = json.loads((out / "packs" / "manifest.json").read_text())
    assert len(manifest["parts"]) == 5 and all((out / "packs" / c).is_file()
                                               for part in manifest["parts"].values() for c in part["chunks"])
    for i, part in zip((2, 3, 4, 5), ("vertebrae", "cardiac", "muscles", "ribs")):  # one process each
        assert f"quantized Dataset29{i}_TotalSegShape_{part}" in (out / f"prepare_{part}.log").read_text()
    table_log = (out / "table.log").read_text()
    assert "quantizing Dataset291_TotalSegShape_organs" in table_log and "quantizing Dataset292" not in table_log
    result = json.loads((out / "total_table.json").read_text())
    config = result["configs"]["total"]
    assert config["parts"] == ["organs", "vertebrae", "cardiac", "muscles", "ribs"]
    assert result["settings"]["weights"] == str(tmp_path / "work" / "set")
    rows = config["repeats"][0]["rows"]
    assert set(rows) == {"fp32-torch", "int8", "nnunetv2"} and all(r["seconds"] > 0 for r in rows.values())
    assert rows["nnunetv2"]["agreement"]["dice"] == pytest.approx(1.0)  # the project's FP32 = nnunetv2's labels
    assert 0 <= rows["int8"]["agreement"]["dice"] <= 1
    assert json.loads((out / "training_organs.json").read_text())["parts"].keys() == {"organs"}
    assert set(json.loads((out / "training_others.json").read_text())["parts"]) == {"vertebrae", "cardiac",
                                                                                   "muscles", "ribs"}


def test_an_organ_part_trained_earlier_is_used_instead_of_training_one(first_stint, tmp_path):
    import hashlib

    earlier = first_stint[0] / "work" / "organs"  # what the first stint's organ training wrote
    done = _stint(tmp_path, ORGANS_FROM=str(earlier), ROWS="--rows int8 --repeats 1")
    out = tmp_path / "out"
    assert done.returncode == 0, done.stderr[-2000:]
    # the given organ part is quantized while the others train: the table quantizes nothing
    assert _steps(out) == ["start", "organs-given", "muscles-trained", "ribs-trained", "vertebrae-trained",
                           "cardiac-trained", "others-trained", "others-quantized", "organs-quantized", "table-done"]
    assert "Dataset291_TotalSegShape_organs" not in json.loads((out / "packs" / "manifest.json").read_text())["parts"]
    assert not (out / "train_organs.log").exists() and not (out / "training_organs.json").exists()
    assert "quantized Dataset291_TotalSegShape_organs" in (out / "prepare_organs.log").read_text()
    digest = [hashlib.sha256(next(root.glob("Dataset291_*/*/fold_0/checkpoint_final.pth")).read_bytes()).hexdigest()
              for root in (earlier, tmp_path / "work" / "set")]
    assert digest[0] == digest[1]
    assert "quantizing" not in (out / "table.log").read_text()
    rows = json.loads((out / "total_table.json").read_text())["configs"]["total"]["repeats"][0]["rows"]
    assert rows["int8"]["seconds"] > 0


def test_a_missing_organ_part_stops_the_stint_before_any_training(tmp_path):
    done = _stint(tmp_path, ORGANS_FROM=str(tmp_path / "nothing-here"))
    assert done.returncode == 1
    assert _steps(tmp_path / "out") == ["start", "organs-missing"]
    assert not (tmp_path / "out" / "train_others.log").exists()


def test_a_set_carried_in_packs_runs_without_training_on_the_very_weights_packed(first_stint, tmp_path):
    import torch

    from carry_weights import unpack

    first = first_stint[0]
    unpack(first / "out" / "packs", tmp_path / "carried")
    done = _stint(tmp_path, SET_FROM=str(tmp_path / "carried"), ROWS="--rows int8 --repeats 1")
    out = tmp_path / "out"
    assert done.returncode == 0, done.stderr[-2000:]
    assert _steps(out) == ["start", "set-given", "set-quantized", "table-done"]
    assert not (out / "train_others.log").exists() and not (out / "packs").exists()
    assert "quantizing" not in (out / "table.log").read_text()
    for packed in sorted((first / "work" / "set").glob("Dataset*/*/fold_0/checkpoint_final.pth")):
        carried = tmp_path / "work" / "set" / packed.relative_to(first / "work" / "set")
        theirs, ours = (torch.load(f, weights_only=True)["network_weights"] for f in (packed, carried))
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    rows = json.loads((out / "total_table.json").read_text())["configs"]["total"]["repeats"][0]["rows"]
    assert rows["int8"]["seconds"] > 0


def test_a_set_missing_a_part_stops_the_stint_before_any_work(first_stint, tmp_path):
    import shutil

    shutil.copytree(first_stint[0] / "work" / "set", tmp_path / "four", ignore=shutil.ignore_patterns("*_ribs"))
    done = _stint(tmp_path, SET_FROM=str(tmp_path / "four"))
    assert done.returncode == 1
    assert _steps(tmp_path / "out") == ["start", "set-missing-ribs"]


def test_a_set_and_int8_parts_quantized_elsewhere_run_the_table_without_quantizing(first_stint, tmp_path):
    """SET_FROM with QUANTIZED_FROM (the INT8 parts of another machine, same settings): nothing is quantized, the
    table runs those very int8.onnx files and records where they came from."""
    import hashlib
    import shutil

    from carry_weights import unpack

    first = first_stint[0]
    unpack(first / "out" / "packs", tmp_path / "carried")
    quantized = next((first / "work" / "ct").glob("models-*/total/quantized"))
    shutil.copytree(quantized, tmp_path / "int8", ignore=shutil.ignore_patterns("*.json.part"))
    done = _stint(tmp_path, SET_FROM=str(tmp_path / "carried"), QUANTIZED_FROM=str(tmp_path / "int8"),
                  ROWS="--rows int8 --repeats 1")
    out = tmp_path / "out"
    assert done.returncode == 0, done.stderr[-2000:]
    assert _steps(out) == ["start", "set-given", "set-quantized-elsewhere", "table-done"]
    assert not list(out.glob("prepare_*.log")) and "quantizing" not in (out / "table.log").read_text()
    result = json.loads((out / "total_table.json").read_text())
    record = result["settings"]["quantized_from"]
    assert record["path"] == str(tmp_path / "int8")
    for part, digest in record["int8_sha256"].items():
        assert digest == hashlib.sha256((quantized / part / "fold_0" / "int8.onnx").read_bytes()).hexdigest()
    assert "INT8 parts quantized elsewhere with the same settings, copied in" in (out / "total_table.md").read_text()
    assert result["configs"]["total"]["repeats"][0]["rows"]["int8"]["seconds"] > 0
