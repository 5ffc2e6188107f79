"""benchmarks/gpu/tensorrt_bench.py's GPU-free parts: which convolutions the "wide" INT8 variant keeps in FP16, and
which plans a work folder holds (the script itself needs TensorRT and a GPU; its results are in
benchmarks/results/h200-trt86/)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import tensorrt_bench as bench  # noqa: E402
import trt_layer_compare  # noqa: E402,F401


def test_narrow_convolutions_are_those_under_32_channels(tmp_path):
    from monai.networks.nets import UNet

    from PTQLogic.core.spec import spec_from_dict
    from PTQLogic.models.onnx_export import export_onnx

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [16, 32, 64], "strides": [2, 2],
              "num_res_units": 1, "norm": "BATCH"}
    torch.manual_seed(0)
    network = UNet(**kwargs).eval()
    spec = spec_from_dict({"name": "u", "architecture": "UNet", "kwargs": kwargs, "classes": ["a", "b", "c"],
                           "patch_size": [32, 32, 32]})
    fp32 = export_onnx(network, spec, tmp_path / "fp32.onnx").path
    layers = [m for m in network.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    narrow = [m for m in layers if min(m.in_channels, m.out_channels) < bench.NARROW]
    found = bench.narrow_convolutions(fp32)
    assert 0 < len(found) == len(narrow) < len(layers)


def test_variants_list_the_plans_of_a_work_folder(tmp_path):
    for folder in ("unet14-modelopt", "unet14-cpu", "unet14-wide"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "int8.onnx").write_bytes(b"")
    (tmp_path / "unet14-modelopt" / "fp32.onnx").write_bytes(b"")
    rows = bench.variants(tmp_path, None)
    assert [(label, precision) for label, _, precision in rows] == [
        ("unet14 fp32", "fp32"), ("unet14 fp16", "fp16"), ("unet14 int8 modelopt", "int8"),
        ("unet14 int8 cpu", "int8"), ("unet14 int8 wide", "int8")]
    assert rows[1][1] == tmp_path / "unet14-modelopt" / "fp32.onnx"  # FP16 plans are built from the FP32 graph
    assert bench.variants(tmp_path, ["ct_unet"]) == []
    both = bench.norm_variants(rows[:3], ["scaled", "fp32"])  # FP16/INT8 twice, FP32 once
    assert [(label, mode) for label, _, _, mode in both] == [
        ("unet14 fp32", "scaled"), ("unet14 fp16", "scaled"), ("unet14 fp16 normfp32", "fp32"),
        ("unet14 int8 modelopt", "scaled"), ("unet14 int8 modelopt normfp32", "fp32")]
    assert [row[:3] for row in bench.norm_variants(rows, ["scaled"])] == rows


def test_layer_compare_pairs_convolutions_across_plans():
    import trt_layer_compare as compare

    fused = "/model/model.0/conv/unit0/conv/Conv + /model/model.0/conv/unit0/adn/A/PRelu"
    assert compare.conv_nodes(fused) == ["/model/model.0/conv/unit0/conv/Conv"]
    assert compare.conv_nodes("/model/model.2/model.2.0/conv/ConvTranspose") == ["/model/model.2/model.2.0/conv/ConvTranspose"]
    assert compare.conv_nodes("Reformatting CopyNode for Input Tensor 0 to /x/PRelu") == []
    layers = {
        "unet14 fp16 level2": {"detail": [
            {"name": fused, "type": "CaskConvolution", "precision": "fp16", "ms_batch4": 0.30},
            {"name": "Reformatting CopyNode for Input Tensor 0 to " + fused, "type": "Reformat", "precision": "fp32",
             "ms_batch4": 0.05}]},
        "unet14 int8 modelopt level2": {"detail": [
            {"name": "input_QuantizeLinear", "type": "Scale", "precision": "fp32", "ms_batch4": 0.02},
            {"name": fused + " + /model/model.1/x_QuantizeLinear", "type": "CaskConvolution", "precision": "int8",
             "ms_batch4": 0.40}]},
        "ct_unet fp16 level2": {"detail": [{"name": fused, "type": "CaskConvolution", "ms_batch4": 9.0}]},
    }
    kinds = compare.time_by_kind(layers["unet14 fp16 level2"]["detail"])
    assert kinds["convolution"]["fp16"] == 0.30 and kinds["reformat"]["all"] == 0.05
    table = compare.conv_table({k: v["detail"] for k, v in layers.items() if k.startswith("unet14")})
    row = table["/model/model.0/conv/unit0/conv/Conv"]
    assert row["unet14 fp16 level2"]["ms"] == 0.30 and row["unet14 int8 modelopt level2"]["precision"] == "int8"
    text = compare.report({"layers": layers}, "unet14")
    assert "0.4000 int8" in text and "9.0" not in text  # another network's plan is not in this network's table
