"""What the first real TensorRT run (8.6.0 on an H200, issue 23; benchmarks/results/h200-trt86/) showed, as tests of
PTQLogic's builder, graphs, layer report and precision choice (the stand-in and ONNX Runtime here; real TensorRT
where installed)."""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from PTQLogic.core.errors import ModelError
from PTQLogic.core.progress import Monitor
from PTQLogic.engines import tensorrt_engine as te
from PTQLogic.engines import tensorrt_runner as tr
from PTQLogic.engines.tensorrt_engine import make_fp16_onnx

from test_tensorrt import HAS_TENSORRT, _plan, artifacts, ort, standin  # noqa: F401 - fixtures shared with it


@pytest.mark.parametrize("version", ["8.6.1", "10.13.0.35"])
def test_plans_keep_layer_information_and_use_tensorrt_kernels_only(standin, artifacts, tmp_path, version):
    """Detailed verbosity lets the engine inspector say what runs in INT8; without cuBLAS/cuDNN tactics a plan needs
    neither library at run time (8.6.0 failed INT8 builds when it found an incompatible cuBLAS)."""
    trt = standin(version)
    assert te.build_recipe(trt, "int8")["tactic_sources"] == "tensorrt"
    plan = _plan(te.build_tensorrt_plan(artifacts["int8"], "int8", tmp_path / "int8.plan"))
    assert plan["profiling_verbosity"] == "DETAILED"
    assert plan["tactic_sources"] == ["EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"]


def test_plans_are_tuned_for_the_batch_the_pipeline_runs(standin, artifacts, tmp_path):
    trt = standin()
    plan, _ = te.cached_plan(artifacts["fp32"], "fp32", tmp_path / "engines", "Stand-in GPU", 8, Monitor())
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan.read_bytes())
    name = engine.get_tensor_name(0)
    assert [shape[0] for shape in engine.get_tensor_profile_shape(name, 0)] == [1, te.PIPELINE_BATCH, 8]
    assert tr._opt_batch(engine, name) == te.PIPELINE_BATCH == 4  # TensorRTEngine.preferred_batch
    small, _ = te.cached_plan(artifacts["fp32"], "fp32", tmp_path / "engines", "Stand-in GPU", 2, Monitor())
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(small.read_bytes())
    assert tr._opt_batch(engine, name) == 2  # never above the profile's maximum
    assert tr.windows_per_call(4, 14, (96, 96, 96)) == 4  # 50 MB of logits a window
    assert tr.windows_per_call(4, 118, (128, 128, 128)) == 1  # 990 MB a window: one at a time


def test_timing_caches_are_kept_per_network_and_not_on_tensorrt_8(standin, artifacts, tmp_path):
    """TensorRT 8.6.0 refused every timing cache it had saved once Myelin kernels were in it (two [E] lines per
    build, on the H200): "auto" keeps none on 8.x, and one per network and precision on 10+."""
    standin()
    engines = tmp_path / "engines"
    _, fp32 = te.cached_plan(artifacts["fp32"], "fp32", engines, "Stand-in GPU", 4, Monitor())
    _, int8 = te.cached_plan(artifacts["int8"], "int8", engines, "Stand-in GPU", 4, Monitor())
    assert fp32["timing_cache"] != int8["timing_cache"]
    with te.use_build_options(te.TensorRTBuildOptions(optimization_level=1)):  # the same network, a new plan
        _, again = te.cached_plan(artifacts["fp32"], "fp32", engines, "Stand-in GPU", 4, Monitor())
    assert again["from_cache"] is False and again["timing_cache"] == fp32["timing_cache"]
    assert Path(fp32["timing_cache"]).read_bytes() == b"TIMING:Stand-in GPU:2"  # loaded and grown, not replaced
    trt = standin("8.6.1")
    _, eight = te.cached_plan(artifacts["fp32"], "fp32", tmp_path / "engines-8", "Stand-in GPU", 4, Monitor())
    assert eight["timing_cache"] is None and not any(call[0] == "create_timing_cache" for call in trt.calls)
    explicit = tmp_path / "mine.cache"  # a path the user names is still used
    with te.use_build_options(te.TensorRTBuildOptions(timing_cache=str(explicit))):
        _, named = te.cached_plan(artifacts["int8"], "int8", tmp_path / "engines-8", "Stand-in GPU", 4, Monitor())
    assert named["timing_cache"] == str(explicit) and explicit.is_file()


def test_without_a_native_instancenorm_it_is_decomposed_for_tensorrt(standin, artifacts, tmp_path):
    """NVIDIA's 8.6.0 binding has no parser flag, and its InstanceNorm plugin needs cuDNN 8 ("Could not find any
    implementation for node .../InstanceNormalization" on the H200 without it): the plan gets elementary ops."""
    trt = standin("8.6.0")
    del trt.OnnxParserFlag  # as NVIDIA's own 8.6.0 binding
    assert te.build_recipe(trt, "fp32")["instancenorm"] == "decomposed, no fp16 guard"  # FP32 cannot overflow
    assert te.build_recipe(trt, "int8")["instancenorm"] == te.build_recipe(trt, "fp16")["instancenorm"] == "decomposed"
    ops = {precision: Counter(n.op_type for n in te._load_onnx_for(artifacts["fp32"], precision, False, True).graph.node)
           for precision in ("fp32", "fp16")}
    assert ops["fp32"]["ReduceMax"] == 0 and ops["fp16"]["ReduceMax"] == ops["fp16"]["ReduceMean"] / 2 > 0
    for precision in ("fp32", "int8"):
        plan = _plan(te.build_tensorrt_plan(artifacts[precision], precision, tmp_path / f"{precision}.plan"))
        assert plan["instancenorm"] is None  # the parser saw no InstanceNormalization node
    assert te.build_recipe(standin("8.6.1"), "fp32")["instancenorm"] == "native"
    from PTQLogic.engines.trt_graphs import decompose_instancenorm

    int8 = onnx.load(str(artifacts["int8"]))  # the Q/DQ graph computes the same with the norms decomposed
    decomposed = tmp_path / "int8-decomposed.onnx"
    onnx.save(decompose_instancenorm(int8), str(decomposed))
    torch.testing.assert_close(ort(decomposed, artifacts["batch"]), ort(artifacts["int8"], artifacts["batch"]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["UNet", "SegResNet"])  # InstanceNorm, and GroupNorm exported through it
def test_decomposed_instancenorm_computes_the_same(architecture, tmp_path):
    import onnxruntime

    from monai.networks.nets import SegResNet, UNet

    from PTQLogic.core.spec import spec_from_dict
    from PTQLogic.engines.trt_graphs import decompose_instancenorm
    from PTQLogic.models.onnx_export import export_onnx

    kwargs = ({"channels": [4, 8, 16], "strides": [2, 2]} if architecture == "UNet" else
              {"init_filters": 8, "blocks_down": [1, 2], "blocks_up": [1]})
    kwargs.update(spatial_dims=3, in_channels=1, out_channels=3)
    torch.manual_seed(0)
    network = (UNet if architecture == "UNet" else SegResNet)(**kwargs).eval()
    spec = spec_from_dict({"name": architecture, "architecture": architecture, "kwargs": kwargs,
                           "classes": ["background", "a", "b"], "patch_size": [32, 32, 32]})
    original = onnx.load(str(export_onnx(network, spec, tmp_path / "fp32.onnx").path))
    before = original.SerializeToString()
    decomposed = decompose_instancenorm(original)
    assert original.SerializeToString() == before  # input untouched
    onnx.checker.check_model(decomposed)
    ops = Counter(n.op_type for n in decomposed.graph.node)
    assert Counter(n.op_type for n in original.graph.node)["InstanceNormalization"] > 0
    assert ops["InstanceNormalization"] == 0 and ops["ReduceMean"] > 0
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32, 32)).astype(np.float32)

    def run(model):
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {model.graph.input[0].name: x})[0]

    expected = run(original)
    np.testing.assert_allclose(run(decomposed), expected, atol=1e-5 * np.abs(expected).max())
    unguarded = decompose_instancenorm(original, fp16_guard=False)  # FP32 plans: no ReduceMax
    assert Counter(n.op_type for n in unguarded.graph.node)["ReduceMax"] == 0 < ops["ReduceMax"]
    np.testing.assert_allclose(run(unguarded), expected, atol=1e-5 * np.abs(expected).max())
    if importlib.util.find_spec("onnxconverter_common") is not None:  # FP16 graphs: constants in the graph's type
        fp16 = onnx.load(str(make_fp16_onnx(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")))
        np.testing.assert_allclose(run(decompose_instancenorm(fp16)), run(fp16), atol=2e-2 * np.abs(expected).max())


def test_decomposing_needs_a_known_rank():
    from PTQLogic.engines.trt_graphs import decompose_instancenorm

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], name="norm")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones(2, np.float32), "s"), onnx.numpy_helper.from_array(np.zeros(2, np.float32), "b")])
    with pytest.raises(ModelError, match="rank of the input of 'norm'"):
        decompose_instancenorm(onnx.helper.make_model(graph))


def test_precision_auto_is_fp16_on_tensorrt_and_int8_on_cpus():
    import argparse

    from PTQLogic.app.cli import _resolve_precision
    from PTQLogic.cohort.runner import resolve_precision
    from PTQLogic.engines import choose_precision

    assert choose_precision("tensorrt")[0] == "fp16" and "1.10-1.13x at batch 4" in choose_precision("tensorrt")[1]
    assert choose_precision("openvino")[0] == choose_precision("onnxruntime")[0] == "int8"
    assert choose_precision("torch")[0] == "fp32"
    expected_auto = "fp16" if HAS_TENSORRT and torch.cuda.is_available() else "int8"
    assert choose_precision("auto")[0] == expected_auto
    args = dict(json=True, progress_lines=False, debug=False)
    assert _resolve_precision(argparse.Namespace(runtime="tensorrt", precision=None, **args)) == "fp16"
    assert _resolve_precision(argparse.Namespace(runtime="tensorrt", precision="int8", **args)) == "int8"
    assert _resolve_precision(argparse.Namespace(runtime="openvino", precision="auto", **args)) == "int8"
    assert resolve_precision("tensorrt", "auto") == "fp16" and resolve_precision("auto", None) == "int8"


def test_layer_summary_counts_what_runs_in_int8():
    from PTQLogic.engines.trt_layers import summarize_layers, tensor_precision

    def layer(name, kind, inputs, outputs):
        return {"Name": name, "LayerType": kind, "Inputs": [{"Format/Datatype": f} for f in inputs],
                "Outputs": [{"Format/Datatype": f} for f in outputs], "TacticName": "t"}

    int8 = "Thirty-two wide channel vectorized row major Int8 format"
    half = "Channel major FP16 format where channel % 8 == 0"
    information = {"Layers": [
        layer("Reformatting CopyNode for Input Tensor 0 to /conv1", "Reformat", ["Row major linear FP32 format"], [half]),
        layer("/conv1/Conv + /act1/PRelu", "CaskConvolution", [half], [half]),
        layer("/conv2/Conv", "CaskConvolution", [int8], [int8]),
        layer("/up/ConvTranspose", "CaskDeconvolution", [int8], [half]),
        "a layer given by name only"]}
    summary = summarize_layers(information)
    assert summary["layers"] == 5 and summary["convolutions"] == 3 and summary["reformats"] == 1
    assert summary["convolutions_by_precision"] == {"fp16": 1, "int8": 2}
    assert summary["by_precision"] == {"fp32": 1, "fp16": 1, "int8": 2, "unknown": 1}
    assert [tensor_precision(t) for t in (int8, half, "Float", "Bool")] == ["int8", "fp16", "fp32", "other"]
    from PTQLogic.engines.trt_layers import parse_oneline

    oneline = parse_oneline("Name: /down/conv/Conv + /down/act/PRelu, LayerType: CaskConvolution, Inputs: [ { Name: "
                            f"x, Dimensions: [1,16,48,48,48], Format/Datatype: {int8} }}], Outputs: [ {{ Name: y, "
                            f"Format/Datatype: {half} }}], TacticValue: 0x1")
    assert oneline["Name"] == "/down/conv/Conv + /down/act/PRelu" and oneline["LayerType"] == "CaskConvolution"
    assert summarize_layers({"Layers": [oneline]})["convolutions_by_precision"] == {"int8": 1}
    assert summarize_layers({"Layers": [oneline]})["detail"][0]["outputs"] == ["fp16"]


def test_quantizing_with_tensorrt_86_installed(standin, artifacts, tmp_path, monkeypatch):
    """ModelOpt checks for custom TensorRT ops with an implicit-batch network whenever TensorRT imports; TensorRT
    8.6's parser rejects that and every quantize failed on the GPU machine. The check is off for TensorRT < 10."""
    from modelopt.onnx import trt_utils

    from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx
    from test_engines import smooth_patches

    monkeypatch.setattr(trt_utils, "trt", standin("8.6.0"), raising=False)
    monkeypatch.setattr(trt_utils, "TRT_PYTHON_AVAILABLE", True)
    out = quantize_onnx(artifacts["fp32"], smooth_patches(4, 3), tmp_path / "int8.onnx", QuantizeSettings()).path
    assert out.is_file() and trt_utils.TRT_PYTHON_AVAILABLE is True  # restored afterwards


def test_layer_precision_comes_from_the_kernel_names_where_the_inspector_gives_no_formats():
    """TensorRT 8.6.0's inspector wrote "N/A due to dynamic shapes" for every tensor format of the H200 plans (a batch
    range): the layer report read all as "other". The kernel names say it: of the 96^3 UNet-BN's 23 convolutions,
    the INT8 plan ran 5 in INT8, 17 in FP16 (INT8 weights widened to FP16), 1 in FP32."""
    import json
    from pathlib import Path

    from PTQLogic.engines.trt_layers import summarize_layers, tactic_precision

    assert tactic_precision("sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs") == "int8"
    assert tactic_precision("sm80_xmma_fprop_implicit_gemm_indexed_wo_smem_f16f16_f16f16_f16_nhwckrsc") == "fp16"
    assert tactic_precision("sm80_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw") == "fp32"
    assert tactic_precision("0x0000000000000000") is None
    runs = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h200-trt86" / "2026-12-05-run2"
    int8 = summarize_layers(json.loads((runs / "unet14_int8_modelopt_level2.json").read_text(), strict=False))
    fp16 = summarize_layers(json.loads((runs / "unet14_fp16_level2.json").read_text(), strict=False))
    assert int8["convolutions_by_precision"] == {"int8": 5, "fp16": 17, "fp32": 1}
    assert fp16["convolutions_by_precision"] == {"fp16": 21, "fp32": 2}
    residual = [r for r in int8["detail"] if r["precision"] == "int8"]
    assert all("residual/Conv" in r["name"] and r["weights"] == "Int8" and r["precision_from"] == "tactic"
               for r in residual)
    widened = [r for r in int8["detail"] if r["type"] == "CaskConvolution" and r["precision"] == "fp16"]
    assert widened and all(r["weights"] == "Half" for r in widened)  # Q/DQ'd convolutions run in FP16
