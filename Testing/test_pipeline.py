"""End to end on CPU: quantize sample networks, run INT8 on OpenVINO and ONNX Runtime, segment real CT."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from PTQLogic.app.benchmark import run_benchmark
from PTQLogic.app.cli import main
from PTQLogic.core.fileio import sha256_file
from PTQLogic.core.sysinfo import cpu_int8_target
from PTQLogic.io.volumes import read_volume
from PTQLogic.models.model_folder import open_model_dir
from PTQLogic.pipeline import quantize_model

from conftest import ROOT


@pytest.fixture(scope="module")
def quantized_segresnet(tmp_path_factory, phantom_files):
    out = tmp_path_factory.mktemp("models") / "segresnet-int8"
    quantize_model(ROOT / "PTQLogic" / "samples" / "data" / "phantom_segresnet.json", phantom_files["calibration"], out, num_patches=8)
    return out


def test_model_folder_contents(quantized_unet):
    model_dir = open_model_dir(quantized_unet)
    report = model_dir.report()
    assert report["qdq"]["ok"], report["qdq"]
    assert report["calibration"]["patches"] == 8
    assert model_dir.int8_onnx.stat().st_size <= 0.35 * model_dir.fp32_onnx.stat().st_size
    assert (quantized_unet / model_dir.spec().weights).is_file()  # self-contained
    assert not [p for p in quantized_unet.parent.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("sample", ["unet", "segresnet"])
def test_int8_keeps_dice_on_cpu_runtimes(sample, request, phantom_files, tmp_path):
    model = request.getfixturevalue("quantized_unet" if sample == "unet" else "quantized_segresnet")
    summary = run_benchmark(
        model, phantom_files["image"], tmp_path, runtimes=["openvino", "onnxruntime"],
        precisions=["fp32", "int8"], reference=phantom_files["truth"], repeats=1, warmup=0,
    )
    rows = {(r["runtime"], r["precision"]): r for r in summary["rows"]}
    assert set(rows) == {(rt, p) for rt in ("openvino", "onnxruntime") for p in ("fp32", "int8")}
    for runtime in ("openvino", "onnxruntime"):
        fp32, int8 = rows[runtime, "fp32"], rows[runtime, "int8"]
        assert fp32["dice"] > 0.85, fp32
        assert int8["dice"] >= fp32["dice"] - 0.01, (fp32, int8)
        assert int8["agreement_dice"] >= 0.98, int8
        assert int8["size_mb"] <= 0.35 * fp32["size_mb"]
    assert (tmp_path / "benchmark.md").read_text(encoding="utf-8").count("|") > 10
    assert (tmp_path / "latency_vs_size.png").stat().st_size > 1000
    guard = open_model_dir(model).report()["guard"]  # quantized with defaults: the guard was on and held
    assert guard["enforced"] and guard["met"] and guard["threshold"] == 0.98 and guard["agreement"] >= 0.98
    assert guard["isa"] == cpu_int8_target() and guard["runtime"] in ("openvino", "onnxruntime")


@pytest.mark.skipif(cpu_int8_target() == "avx2", reason="this CPU has no int8 dot products: the test above runs "
                    "OpenVINO on its AVX2 path already")
def test_int8_keeps_fp32_answer_on_emulated_avx2(phantom_files, tmp_path):
    """A folder made for AVX2 CPUs (7-bit weights) on this CPU and on OpenVINO with oneDNN capped below VNNI (what
    an AVX2-only CPU runs; AVX512_CORE, since ONEDNN_MAX_CPU_ISA=AVX2 breaks OpenVINO on AMX Xeons): agreement
    >= 0.98 on both, within 0.01 of each other."""
    import subprocess
    import sys

    from conftest import SAMPLE_UNET

    model = quantize_model(SAMPLE_UNET, phantom_files["calibration"], tmp_path / "avx2", num_patches=8,
                           target_cpu="avx2").model_dir

    script = ("import json, sys; from PTQLogic.pipeline import segment; "
              "o = segment(sys.argv[1], sys.argv[2], sys.argv[3], runtime='openvino', compare=True); "
              "print(json.dumps(o.agreement_dice))")
    agreements = []
    for cap in (None, "AVX512_CORE"):
        env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": cap} if cap else {})}
        done = subprocess.run([sys.executable, "-c", script, str(model), str(phantom_files["image"]),
                               str(tmp_path / f"{cap}.nii.gz")], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        agreements.append(float(done.stdout.strip().splitlines()[-1]))
    assert min(agreements) >= 0.98 and abs(agreements[0] - agreements[1]) <= 0.01, agreements


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime", "torch"])
def test_segment_real_ct_on_its_grid(runtime, quantized_unet, shared_data, tmp_path, capsys):
    ct = shared_data / "example_ct_sm.nii.gz"
    before = sha256_file(ct)
    output = tmp_path / "labels.nrrd"
    precision = "fp32" if runtime == "torch" else "int8"
    code = main(["segment", "--model", str(quantized_unet), "--input", str(ct), "--output", str(output),
                 "--runtime", runtime, "--precision", precision, "--json"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == runtime and result["precision"] == precision
    image, labels = read_volume(ct), read_volume(output)
    assert labels.array.shape == image.array.shape
    np.testing.assert_allclose(labels.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    assert labels.array.min() >= 0 and labels.array.max() < open_model_dir(quantized_unet).spec().num_classes
    table = json.loads((tmp_path / "labels.nrrd.labels.json").read_text())
    assert result["labels_json"] == str(tmp_path / "labels.nrrd.labels.json")
    assert table["labels"][0]["value"] == 0 and len(table["labels"]) == open_model_dir(quantized_unet).spec().num_classes
    assert sha256_file(ct) == before


def test_requantize_replaces_an_earlier_model_folder(quantized_unet, phantom_files, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(quantized_unet, folder)
    quantize_model(ROOT / "PTQLogic" / "samples" / "data" / "phantom_unet.json", phantom_files["calibration"], folder,
                   num_patches=2, seed=3)
    assert open_model_dir(folder).report()["calibration"] == {
        "volumes": 2, "patches": 2, "seed": 3, "method": "entropy", "inputs": [str(p) for p in phantom_files["calibration"]],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or backup folder left


def test_precision_auto_runs_the_int8_folder_on_a_cpu(quantized_unet, phantom_files, tmp_path):
    from PTQLogic.pipeline import segment

    outcome = segment(quantized_unet, phantom_files["image"], tmp_path / "labels.nii.gz", precision="auto")
    assert outcome.precision == "int8" and outcome.runtime in ("openvino", "onnxruntime")  # no TensorRT here
    assert (tmp_path / "labels.nii.gz").is_file()
