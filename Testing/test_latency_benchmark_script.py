"""benchmarks/cpu_int8_latency.py (the committed per-patch tables) still runs end to end, on a small patch."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_int8_latency as bench  # noqa: E402


def test_variants_rows_ratios_and_table(tmp_path):
    bench.export(tmp_path, 32)
    bench.make_variants(tmp_path, ["unet_bn"], 32, ["fp32rw", "fp32sub", "s8res", "u8sub"])
    result = bench.bench_model(tmp_path, "unet_bn", 32, repeats=2, warmup=1, threads=1,
                               runtimes=["openvino", "onnxruntime"], profile=False)
    rows = result["rows"]
    assert not result["errors"]
    assert "openvino-f32-nocopy/u8sub" not in rows  # the sub-pixel files are for ONNX Runtime only
    assert {"onnxruntime/u8sub", "onnxruntime/fp32sub", "openvino-f32-nocopy/s8res"} <= set(rows)
    int8 = rows["openvino-f32-nocopy/s8res"]
    assert int8["best_fp32"] in ("fp32", "fp32rw") and int8["speedup_vs_best_fp32"] > 0
    assert rows["onnxruntime/u8sub"]["best_fp32"] in ("fp32", "fp32rw", "fp32sub")
    report = {"machine": bench.machine(), "patch": 32, "repeats": 2, "threads": 1, "models": {"unet_bn": result}}
    table = bench.to_markdown(report)
    assert "| unet_bn | openvino-f32-nocopy | s8res |" in table and "vs best FP32" in table
