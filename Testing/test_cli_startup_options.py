"""Issue 8 items 9 and 11: the command line answers at once and says what it does.

`--help`, `--version` and a wrong option never import torch/MONAI/ONNX; defaults show in `--help`; every
option has help; `--runtime torch` without `--precision` runs FP32 (with a note); `--compare` with FP32
is reported as ignored and otherwise reports the FP32 time; with `--json` errors are a JSON object too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

import PTQLogic
from PTQLogic.app.cli import PRECISIONS, RUNTIMES, build_parser, main

from conftest import ROOT

HEAVY = ("torch", "monai", "onnx", "onnxruntime", "openvino", "modelopt", "SimpleITK")

PROBE = """
import json, sys
from PTQLogic.app.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def _probe(*argv: str, env: dict | None = None) -> tuple[dict, str, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=env)
    seconds = time.perf_counter() - started
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc.stdout + proc.stderr, seconds


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["--version"], 0),
    (["segment", "--help"], 0),
    (["segment", "--model", "m", "--bogus"], 2),
    (["quantize", "--model", "m", "--calibration", "c", "--out", "o", "--patches", "0"], 2),
], ids=["help", "version", "segment-help", "wrong-option", "bad-number"])
def test_fast_answers_import_no_heavy_module(argv, code):
    result, output, seconds = _probe(*argv)
    assert result["code"] == code, output
    assert result["heavy"] == [], f"{argv} imported {result['heavy']}"
    assert seconds < 10, f"{argv} took {seconds:.1f} s"  # was ~10 s; generous for a loaded 2-core CI


@pytest.mark.parametrize("argv", [
    ["segment", "--model", "/nonexistent", "--input", "x.nii.gz", "--output", "y.nii.gz"],
    ["quantize", "--model", "/nonexistent.json", "--calibration", "x.nii.gz", "--out", "o"],
    ["evaluate", "--prediction", "/nonexistent/a.nii.gz", "--reference", "/nonexistent/b.nii.gz"],
    ["benchmark", "--model", "/nonexistent", "--input", "x.nii.gz", "--out", "b"],
], ids=["segment", "quantize", "evaluate", "benchmark"])
def test_wrong_paths_fail_before_torch_is_imported(argv):
    result, output, _ = _probe(*argv)
    assert result["code"] == 2 and "error: " in output, output
    assert not {"torch", "monai", "onnx", "openvino", "modelopt"} & set(result["heavy"]), result["heavy"]


def test_wrong_paths_fail_first_where_tensorrt_is_installed(tmp_path):
    """--precision auto asks whether TensorRT runs here (importing torch and the runtimes) only after the paths
    are checked: a package named tensorrt on the path must not make a wrong path slow to report."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text("raise ImportError('not a real TensorRT')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for argv in (["segment", "--model", "/nonexistent", "--input", "x.nii.gz", "--output", "y.nii.gz"],
                 ["segment", "--model", str(ROOT / "PTQLogic" / "samples" / "data" / "phantom_unet.json"),
                  "--input", "/nonexistent.nii.gz", "--output", "y.nii.gz"]):
        result, output, _ = _probe(*argv, env=env)
        assert result["code"] == 2 and "does not exist" in output, output
        assert not {"torch", "openvino", "onnxruntime"} & set(result["heavy"]), result["heavy"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ptqseg {PTQLogic.__version__}"


def test_runtime_and_precision_names_match_the_engines():
    from PTQLogic.engines.base import PRECISIONS as ENGINE_PRECISIONS, RUNTIMES as ENGINE_RUNTIMES

    assert (RUNTIMES, PRECISIONS) == (ENGINE_RUNTIMES, ENGINE_PRECISIONS)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_defaults_are_shown():
    commands = _subparsers(build_parser())
    assert {"quantize", "build", "segment", "evaluate", "benchmark", "demo", "info"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"ptqseg {name} {action.option_strings} has no help"
        text = sub.format_help()
        for action in sub._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and not action.required and action.help:
                assert "(default:" in text, f"ptqseg {name}: defaults not shown"
    segment_help = " ".join(commands["segment"].format_help().split())
    assert "(default: auto)" in segment_help and "(default: auto = int8 on the CPU runtimes, fp16 on TensorRT" in segment_help
    assert "fp16 needs an NVIDIA GPU" in segment_help


def test_usage_error_with_json_prints_a_json_error(capsys):
    code = main(["segment", "--json", "--model", "m", "--input", "i", "--output", "o.nii.gz", "--batch-size", "0"])
    out, err = capsys.readouterr()
    assert code == 2
    error = json.loads(out)
    assert error["exit_code"] == 2 and "--batch-size" in error["error"]
    assert err.strip().splitlines()[-1].startswith("error: ") and "--batch-size" in err


def test_pipeline_error_with_json_prints_a_json_error(tmp_path, capsys):
    code = main(["segment", "--json", "--model", str(tmp_path), "--input", "x.nii.gz", "--output", "o.nii.gz"])
    out, err = capsys.readouterr()
    assert code == 2
    assert json.loads(out) == {"error": err.strip().splitlines()[-1][len("error: "):], "exit_code": 2}
    assert "not a quantized model folder" in out


def test_torch_runtime_int8_is_refused_with_a_way_out(capsys):
    code = main(["build", "--model", "unused", "--runtime", "torch", "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--runtime torch cannot run int8" in err and "--precision fp32" in err and "openvino" in err


def test_torch_runtime_defaults_to_fp32_with_a_note(quantized_unet, capsys):
    code = main(["build", "--model", str(quantized_unet), "--runtime", "torch", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["runtime"] == "torch" and data["precision"] == "fp32"
    assert any("FP32 PyTorch reference" in note for note in data["notes"])
    assert "note: --runtime torch runs the FP32 PyTorch reference" in err


def test_compare_with_fp32_says_it_is_ignored(quantized_unet, phantom_files, tmp_path, capsys):
    code = main(["segment", "--model", str(quantized_unet), "--input", str(phantom_files["image"]),
                 "--output", str(tmp_path / "l.nii.gz"), "--runtime", "onnxruntime", "--precision", "fp32",
                 "--compare", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["agreement_dice"] is None and data["fp32_seconds"] is None
    assert any("--compare is ignored with --precision fp32" in note for note in data["notes"])
    assert "note: --compare is ignored" in err


def test_compare_reports_the_fp32_time(quantized_unet, phantom_files, tmp_path, capsys):
    code = main(["segment", "--model", str(quantized_unet), "--input", str(phantom_files["image"]),
                 "--output", str(tmp_path / "l.nii.gz"), "--runtime", "onnxruntime", "--compare"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "onnxruntime int8:" in out and "onnxruntime fp32:" in out and "agreement Dice" in out
    fp32_line = next(line for line in out.splitlines() if "onnxruntime fp32:" in line)
    assert "s for the volume" in fp32_line and "ms per patch" in fp32_line


def test_compare_says_when_int8_does_not_pay_off(quantized_unet, phantom_files, tmp_path, capsys):
    code = main(["segment", "--model", str(quantized_unet), "--input", str(phantom_files["image"]),
                 "--output", str(tmp_path / "l.nii.gz"), "--runtime", "onnxruntime", "--compare", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    slower = data["fp32_latency_ms"] / data["latency_ms"] < 1.1  # this run's own timings decide
    assert any("does not pay off in speed" in w and "--runtime openvino" in w for w in data["warnings"]) == slower
    assert ("does not pay off in speed" in err) == slower


def test_cpu_float_reaches_workers_and_does_not_outlive_the_call(monkeypatch, tmp_path, capsys):
    """--cpu-float is set for the run (and forwarded to Ray workers' environment), then restored, so an
    in-process caller's next run does not inherit it."""
    from PTQLogic.app.cli import main
    from PTQLogic.cohort.cluster import _forwarded_env

    monkeypatch.delenv("PTQSEG_CPU_FLOAT", raising=False)
    assert main(["segment", "--model", str(tmp_path / "missing"), "--input", "x.nii.gz", "--output",
                 str(tmp_path / "y.nii.gz"), "--cpu-float", "bf16"]) != 0
    capsys.readouterr()
    assert "PTQSEG_CPU_FLOAT" not in os.environ
    monkeypatch.setenv("PTQSEG_CPU_FLOAT", "bf16")
    assert _forwarded_env() == {"PTQSEG_CPU_FLOAT": "bf16"}
