"""benchmarks/cpu/cpu_int8_latency.py (the committed per-patch tables) still runs end to end, on a small patch."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "cpu"))

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


def test_profile_splits_convolutions_from_the_rest(tmp_path):
    """--profile's split table: convolutions (ConvTranspose included) against everything else, per file."""
    bench.export(tmp_path, 32)
    bench.make_variants(tmp_path, ["unet_bn"], 32, ["s8res"])
    result = bench.bench_model(tmp_path, "unet_bn", 32, repeats=1, warmup=1, threads=1, runtimes=["openvino"],
                               profile=True, only=["openvino-f32-cl", "openvino-bf16-cl"])
    profiles = result["profiles"]
    bf16 = bench.openvino_bf16()
    assert "openvino-f32-cl/s8res" in profiles and ("openvino-bf16-cl/fp32" in profiles) == bf16
    int8 = profiles["openvino-f32-cl/s8res"]
    conv, other = bench.time_split(int8)
    transposed = sum(ms for kind, ms in int8["by_kind_ms"].items() if kind.startswith("ConvolutionBackpropData"))
    plain = sum(ms for kind, ms in int8["by_kind_ms"].items() if kind.startswith("Convolution/"))
    assert transposed > 0 and plain > 0 and abs(conv - transposed - plain) < 1e-9  # the UNet's ConvTransposes count
    assert other >= 0 and abs(conv + other - int8["layers_total_ms"]) < 1e-6
    report = {"models": {"unet_bn": result}}
    table = "\n".join(bench.split_markdown(report))
    assert "Where the time goes" in table and "| unet_bn | openvino-f32-cl/s8res |" in table
    assert f"| unet_bn | openvino-{'bf16' if bf16 else 'f32'}-cl/fp32 |" in table  # the FP32 row it is compared with


def test_openvino_ir_variants_are_timed_on_openvino_only(tmp_path):
    """NAME_<variant>.xml (an OpenVINO IR, e.g. from nncf_yardstick.py) is timed beside the ONNX files."""
    import numpy as np
    import openvino as ov

    bench.export(tmp_path, 32)
    bench.make_variants(tmp_path, ["unet_bn"], 32, ["s8res"])
    ov.save_model(ov.Core().read_model(str(tmp_path / "unet_bn_s8res.onnx")), str(tmp_path / "unet_bn_ir.xml"),
                  compress_to_fp16=False)
    result = bench.bench_model(tmp_path, "unet_bn", 32, repeats=2, warmup=1, threads=1,
                               runtimes=["openvino", "onnxruntime"], profile=False,
                               only=["openvino-f32-cl", "onnxruntime"])
    rows = result["rows"]
    assert not result["errors"]
    assert {"openvino-f32-cl/ir", "openvino-f32-cl/s8res", "onnxruntime/s8res"} <= set(rows)
    assert "onnxruntime/ir" not in rows and rows["openvino-f32-cl/ir"]["speedup_vs_best_fp32"] > 0
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32, 32)).astype(np.float32)
    from_ir = bench.OpenVINORunner(tmp_path / "unet_bn_ir.xml", "f32", 1, True)(x)
    from_onnx = bench.OpenVINORunner(tmp_path / "unet_bn_s8res.onnx", "f32", 1, True)(x)
    assert from_ir.shape == (1, 14, 32, 32, 32) and np.abs(from_ir - from_onnx).max() < 1e-4


def test_windows_per_call_and_bf16_pairing(tmp_path):
    """--batch N times N windows per OpenVINO call (ONNX Runtime, whose files are batch 1, is left out); every
    OpenVINO configuration is interleaved in the same rounds, so INT8 against bf16 FP32 is paired per round."""
    import numpy as np

    bench.export(tmp_path, 32)
    bench.make_variants(tmp_path, ["unet_bn"], 32, ["s8res"])
    result = bench.bench_model(tmp_path, "unet_bn", 32, repeats=3, warmup=1, threads=1,
                               runtimes=["openvino", "onnxruntime"], profile=False,
                               only=["openvino-f32-cl", "openvino-bf16-cl", "onnxruntime"], batch=2)
    rows = result["rows"]
    assert not result["errors"] and not any(key.startswith("onnxruntime") for key in rows)
    int8 = rows["openvino-f32-cl/s8res"]
    assert int8["n"] == 3
    if bench.openvino_bf16():
        assert int8["paired_vs_bf16_p10"] <= int8["paired_vs_bf16_p90"]
        bf16_ms = min(row["median_ms"] for key, row in rows.items() if key.startswith("openvino-bf16-cl/fp32"))
        assert abs(int8["speedup_vs_openvino_bf16_fp32"] - bf16_ms / int8["median_ms"]) < 1e-9
    else:  # a bf16 hint would run f32 here: no bf16 rows, no ratio against them, and the reason is recorded
        assert not any("bf16" in key for key in rows) and "speedup_vs_openvino_bf16_fp32" not in int8
        assert "natively" in result["not_run"]["openvino-bf16-*"]
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32, 32)).astype(np.float32)
    two = bench.OpenVINORunner(tmp_path / "unet_bn_s8res.onnx", "f32", 1, True, batch=2)(x)
    one = bench.OpenVINORunner(tmp_path / "unet_bn_s8res.onnx", "f32", 1, True)(x[1:])
    assert two.shape == (2, 14, 32, 32, 32) and np.abs(two[1:] - one).max() < 1e-4
    assert bench.runtime_of("openvino-bf16-cl/fp32") == bench.runtime_of("openvino-f32/s8res") == "openvino"
    assert bench.runtime_of("onnxruntime/u8sub") == bench.runtime_of("onnxruntime/fp32sub") == "onnxruntime"
    report = {"machine": bench.machine(), "patch": 32, "repeats": 3, "threads": 1, "batch": 2,
              "interleave": "runtime", "models": {"unet_bn": result}}
    table = bench.to_markdown(report)
    assert "batch 2 (windows per call)" in table and "every file and configuration of it interleaved" in table
