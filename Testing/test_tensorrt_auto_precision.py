"""--precision auto on TensorRT knows the model: the fourth real TensorRT 8.6.0 run (an H100, issue 23;
benchmarks/results/h100-trt86/2026-12-05-run4/) measured SegResNet, whose norms that TensorRT decomposes, at
10.7 / 24.4 ms (batch 1 / 4) in FP32, 41.0 / 55.4 ms in FP16 and 303 / 591 ms in INT8, so auto picks FP32 for
such a model there and FP16 otherwise (stand-in TensorRT here; the real one where installed)."""
from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import onnx
import pytest

from PTQLogic.engines import TENSORRT_AUTO_PRECISION, TENSORRT_DECOMPOSED_NORM_PRECISION, choose_precision
from PTQLogic.engines import tensorrt_engine as te
from PTQLogic.inference.segmenters import model_onnx_files

from test_tensorrt import artifacts, standin  # noqa: F401 - fixtures shared with it


def _conv_only(path):
    """A one-convolution ONNX: nothing for TensorRT to decompose."""
    weight = onnx.numpy_helper.from_array(np.ones((2, 1, 1, 1, 1), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _folders(tmp_path, norm_onnx):
    """A quantized folder, a quantized nnU-Net folder (fold_0) and a parts file naming both."""
    plain, nnunet = tmp_path / "plain", tmp_path / "nnunet"
    (nnunet / "fold_0").mkdir(parents=True)
    plain.mkdir()
    _conv_only(plain / "fp32.onnx")
    (nnunet / "fold_0" / "fp32.onnx").write_bytes(norm_onnx.read_bytes())
    parts = tmp_path / "parts.json"
    parts.write_text(json.dumps({"parts": ["plain", "nnunet"]}))
    return plain, nnunet, parts


def test_model_onnx_files_finds_what_segment_runs(artifacts, tmp_path):
    plain, nnunet, parts = _folders(tmp_path, artifacts["fp32"])
    assert model_onnx_files(plain) == [plain / "fp32.onnx"]
    assert model_onnx_files(str(nnunet)) == [nnunet / "fold_0" / "fp32.onnx"]
    assert model_onnx_files(parts) == [plain / "fp32.onnx", nnunet / "fold_0" / "fp32.onnx"]
    assert model_onnx_files([plain, artifacts["fp32"]]) == [plain / "fp32.onnx", artifacts["fp32"]]
    assert model_onnx_files(tmp_path / "missing") == [] and model_onnx_files(tmp_path / "missing.json") == []
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2]")
    assert model_onnx_files(broken) == []


def test_auto_picks_fp32_where_this_tensorrt_decomposes_the_models_norms(standin, artifacts, tmp_path):
    plain, nnunet, parts = _folders(tmp_path, artifacts["fp32"])
    trt = standin("8.6.0")
    del trt.OnnxParserFlag  # NVIDIA's own 8.6.0 binding: no native InstanceNorm
    assert choose_precision("tensorrt", model_onnx_files(nnunet)) == TENSORRT_DECOMPOSED_NORM_PRECISION
    assert choose_precision("tensorrt", model_onnx_files(parts))[0] == "fp32"  # one part has norms
    assert choose_precision("tensorrt", model_onnx_files(plain)) == TENSORRT_AUTO_PRECISION  # no norm: FP16
    assert choose_precision("tensorrt") == TENSORRT_AUTO_PRECISION  # model unknown (info)
    assert "10.7 / 24.4 ms" in TENSORRT_DECOMPOSED_NORM_PRECISION[1]
    assert choose_precision("openvino", model_onnx_files(nnunet))[0] == "int8"  # CPUs: unchanged
    standin("8.6.1")  # a native InstanceNorm: nothing is decomposed, FP16 again
    assert choose_precision("tensorrt", model_onnx_files(nnunet)) == TENSORRT_AUTO_PRECISION


def test_cli_auto_precision_says_why_it_runs_fp32(standin, artifacts, tmp_path, capsys):
    from PTQLogic.app.cli import _resolve_precision

    _, nnunet, _ = _folders(tmp_path, artifacts["fp32"])
    trt = standin("8.6.0")
    del trt.OnnxParserFlag
    args = dict(json=False, progress_lines=False, debug=False)

    def resolve(precision):
        return _resolve_precision(argparse.Namespace(runtime="tensorrt", precision=precision, model=str(nnunet), **args))

    assert resolve(None) == "fp32"
    assert "no native InstanceNormalization" in capsys.readouterr().err
    assert resolve("fp16") == "fp16"


def test_int8_warning_points_to_fp32(standin, artifacts):
    trt = standin("8.6.0")
    del trt.OnnxParserFlag
    with pytest.warns(RuntimeWarning, match="303 ms per 96³ window.*use FP32"):
        te._load_onnx_for(artifacts["int8"], "int8", strong=False, decompose_norms=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        te._load_onnx_for(artifacts["fp32"], "fp32", strong=False, decompose_norms=True)


def test_fp32_norms_build_option_constrains_exactly_the_norms(standin, artifacts, tmp_path):
    """norms="fp32" (opt-in, for the next GPU run): FP16/INT8 plans of a decomposed-norm model drop the FP16
    overflow scale (the ReduceMax that took 491 of INT8's 592 ms) and constrain every layer of the norms, and
    only those, to FP32 with TensorRT's PREFER_PRECISION_CONSTRAINTS flag."""
    from PTQLogic.engines.trt_graphs import DECOMPOSED_NORM_MARK

    trt = standin("8.6.0")
    del trt.OnnxParserFlag
    norms = {n.name for n in onnx.load(str(artifacts["fp32"])).graph.node if n.op_type == "InstanceNormalization"}
    options = te.TensorRTBuildOptions(norms="fp32")
    assert te.build_recipe(trt, "fp16", options)["instancenorm"] == "decomposed, fp32 layers"
    assert te.build_recipe(trt, "fp32", options)["instancenorm"] == "decomposed, no fp16 guard"  # FP32 already
    assert te.build_recipe(standin("8.6.1"), "fp16", options)["instancenorm"] == "native"  # nothing decomposed
    trt = standin("8.6.0")
    del trt.OnnxParserFlag
    with te.use_build_options(options):
        plans = {p: _plan_of(te.build_tensorrt_plan(artifacts["int8" if p == "int8" else "fp32"], p,
                                                    tmp_path / f"{p}.plan")) for p in ("fp16", "int8")}
        fp32_plan = _plan_of(te.build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "fp32.plan"))
    for precision, plan in plans.items():
        source = artifacts["int8" if precision == "int8" else "fp32"]
        graph = te._load_onnx_for(source, precision, False, decompose_norms=True, fp32_norms=True).graph
        marked = {n.name for n in graph.node if n.doc_string == DECOMPOSED_NORM_MARK}
        assert len(marked) > 0 and all(any(name.startswith(norm + "_") for norm in norms) for name in marked)
        assert "PREFER_PRECISION_CONSTRAINTS" in plan["flags"], precision
        assert "ReduceMax" not in plan["op_types"] and "ReduceMean" in plan["op_types"]
        assert set(plan["fp32_layers"]) == marked and plan["constrained_layers"] == len(marked)
    assert "PREFER_PRECISION_CONSTRAINTS" not in fp32_plan["flags"] and fp32_plan["constrained_layers"] == 0
    default = _plan_of(te.build_tensorrt_plan(artifacts["fp32"], "fp16", tmp_path / "default.plan"))
    assert "ReduceMax" in default["op_types"] and default["constrained_layers"] == 0  # "scaled", the default
    assert "PREFER_PRECISION_CONSTRAINTS" not in default["flags"]
    with pytest.raises(Exception, match="norms must be 'scaled' or 'fp32'"):
        te.TensorRTBuildOptions(norms="bf16")


def test_decomposed_norms_compute_the_same_with_and_without_the_scale(artifacts):
    """What the fp32 option builds from: the unscaled decomposition equals the scaled one and the original
    InstanceNormalization (ONNX Runtime, FP32)."""
    import onnxruntime

    from PTQLogic.engines.trt_graphs import decompose_instancenorm

    model = onnx.load(str(artifacts["fp32"]))
    x = artifacts["batch"].numpy() if hasattr(artifacts["batch"], "numpy") else np.asarray(artifacts["batch"])

    def run(m):
        session = onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]

    reference = run(model)
    for guard in (True, False):
        np.testing.assert_allclose(run(decompose_instancenorm(model, fp16_guard=guard)), reference, atol=1e-4)


def _plan_of(path):
    return json.loads(path.read_bytes())
