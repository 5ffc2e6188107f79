"""TensorRT helpers (testable anywhere) and TensorRT engines (only with TensorRT and a CUDA GPU)."""
from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from PTQLogic.engines.onnxruntime_engine import OnnxRuntimeEngine
from PTQLogic.engines.tensorrt_engine import dq_only_to_qdq, make_fp16_onnx
from PTQLogic.errors import EngineUnavailable

from test_engines import tiny_artifacts

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                               reason="needs TensorRT and a CUDA GPU")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("tensorrt"))


def ort(path, batch):
    return OnnxRuntimeEngine(path, "fp32", threads=2)(batch)


def test_module_imports_without_tensorrt():
    from PTQLogic.engines import tensorrt_engine

    if not HAS_TENSORRT:
        with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
            tensorrt_engine.import_tensorrt()


def test_make_fp16_onnx(artifacts, tmp_path):
    dst = make_fp16_onnx(artifacts["fp32"], tmp_path / "fp16.onnx")
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    types = Counter(onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer)
    assert types["FLOAT16"] > 0 and types["FLOAT"] == 0, types
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    fp32_out, fp16_out = ort(artifacts["fp32"], artifacts["batch"]), ort(dst, artifacts["batch"])
    assert fp16_out.dtype == torch.float32
    error = (fp16_out - fp32_out).abs().max().item()
    assert 0 < error < 2e-2 * fp32_out.abs().max().item()  # FP16 arithmetic: close, not identical
    assert dst.stat().st_size < 0.7 * artifacts["fp32"].stat().st_size
    assert list(tmp_path.iterdir()) == [dst]  # atomic: no temporary left


def test_dq_only_to_qdq_keeps_the_numbers(artifacts, tmp_path):
    original = onnx.load(str(artifacts["int8"]))
    before = original.SerializeToString()
    int8_weights = {i.name for i in original.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    weight_dqs = [n for n in original.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights]
    assert weight_dqs, "the ModelOpt model should be DQ-only (INT8 weight initializers)"

    converted = dq_only_to_qdq(original)
    assert original.SerializeToString() == before  # input untouched
    onnx.checker.check_model(converted)
    inits = {i.name: i for i in converted.graph.initializer}
    ops = Counter(n.op_type for n in converted.graph.node)
    assert ops["QuantizeLinear"] == Counter(n.op_type for n in original.graph.node)["QuantizeLinear"] + len(weight_dqs)
    producers = {o: n for n in converted.graph.node for o in n.output}
    for dq in (n for n in converted.graph.node if n.op_type == "DequantizeLinear"):
        assert dq.input[0] not in inits or inits[dq.input[0]].data_type != onnx.TensorProto.INT8
        q = producers[dq.input[0]]
        assert q.op_type == "QuantizeLinear" and list(q.input[1:]) == list(dq.input[1:])
        weight = inits.get(q.input[0])
        if weight is not None:  # a weight: FP32 initializer quantized with the same scale/axis
            assert weight.data_type == onnx.TensorProto.FLOAT
            assert [a.i for a in q.attribute if a.name == "axis"] == [a.i for a in dq.attribute if a.name == "axis"]

    path = tmp_path / "qdq.onnx"
    onnx.save(converted, str(path))
    batch = artifacts["batch"]
    torch.testing.assert_close(ort(path, batch), ort(artifacts["int8"], batch), atol=1e-5, rtol=1e-5)
    assert not {dq.input[0] for dq in weight_dqs} & set(inits)  # INT8 weights replaced by their FP32 values


def test_dq_only_to_qdq_leaves_float_models_alone(artifacts):
    fp32 = onnx.load(str(artifacts["fp32"]))
    assert dq_only_to_qdq(fp32).SerializeToString() == fp32.SerializeToString()


# ---- real TensorRT (skipped without TensorRT + CUDA) ----

@needs_gpu
def test_fp32_and_int8_plans_agree(artifacts, tmp_path):
    from PTQLogic.engines.tensorrt_engine import TensorRTEngine, build_tensorrt_plan

    batch = artifacts["batch"].cuda()
    reference = ort(artifacts["fp32"], artifacts["batch"])
    fp32_plan = build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "fp32.plan", max_batch=4,
                                    timing_cache_path=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    fp32 = TensorRTEngine(fp32_plan, "fp32")
    out = fp32(batch)
    assert out.is_cuda and out.shape == reference.shape
    torch.testing.assert_close(out.cpu(), reference, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fp32(batch[1:2]).cpu()[0], out.cpu()[1], atol=1e-3, rtol=1e-3)  # dynamic batch

    int8_plan = build_tensorrt_plan(artifacts["int8"], "int8", tmp_path / "int8.plan",
                                    timing_cache_path=tmp_path / "timing.cache")
    int8_out = TensorRTEngine(int8_plan, "int8")(batch).cpu()
    agreement = (int8_out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.95 and (int8_out - reference).abs().max().item() > 1e-3

    again = TensorRTEngine(fp32_plan, "fp32")  # a second deserialization of the same plan
    torch.testing.assert_close(again(batch), out)


@needs_gpu
def test_create_engine_caches_plans(artifacts, tmp_path):
    from PTQLogic.engines import create_engine

    paths = dict(fp32_onnx=artifacts["fp32"], int8_onnx=artifacts["int8"], cache_dir=tmp_path / "engines")
    first = create_engine("tensorrt", "int8", **paths)
    plans = sorted((tmp_path / "engines").glob("*.plan"))
    assert len(plans) == 1 and first.info.path == str(plans[0])
    mtime = plans[0].stat().st_mtime_ns
    second = create_engine("tensorrt", "int8", **paths)
    assert second.info.path == first.info.path and plans[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    fp16 = create_engine("tensorrt", "fp16", **paths)
    reference = ort(artifacts["fp32"], artifacts["batch"])
    out = fp16(artifacts["batch"].cuda()).cpu()
    assert (out.argmax(1) == reference.argmax(1)).float().mean().item() >= 0.98
    assert len(list((tmp_path / "engines").glob("*.plan"))) == 2


@needs_gpu
def test_foreign_plan_is_unavailable(tmp_path):
    from PTQLogic.engines.tensorrt_engine import TensorRTEngine

    bad = tmp_path / "foreign.plan"
    bad.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(EngineUnavailable, match="rebuild"):
        TensorRTEngine(bad, "fp32")
