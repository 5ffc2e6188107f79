"""What the third real TensorRT 8.6.0 run (an H100, issue 23; benchmarks/results/h100-trt86/2026-12-05-run3/)
showed, as tests of PTQLogic's TensorRT graphs (ONNX Runtime and the stand-in here; real TensorRT where installed):
SegResNet's INT8 plan failed on its quantized trilinear Resize, and INT8 with decomposed InstanceNorms lost
agreement."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from PTQLogic.engines import tensorrt_engine as te
from PTQLogic.engines.trt_graphs import dequantize_interpolation_inputs, dq_only_to_qdq

from test_engines import smooth_patches
from test_tensorrt import _plan, artifacts, standin  # noqa: F401 - fixtures shared with it


def _run_all(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _run_all(model, x)[0]


def _feeds_of_resizes(model: onnx.ModelProto) -> list[str]:
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return [producers.get(node.input[0], "input") for node in model.graph.node if node.op_type == "Resize"]


@pytest.fixture(scope="module")
def segresnet(tmp_path_factory):
    """A small SegResNet quantized as `quantize` does: ModelOpt puts a Q/DQ pair before its trilinear upsampling."""
    from monai.networks.nets import SegResNet

    from PTQLogic.core.spec import spec_from_dict
    from PTQLogic.models.onnx_export import export_onnx
    from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx

    folder = tmp_path_factory.mktemp("segresnet")
    kwargs = dict(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=[1, 2], blocks_up=[1])
    torch.manual_seed(0)
    spec = spec_from_dict({"name": "segresnet", "architecture": "SegResNet", "kwargs": kwargs,
                           "classes": ["background", "a", "b"], "patch_size": [16, 16, 16]})
    fp32 = export_onnx(SegResNet(**kwargs).eval(), spec, folder / "fp32.onnx").path
    int8 = quantize_onnx(fp32, smooth_patches(8, 1), folder / "int8.onnx", QuantizeSettings()).path
    return {"fp32": fp32, "int8": int8}


def test_no_quantized_tensor_reaches_a_trilinear_resize(segresnet):
    """TensorRT 8.6.0: "Could not find any implementation for node /up_samples.0/.../Resize" for SegResNet's INT8
    plan (FP32 and FP16 built). Without the pair the Resize reads the convolution's float output."""
    original = dq_only_to_qdq(onnx.load(str(segresnet["int8"])))
    assert _feeds_of_resizes(original) == ["DequantizeLinear"]
    before = original.SerializeToString()
    rewritten = dequantize_interpolation_inputs(original)
    assert original.SerializeToString() == before  # input untouched
    onnx.checker.check_model(rewritten)
    assert _feeds_of_resizes(rewritten) == ["Conv"]
    ops, ops_before = Counter(n.op_type for n in rewritten.graph.node), Counter(n.op_type for n in original.graph.node)
    assert (ops_before - ops) == Counter({"QuantizeLinear": 1, "DequantizeLinear": 1})  # nothing else dropped
    read = {name for node in rewritten.graph.node for name in node.input}
    assert all(init.name in read for init in rewritten.graph.initializer)  # the pair's scale and zero point went too

    x = smooth_patches(4, 5)
    fp32, int8, new = _run(onnx.load(str(segresnet["fp32"])), x), _run(original, x), _run(rewritten, x)
    assert 0 < np.abs(new - int8).max() < 0.1 * np.abs(fp32).max()  # one rounding step less, nothing more
    assert np.abs(new - fp32).mean() <= np.abs(int8 - fp32).mean()
    assert (new.argmax(1) == int8.argmax(1)).mean() > 0.99


def test_nearest_resizes_and_shared_pairs_stay():
    """Only interpolating Resizes are rewritten; a DQ that a convolution also reads is kept for it."""
    def node(op, inputs, output, **attrs):
        return onnx.helper.make_node(op, inputs, [output], name=output, **attrs)

    scale, zero = onnx.numpy_helper.from_array(np.float32(0.1), "s"), onnx.numpy_helper.from_array(np.int8(0), "z")
    weight = onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1, 1), np.float32), "w")
    roi, scales = onnx.numpy_helper.from_array(np.zeros(0, np.float32), "roi"), onnx.numpy_helper.from_array(
        np.array([1, 1, 2, 2, 2], np.float32), "scales")
    graph = onnx.helper.make_graph(
        [node("QuantizeLinear", ["x", "s", "z"], "q"), node("DequantizeLinear", ["q", "s", "z"], "dq"),
         node("Resize", ["dq", "roi", "scales"], "nearest"),
         node("Resize", ["dq", "roi", "scales"], "linear", mode="linear"),
         node("Conv", ["dq", "w"], "conv")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 2, 2, 2])],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in ("nearest", "linear", "conv")],
        [scale, zero, weight, roi, scales])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    rewritten = dequantize_interpolation_inputs(model)
    inputs = {n.name: list(n.input) for n in rewritten.graph.node}
    assert inputs["linear"][0] == "x" and inputs["nearest"][0] == "dq" and inputs["conv"][0] == "dq"
    assert {"q", "dq"} <= set(inputs) and len(rewritten.graph.initializer) == 5
    x = np.random.default_rng(0).normal(size=(1, 1, 2, 2, 2)).astype(np.float32)
    got, expected = _run_all(rewritten, x), _run_all(model, x)
    np.testing.assert_array_equal(got[0], expected[0])  # nearest: still on the quantized values
    np.testing.assert_array_equal(got[2], expected[2])  # the convolution too
    np.testing.assert_allclose(got[1], _run(_without_pair(model), x), atol=1e-6)  # linear: on x itself


def _without_pair(model: onnx.ModelProto) -> onnx.ModelProto:
    """Just the linear Resize on the float input: what the rewritten one must compute."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Resize", ["x", "roi", "scales"], ["linear"], mode="linear")], "g",
        list(model.graph.input), [onnx.helper.make_tensor_value_info("linear", onnx.TensorProto.FLOAT, None)],
        [i for i in model.graph.initializer if i.name in ("roi", "scales")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def test_int8_plans_on_tensorrt_8_get_the_rewritten_graph(standin, segresnet, tmp_path):
    trt = standin("8.6.0")
    assert "no Q/DQ before linear Resize" in te.build_recipe(trt, "int8")["graph"]
    plan = _plan(te.build_tensorrt_plan(segresnet["int8"], "int8", tmp_path / "int8.plan"))
    assert plan["dequantized_interpolations"] == []
    strong = te._load_onnx_for(segresnet["int8"], "int8", strong=True)  # 10+: typed graphs, left as quantized
    assert _feeds_of_resizes(strong) == ["DequantizeLinear"]


def test_int8_with_decomposed_instancenorms_warns(standin, artifacts, tmp_path):
    """On the H100, TensorRT 8.6.0's INT8 plan of the tiny InstanceNorm UNet (norms decomposed) agreed 0.929 with
    FP32, where ONNX Runtime runs the same INT8 file at 0.999 (test_tensorrt_real.log of that run)."""
    trt = standin("8.6.0")
    del trt.OnnxParserFlag  # as NVIDIA's own 8.6.0 binding: no native InstanceNorm
    with pytest.warns(RuntimeWarning, match="no native InstanceNormalization.*0.929"):
        te.build_tensorrt_plan(artifacts["int8"], "int8", tmp_path / "int8.plan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FP32/FP16 plans, and INT8 where the norm is native, say nothing
        te.build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "fp32.plan")
        te.build_tensorrt_plan(artifacts["fp32"], "fp16", tmp_path / "fp16.plan")
        standin("8.6.1")
        te.build_tensorrt_plan(artifacts["int8"], "int8", tmp_path / "int8-native.plan")


@pytest.mark.slow
def test_the_onnx_runtime_reference_for_the_failed_real_test(tmp_path):
    """benchmarks/gpu/tiny_unet_reference.py: ONNX Runtime keeps the small UNet's INT8 answer (0.999) with the norms
    decomposed and with FP16 elsewhere, so the 0.929 of TensorRT 8.6.0 is TensorRT's, not the file's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "tiny_unet_reference.py"
    out = tmp_path / "reference.json"
    done = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(row["agreement_with_fp32"] > 0.995 for row in rows.values()), rows
    assert rows["int8, Q/DQ weights, norms decomposed"] == pytest.approx(rows["int8"], abs=1e-4)
