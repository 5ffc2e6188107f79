"""The CPU an INT8 folder is made for is recorded, and segment says so when it runs on a CPU that saturates."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from PTQLogic.inference.input_checks import int8_target_warning
from conftest import ROOT, SAMPLE_UNET



def _no_vnni_cap() -> str:
    """An ONEDNN_MAX_CPU_ISA below VNNI that OpenVINO runs correctly here (AVX2 on AVX-512 Xeons gives NaNs)."""
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        return "AVX512_CORE" if " avx512f" in handle.read() else "AVX2"


AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": _no_vnni_cap()}  # no int8 dot products: cpu_int8_target() says "avx2"


@pytest.fixture
def avx2_only(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")


def test_warning_only_for_eight_bit_weights_on_a_cpu_without_int8_dot_products(avx2_only, monkeypatch):
    eight, seven = {"target_cpu": {"weight_bits": 8}}, {"target_cpu": {"weight_bits": 7}}
    assert "int8 dot-product" in int8_target_warning(eight, "m")
    assert int8_target_warning(seven, "m") is None
    assert int8_target_warning({}, "m") is None  # a folder from before the target was recorded
    assert "'nn'" in int8_target_warning({"folds": {"0": seven, "1": eight}}, "nn")  # nnU-Net: per fold
    import PTQLogic.core.sysinfo as sysinfo

    monkeypatch.setattr(sysinfo, "cpu_int8_target", lambda: "vnni")
    assert int8_target_warning(eight, "m") is None


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "PTQLogic", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_folder_for_vnni_records_its_target_and_warns_on_avx2(phantom_files, tmp_path):
    out = tmp_path / "vnni-int8"
    done = _cli("quantize", "--model", str(SAMPLE_UNET), "--calibration", *map(str, phantom_files["calibration"]),
                "--out", str(out), "--patches", "4", "--target-cpu", "vnni", "--json")
    assert done.returncode == 0, done.stderr
    target = json.loads((out / "quantization.json").read_text())["target_cpu"]
    assert target["requested"] == "vnni" and target["resolved"] == "vnni" and target["weight_bits"] == 8
    labels = tmp_path / "labels.nii.gz"
    done = _cli("segment", "--model", str(out), "--input", str(phantom_files["image"]), "--output", str(labels),
                "--runtime", "openvino", "--json", env=AVX2_ONLY)
    assert done.returncode == 0, done.stderr
    assert "quantized for CPUs with int8 dot-product instructions" in done.stderr
    assert any("--target-cpu avx2" in note for note in json.loads(done.stdout)["warnings"])
    assert labels.is_file()
