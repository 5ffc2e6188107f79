"""Padding convolution chains to 16 channels for OpenVINO: exact, and only where it is safe."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from monai.networks.nets import UNet
from onnx import TensorProto, helper, numpy_helper

from PTQLogic.onnx_graph.qdq_check import check_qdq
from PTQLogic.onnx_graph.channel_padding import pad_channels
from PTQLogic.onnx_graph.graph_prep import prepare_for_int8
from PTQLogic.quantization.placement import quantize_cpu


def _export(net: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.onnx.export(net.eval(), torch.randn(*shape), str(path), opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return path


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _weight_shapes(model: onnx.ModelProto, op_type: str) -> list[tuple[int, ...]]:
    inits = {t.name: t for t in model.graph.initializer}
    return [tuple(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == op_type]


def _trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """Random norm statistics and affine parameters, so padding cannot hide behind default values."""
    torch.manual_seed(1)
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm3d, torch.nn.InstanceNorm3d)) and module.affine:
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return net


CLASSES = 12  # the top up-block carries one channel per class at full resolution: 12 -> 16


def _unet(norm) -> torch.nn.Module:
    torch.manual_seed(0)
    return _trained_like(UNet(3, 1, CLASSES, (16, 32, 64), (2, 2), num_res_units=2, norm=norm))


@pytest.fixture(scope="module", params=["instance", "batch"])
def unet_fp32(request, tmp_path_factory) -> Path:
    norm = ("instance", {"affine": True}) if request.param == "instance" else "batch"
    return _export(_unet(norm), (1, 1, 16, 16, 16), tmp_path_factory.mktemp("pad") / f"unet_{request.param}.onnx")


def test_padding_the_top_block_is_exact_and_the_extra_channels_hold_zeros(unet_fp32):
    model = onnx.load(str(unet_fp32))
    prepare_for_int8(model, fold_residual=True)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    assert pad_channels(model) == 1
    assert (32, 16, 3, 3, 3) in _weight_shapes(model, "ConvTranspose")  # 12 -> 16 output channels
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    logits_conv = model.graph.node[-1]
    assert logits_conv.op_type == "Conv" and inits[logits_conv.input[1]].shape == (CLASSES, 16, 3, 3, 3)
    assert not inits[logits_conv.input[1]][:, CLASSES:].any()  # the logits conv ignores the extra channels
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).uniform(-1, 2, (2, 1, 16, 16, 16)).astype(np.float32)
    expected, padded = _run(reference, x), _run(model, x)
    assert padded.shape == expected.shape == (2, CLASSES, 16, 16, 16)
    np.testing.assert_allclose(padded, expected, atol=1e-5, rtol=1e-5)
    # every tensor of the padded chain: 16 channels, the extra ones exact zeros (so no activation range moves)
    producer = {o: n for n in model.graph.node for o in n.output}
    chain, name = [], logits_conv.input[0]
    while producer[name].op_type != "ConvTranspose":
        chain.append(name)
        name = producer[name].input[0]
    chain.append(name)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in chain)
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(chain, {session.get_inputs()[0].name: x})
    assert len(values) >= 2 and all(v.shape[1] == 16 and not v[:, CLASSES:].any() for v in values)
    assert all(np.abs(v[:, :CLASSES]).max() > 0 for v in values)


def test_chains_ending_in_an_output_a_non_conv_op_or_read_twice_stay_as_they_are(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv3d(1, 12, 3, padding=1)  # -> relu -> network output: must keep 12 channels
            self.b = torch.nn.Conv3d(1, 12, 3, padding=1)  # -> relu -> Add (not a conv)
            self.c = torch.nn.Conv3d(1, 12, 3, padding=1)  # -> relu -> a conv and an Add
            self.d = torch.nn.Conv3d(12, 12, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.a(x))
            c = torch.relu(self.c(x))
            return a, self.d(torch.relu(self.b(x)) + 1.0), self.d(c) + c

    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 1, 8, 8, 8), str(path), opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    before = model.SerializeToString()
    assert pad_channels(model) == 0
    assert model.SerializeToString() == before


def test_shared_weights_are_copied_not_modified(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Conv3d(1, 12, 3, padding=1)
            self.head = torch.nn.Conv3d(12, 2, 3, padding=1)

        def forward(self, x):  # the head's weight is read twice: on the padded chain and on a 12-channel tensor
            return self.head(torch.relu(self.up(x))) + self.head(x.repeat(1, 12, 1, 1, 1))

    path = tmp_path / "shared.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 1, 8, 8, 8), str(path), opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    reference = onnx.load(str(path))
    originals = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    assert pad_channels(model) == 1
    for tensor in model.graph.initializer:
        if tensor.name in originals:
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), originals[tensor.name])
    x = np.random.default_rng(1).normal(size=(1, 1, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(reference, x), atol=1e-5)


def _chain_model(channels: int = 12, epsilon: float = 1e-5, initializers_as_inputs: bool = False,
                 output: str = "y", if_node: bool = False) -> onnx.ModelProto:
    """Conv -> InstanceNorm -> Relu -> Conv in 2D, built node by node."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("w1", rng.normal(size=(channels, 2, 3, 3))), ("b1", rng.normal(size=channels)),
        ("s", rng.uniform(0.5, 1.5, channels)), ("bb", rng.normal(size=channels)),
        ("w2", rng.normal(size=(3, channels, 3, 3))))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["t1"], name="P", pads=[1] * 4),
             helper.make_node("InstanceNormalization", ["t1", "s", "bb"], ["t2"], name="IN", epsilon=epsilon),
             helper.make_node("Relu", ["t2"], ["t3"], name="R"),
             helper.make_node("Conv", ["t3", "w2"], [output], name="C", pads=[1] * 4)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 3, 8, 8])]
    if initializers_as_inputs:  # IR 3 style: the caller may feed other values
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    if if_node:
        branch = helper.make_graph([helper.make_node("Identity", ["t3"], ["z"])], "branch", [],
                                   [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch))
        outputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "chain", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_unsafe_or_narrow_chains_are_not_padded():
    assert pad_channels(_chain_model()) == 1
    assert pad_channels(_chain_model(channels=6)) == 0  # 6 -> 16 would more than double the chain's weights
    assert pad_channels(_chain_model(epsilon=0.0)) == 0  # a zero channel would normalize to 0/0
    assert pad_channels(_chain_model(initializers_as_inputs=True)) == 0  # a caller may override them
    assert pad_channels(_chain_model(if_node=True)) == 0  # the If branch reads the chain


def test_new_names_do_not_collide_with_existing_tensors():
    model = _chain_model(output="C_padded_w")  # the name the padded weight would take
    x = np.random.default_rng(2).normal(size=(1, 2, 8, 8)).astype(np.float32)
    expected = _run(model, x)
    assert pad_channels(model) == 1
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model, x), expected, atol=1e-5)


def _activation_scales(path: Path) -> list[float]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return sorted(float(inits[n.input[1]]) for n in model.graph.node
                  if n.op_type == "QuantizeLinear" and n.input[0] not in inits)


def test_openvino_placement_pads_and_onnx_runtime_preset_does_not(tmp_path):
    """--placement cpu (s8, for OpenVINO) pads with the same activation ranges as without, passes the Q/DQ rules
    and agrees with the unpadded INT8 file on OpenVINO; u8 (ONNX Runtime's preset, whose float logits conv gets
    slower) does not pad."""
    import openvino as ov

    fp32 = _export(_unet(("instance", {"affine": True})), (1, 1, 16, 16, 16), tmp_path / "unet.onnx")
    calibration = np.random.default_rng(3).uniform(0, 1, (4, 1, 16, 16, 16)).astype(np.float32)
    reports = {}
    for name, kwargs in {"pad": {}, "nopad": {"pad_channels": False}, "u8": {"activations": "u8"}}.items():
        reports[name] = quantize_cpu(fp32, calibration, tmp_path / f"{name}.onnx", **kwargs)
    assert reports["pad"].rewrites["channels_padded"] == 1
    assert reports["nopad"].rewrites.get("channels_padded", 0) == 0
    assert reports["u8"].rewrites.get("channels_padded", 0) == 0
    assert check_qdq(tmp_path / "pad.onnx").ok
    assert _activation_scales(tmp_path / "pad.onnx") == _activation_scales(tmp_path / "nopad.onnx")
    x = np.random.default_rng(4).uniform(0, 1, (1, 1, 16, 16, 16)).astype(np.float32)
    core = ov.Core()
    out = {name: core.compile_model(str(tmp_path / f"{name}.onnx"), "CPU")({0: x})[0] for name in ("pad", "nopad")}
    reference = _run(fp32, x)
    assert out["pad"].shape == reference.shape
    assert np.mean(out["pad"].argmax(1) == out["nopad"].argmax(1)) > 0.99
    assert np.mean(out["pad"].argmax(1) == reference.argmax(1)) > 0.9
