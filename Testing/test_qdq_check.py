"""TensorRT Q/DQ rules on a real ModelOpt-quantized MONAI UNet and on hand-broken copies of it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from PTQLogic.core.errors import ModelError
from PTQLogic.models.onnx_export import export_onnx
from PTQLogic.models.torch_models import build_network
from PTQLogic.onnx_graph.qdq_check import check_qdq
from PTQLogic.quantization.quantize import quantize_onnx
from PTQLogic.core.spec import spec_from_dict

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> onnx.ModelProto:
    spec = spec_from_dict({"name": "tiny", "architecture": "UNet", "classes": ["bg", "a", "b"],
                           "kwargs": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
                           "patch_size": [16, 16, 16]})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qdq")
    fp32 = export_onnx(build_network(spec), spec, folder / "fp32.onnx").path
    calibration = np.random.default_rng(0).uniform(-1, 1, (3, 1, 16, 16, 16)).astype(np.float32)
    return onnx.load(str(quantize_onnx(fp32, calibration, folder / "int8.onnx").path))


def nodes(model, op_type):
    return [n for n in model.graph.node if n.op_type == op_type]


def set_initializer(model, name, array):
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def weight_dq(model, consumer_op="Conv"):
    consumers = {i: n for n in nodes(model, consumer_op) for i in n.input[1:2]}
    return next(dq for dq in nodes(model, "DequantizeLinear") if dq.output[0] in consumers)


def activation_q(model):
    return nodes(model, "QuantizeLinear")[0]


def test_modelopt_output_passes(int8_model):
    report = check_qdq(int8_model)
    assert report.ok, report.violations
    assert report.counts["Conv"]["quantized"] >= 2 and report.counts["ConvTranspose"]["quantized"] >= 1
    assert len(report.quantized) == sum(c.get("quantized", 0) for c in report.counts.values())
    # ModelOpt leaves small-channel convs (e.g. the 1-channel stem) in FP32: they must be listed with a reason.
    assert report.unquantized and all("not quantized" in r for r in report.unquantized.values())
    assert "OK for TensorRT" in report.summary() and "Conv:" in report.summary()
    assert set(report.to_dict()) >= {"ok", "violations", "quantized", "unquantized", "counts"}


def broken(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_non_zero_zero_point(int8_model):
    model = broken(int8_model)
    set_initializer(model, activation_q(model).input[2], np.array(3, np.int8))
    report = check_qdq(model)
    assert not report.ok and any("zero point is not 0" in v for v in report.violations)


def test_uint8_and_missing_zero_point(int8_model):
    model = broken(int8_model)
    set_initializer(model, activation_q(model).input[2], np.array(0, np.uint8))
    assert any("zero point type is UINT8" in v for v in check_qdq(model).violations)
    model = broken(int8_model)
    q = activation_q(model)  # without a zero point or output_dtype, QuantizeLinear produces uint8
    del q.input[2]
    assert any(v.startswith(q.name) and "no zero point" in v for v in check_qdq(model).violations)
    model = broken(int8_model)
    dq = weight_dq(model)  # an INT8 weight needs no zero point: DQ takes its type from its input
    del dq.input[2]
    assert not any(v.startswith(dq.name) for v in check_qdq(model).violations)


def test_wrong_per_channel_axis(int8_model):
    model = broken(int8_model)
    dq = weight_dq(model)
    dq.attribute.remove(next(a for a in dq.attribute if a.name == "axis"))
    dq.attribute.append(helper.make_attribute("axis", 1))
    report = check_qdq(model)
    assert not report.ok and any(v.startswith(dq.name) and "axis 1" in v for v in report.violations)


def test_negative_scale(int8_model):
    model = broken(int8_model)
    dq = weight_dq(model)
    scale = initializer(model, dq.input[1]).copy()
    scale[0] = -scale[0]
    set_initializer(model, dq.input[1], scale)
    assert any(v.startswith(dq.name) and "non-positive" in v for v in check_qdq(model).violations)


def test_per_channel_activation_scale(int8_model):
    model = broken(int8_model)
    q = activation_q(model)
    set_initializer(model, q.input[1], np.full(2, 0.1, np.float32))
    assert any(v.startswith(q.name) and "per-tensor" in v for v in check_qdq(model).violations)


def test_quantize_without_dequantize(int8_model):
    model = broken(int8_model)
    q = activation_q(model)
    dq = next(n for n in nodes(model, "DequantizeLinear") if n.input[0] == q.output[0])
    for node in model.graph.node:  # feed the INT8 tensor straight to the consumers
        for i, name in enumerate(node.input):
            if name == dq.output[0]:
                node.input[i] = q.output[0]
    model.graph.node.remove(dq)
    report = check_qdq(model)
    assert any(v.startswith(q.name) and "not followed only by DequantizeLinear" in v for v in report.violations)


def tiny_graph(op_type, weight_shape, axis, scale_len, attrs=None):
    """x -> Q -> DQ -> op(DQ(int8 weight, per-channel on ``axis``)) -> y."""
    weight = np.ones(weight_shape, np.int8)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(scale_len, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(scale_len, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.1, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz")]
    graph_nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xQ"),
                   helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="xDQ"),
                   helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wDQ", axis=axis),
                   helper.make_node(op_type, ["xd", "wd"], ["y"], name="op", **(attrs or {}))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(graph_nodes, "g", [x], [y], inits))


@pytest.mark.parametrize("second_user", ["conv", "graph-output", "none"])
def test_quantize_feeding_a_dequantize_and_something_else(second_user):
    """One Q whose INT8 tensor reaches a DQ and also a Conv (or leaves the graph): one DQ user is not enough."""
    model = tiny_graph("Conv", (3, 2, 1, 1, 1), 0, 3)
    if second_user == "conv":
        model.graph.node.append(helper.make_node("Conv", ["xq", "wd"], ["z"], name="rawConv"))
        model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    elif second_user == "graph-output":
        model.graph.output.append(helper.make_tensor_value_info("xq", TensorProto.INT8, None))
    report = check_qdq(model)
    rejected = [v for v in report.violations if v.startswith("xQ:")]
    assert rejected == ([] if second_user == "none" else
                        ["xQ: QuantizeLinear is not followed only by DequantizeLinear."]), report.violations
    assert report.ok == (second_user == "none") and "op" in report.quantized


@pytest.mark.parametrize("op_type, shape, axis, length, attrs, expect", [
    ("ConvTranspose", (2, 3, 2, 2, 2), 1, 3, None, "ok"),  # ModelOpt's choice
    ("ConvTranspose", (2, 3, 2, 2, 2), 0, 2, None, "note"),  # older TensorRT guidance
    ("Conv", (3, 2, 1, 1, 1), 0, 3, None, "ok"),
    ("Conv", (3, 3, 1, 1, 1), 1, 3, None, "violation"),
    ("MatMul", (4, 5), 1, 5, None, "ok"),
    ("MatMul", (4, 5), 0, 4, None, "violation"),
    ("Gemm", (5, 4), 0, 5, {"transB": 1}, "ok"),
    ("Gemm", (4, 5), 0, 4, None, "violation"),
])
def test_weight_axis_rules(op_type, shape, axis, length, attrs, expect):
    report = check_qdq(tiny_graph(op_type, shape, axis, length, attrs))
    assert report.ok == (expect != "violation"), report.violations
    assert bool(report.notes) == (expect == "note")
    if expect != "violation":
        assert report.quantized == ["op"] and report.counts[op_type] == {"total": 1, "quantized": 1}
    else:
        assert "needs the output-channel axis" in report.violations[0]


def test_unquantized_reasons_and_missing_file(tmp_path):
    model = tiny_graph("MatMul", (4, 5), 1, 5)
    model.graph.node[3].input[0] = "x"  # bypass the activation Q/DQ
    assert check_qdq(model).unquantized == {"op": "input not quantized"}
    model.graph.node[3].input[1] = "x"  # activation x activation product
    assert check_qdq(model).unquantized == {"op": "input not quantized; weight not constant"}
    model.graph.node.insert(0, helper.make_node("Identity", ["w"], ["w_shared"]))  # exporters' shared weights
    model.graph.node[4].input[1] = "w_shared"
    assert check_qdq(model).unquantized == {"op": "input not quantized; weight not quantized"}
    with pytest.raises(ModelError, match="does not exist"):
        check_qdq(tmp_path / "missing.onnx")


def test_int8_typed_qdq_without_zero_point_is_symmetric_int8():
    """ONNX takes DQ's type from its input (and Q's from output_dtype): no zero point is fine when that is int8."""
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3, 3), np.int8), "w_q")
    ws = numpy_helper.from_array(np.full((4,), 0.1, np.float32), "w_s")
    xs = numpy_helper.from_array(np.array(0.1, np.float32), "x_s")
    xz = numpy_helper.from_array(np.array(0, np.int8), "x_z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "x_s"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["wd"], name="wdq", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, ws, xs, xz])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    report = check_qdq(model)
    assert report.ok, report.violations
    assert report.quantized == ["conv"]
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 1, 3, 3, 3), np.uint8), "w_q"))
    assert any("uint8" in v for v in check_qdq(model).violations)
