"""Benchmark report: Markdown table math, CSV/JSON contents, a real PNG plot, atomic outputs."""
from __future__ import annotations

import csv
import json

import pytest

from PTQLogic.core.errors import InputError
from PTQLogic.evaluation.report import BenchmarkRow, plot_latency_vs_size, speedup_and_ratio, to_markdown, write_csv, write_json

ROWS = [
    BenchmarkRow("unet", "onnxruntime", "fp32", 2.4, 120.0, 3.0, 0.95, 1.0, 800.0, "cpu"),
    BenchmarkRow("unet", "onnxruntime", "int8", 0.8, 48.0, 1.5, 0.948, 0.993, 700.0, "cpu"),
    BenchmarkRow("unet", "tensorrt", "fp32", 2.6, 10.0, 0.5, 0.95, 1.0, None, "cuda:0"),
    BenchmarkRow("unet", "tensorrt", "int8", 1.3, 4.0, 0.2, 0.949, 0.995, None, "cuda:0"),
    BenchmarkRow("unet", "openvino", "int8", 0.9, 30.0),  # no FP32 row for this runtime
]


def test_speedup_and_ratio_against_same_runtime_fp32():
    assert speedup_and_ratio(ROWS, ROWS[1]) == (pytest.approx(2.5), pytest.approx(3.0))
    assert speedup_and_ratio(ROWS, ROWS[3]) == (pytest.approx(2.5), pytest.approx(2.0))
    assert speedup_and_ratio(ROWS, ROWS[0]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert speedup_and_ratio(ROWS, ROWS[4]) == (None, None)


def test_markdown_table():
    text = to_markdown(ROWS, title="Phantom UNet")
    lines = text.splitlines()
    assert lines[0] == "### Phantom UNet"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(ROWS)
    assert all(line.count("|") == table[0].count("|") for line in table)
    ort_int8 = table[3].split("|")
    assert "INT8" in ort_int8[3] and "2.50x" in ort_int8[8] and "3.00x" in ort_int8[6]
    assert "0.9930" in table[3]
    trt_int8 = table[5]
    assert "2.50x" in trt_int8 and "2.00x" in trt_int8 and "cuda:0" in trt_int8
    openvino = table[6].split("|")
    assert openvino[6].strip() == "–" and openvino[8].strip() == "–"  # no FP32 reference


def test_csv_and_json(tmp_path):
    write_csv(ROWS, tmp_path / "rows.csv")
    with open(tmp_path / "rows.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == len(ROWS)
    assert records[1]["runtime"] == "onnxruntime" and float(records[1]["speedup"]) == pytest.approx(2.5)
    assert records[4]["speedup"] == ""
    write_json(ROWS, tmp_path / "rows.json")
    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["rows"][3]["size_ratio"] == pytest.approx(2.0)
    assert data["rows"][4]["speedup"] is None
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


def test_plot_is_a_valid_png(tmp_path):
    from PIL import Image

    path = tmp_path / "latency.png"
    plot_latency_vs_size(ROWS, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert len(colors) > 10  # points, text and axes were drawn, not a blank canvas


def test_empty_or_bad_rows_raise_and_write_nothing(tmp_path):
    with pytest.raises(InputError):
        to_markdown([])
    with pytest.raises(InputError):
        write_csv([{"model": "x"}], tmp_path / "bad.csv")
    with pytest.raises(InputError):
        plot_latency_vs_size([], tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []
