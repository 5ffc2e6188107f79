"""Benchmarks you can trust: interleaved timing with spread, machine description, stage breakdown,
and a failing runtime reported as a row while the others still report."""
from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest

from PTQLogic.app.benchmark import interleaved_latency, paired_speedups, run_benchmark, Timing
from PTQLogic.core.errors import InputError
from PTQLogic.evaluation.report import STAGES


def test_defaults_are_20_repeats_after_warmup():
    params = inspect.signature(run_benchmark).parameters
    assert params["repeats"].default >= 20 and params["warmup"].default >= 1


def test_benchmark_rows_carry_spread_stages_and_machine(quantized_unet, phantom_files, tmp_path):
    summary = run_benchmark(quantized_unet, phantom_files["image"], tmp_path, runtimes=["onnxruntime"],
                            precisions=["fp32", "int8"], reference=phantom_files["truth"], repeats=5, warmup=1)
    rows = {r["precision"]: r for r in summary["rows"]}
    assert set(rows) == {"fp32", "int8"}
    for row in rows.values():
        assert row["error"] is None and row["repeats"] == 5
        assert row["latency_min_ms"] <= row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"] \
            <= row["latency_max_ms"]
        assert set(row["stages_s"]) == set(STAGES) and all(v >= 0 for v in row["stages_s"].values())
        assert row["stages_s"]["windows"] > 0 and row["volume_s"] == pytest.approx(sum(row["stages_s"].values()), abs=1e-3)
        assert row["dice"] > 0.85
    assert rows["int8"]["speedup_p10"] <= rows["int8"]["speedup_p90"]
    assert rows["int8"]["agreement_dice"] > 0.95
    markdown = (tmp_path / "benchmark.md").read_text(encoding="utf-8")
    assert summary["machine"]["cpu"]["model"] in markdown and "usable" in markdown
    assert "Whole-volume stages" in markdown and "Resample back" in markdown
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["machine"]["cpu"]["logical_cores"] >= 1 and saved["repeats"] == 5
    assert not list(tmp_path.glob("labels_*"))  # labels only with save_labels


def test_a_failing_runtime_becomes_an_error_row(quantized_unet, phantom_files, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(quantized_unet, broken)
    (broken / "int8.onnx").write_bytes((broken / "int8.onnx").read_bytes()[:2000])  # truncated file
    summary = run_benchmark(broken, phantom_files["image"], tmp_path / "out", runtimes=["onnxruntime", "tensorrt"],
                            precisions=["fp32", "int8"], repeats=2, warmup=0)
    rows = {(r["runtime"], r["precision"]): r for r in summary["rows"]}
    assert rows["onnxruntime", "fp32"]["error"] is None and rows["onnxruntime", "fp32"]["latency_ms"] > 0
    assert rows["onnxruntime", "int8"]["error"] and rows["onnxruntime", "int8"]["latency_ms"] is None
    assert rows["tensorrt", "int8"]["error"]  # no TensorRT/GPU here: unavailable, said in the row
    table = (tmp_path / "out" / "benchmark.md").read_text(encoding="utf-8")
    assert rows["onnxruntime", "int8"]["error"].split(":")[0] in table


def test_interleaved_latency_pairs_rounds_and_validates(quantized_unet):
    from PTQLogic.engines.open import open_engine
    from PTQLogic.models.model_folder import open_model_dir

    model_dir = open_model_dir(quantized_unet)
    spec = model_dir.spec()
    engines = {p: open_engine(model_dir, "onnxruntime", p)[0] for p in ("fp32", "int8")}
    timings, errors = interleaved_latency(engines, (1, 1, *spec.patch_size), warmup=1, repeats=4)
    assert errors == {} and all(len(t.times_ms) == 4 for t in timings.values())
    low, high = paired_speedups(timings["fp32"], timings["int8"])
    ratios = np.array(timings["fp32"].times_ms) / np.array(timings["int8"].times_ms)
    assert ratios.min() <= low <= high <= ratios.max()
    assert Timing([3.0, 1.0, 2.0]).summary()["median_ms"] == 2.0
    with pytest.raises(InputError):
        interleaved_latency(engines, (1, 1, *spec.patch_size), warmup=0, repeats=0)
