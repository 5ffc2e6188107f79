"""The exact CPU conv rewrites (sub-pixel ConvTranspose, folded identity residual) and what they buy ONNX Runtime."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from PTQLogic.onnx_graph.qdq_check import check_qdq
from PTQLogic.onnx_graph.conv_rewrites import convtranspose_to_subpixel, fold_identity_residual
from PTQLogic.quantization.placement import quantize_cpu
from PTQLogic.quantization.quantize import QuantizeSettings
from PTQLogic.core.errors import InputError


def _export(net: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.onnx.export(net.eval(), torch.randn(*shape), str(path), opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return path


def _ort(model: onnx.ModelProto | Path, x: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


class _Up(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module, act: bool):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        y = self.conv(x)
        return torch.nn.functional.leaky_relu(y, 0.1) if self.act else y


@pytest.mark.parametrize("dims,kernel,stride,pad,out_pad,bias,act", [
    (3, 3, 2, 1, 1, True, True),    # MONAI UNet's up-sampling
    (3, 2, 2, 0, 0, False, False),  # nnU-Net / UNETR's transposed conv
    (3, 4, 2, 1, 0, True, False),
    (2, 3, 3, 0, 0, True, True),    # stride 3, 2D
])
@pytest.mark.parametrize("shuffle", ["steps", "depth_to_space"])
def test_subpixel_rewrite_is_exact(tmp_path, dims, kernel, stride, pad, out_pad, bias, act, shuffle):
    torch.manual_seed(0)
    cls = torch.nn.ConvTranspose3d if dims == 3 else torch.nn.ConvTranspose2d
    net = _Up(cls(6, 5, kernel, stride, pad, out_pad, bias=bias), act)
    shape = (1, 6) + (7,) * dims
    model = onnx.load(str(_export(net, shape, tmp_path / "up.onnx")))
    assert convtranspose_to_subpixel(model, shuffle) == 1
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ConvTranspose"] == 0 and ops["Conv"] == 1
    if shuffle == "depth_to_space":  # float: DepthToSpace, and in 3D one block transpose
        assert ops["DepthToSpace"] == 1 and ops["Transpose"] == dims - 2
    else:
        assert ops["Transpose"] == dims
    for node in model.graph.node:  # each shuffle step moves one axis (ONNX Runtime's fast transpose path)
        if node.op_type == "Transpose" and shuffle == "steps":
            perm = list(onnx.helper.get_attribute_value(node.attribute[0]))
            moved = perm.index(1)
            assert perm[:moved] + perm[moved + 1:] == sorted(set(perm) - {1}) and moved > 1
    if act:  # the activation now sits between the Conv and the shuffle, so runtimes fuse it to the Conv
        conv_out = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
        assert next(n for n in model.graph.node if conv_out in n.input).op_type == "LeakyRelu"
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).standard_normal((2, 6) + (7,) * dims).astype(np.float32)  # batch stays dynamic
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort(model, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", [
    torch.nn.ConvTranspose3d(4, 4, 3, 2, 1, 0),       # output 2n-1, not 2n: no phase decomposition
    torch.nn.ConvTranspose3d(4, 4, 3, 1, 1),          # stride 1
    torch.nn.ConvTranspose3d(4, 4, 2, 2, groups=2),   # grouped
])
def test_subpixel_rewrite_leaves_other_transposed_convs(tmp_path, conv):
    model = onnx.load(str(_export(_Up(conv, False), (1, 4, 6, 6, 6), tmp_path / "up.onnx")))
    assert convtranspose_to_subpixel(model) == 0
    assert [n.op_type for n in model.graph.node] == ["ConvTranspose"]


class _Residual(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module | None = None, also_output_conv: bool = False):
        super().__init__()
        self.pre = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.conv = conv or torch.nn.Conv3d(4, 4, 3, padding=1)
        self.also_output_conv = also_output_conv

    def forward(self, x):
        y = torch.relu(self.pre(x))
        z = self.conv(y)
        return (z + y, z) if self.also_output_conv else z + y


def test_identity_residual_is_folded_exactly_into_monai_unet_output_conv(tmp_path):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 4, (8, 16), (2,), num_res_units=1)  # top ResidualUnit: last_conv_only, identity skip
    path = _export(net, (1, 1, 16, 16, 16), tmp_path / "unet.onnx")
    model = onnx.load(str(path))
    adds = Counter(n.op_type for n in model.graph.node)["Add"]
    assert fold_identity_residual(model) == 1
    assert Counter(n.op_type for n in model.graph.node)["Add"] == adds - 1
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["logits"].op_type == "Conv"
    x = np.random.default_rng(2).standard_normal((2, 1, 16, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_ort(model, x), _ort(path, x), rtol=1e-4, atol=1e-5)


def test_residual_fold_needs_an_identity_skip_around_a_same_size_conv(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(4).standard_normal((1, 1, 8, 8, 8)).astype(np.float32)
    path = _export(_Residual(), (1, 1, 8, 8, 8), tmp_path / "plain.onnx")
    model = onnx.load(str(path))
    assert fold_identity_residual(model) == 1
    np.testing.assert_allclose(_ort(model, x), _ort(path, x), rtol=1e-4, atol=1e-5)
    for name, net in (("dilated", _Residual(torch.nn.Conv3d(4, 4, 3, padding=2, dilation=2))),
                      ("grouped", _Residual(torch.nn.Conv3d(4, 4, 3, padding=1, groups=2))),
                      ("conv_is_an_output", _Residual(also_output_conv=True))):
        model = onnx.load(str(_export(net, (1, 1, 8, 8, 8), tmp_path / f"{name}.onnx")))
        assert fold_identity_residual(model) == 0, name


def test_residual_fold_leaves_a_shared_weight(tmp_path):
    model = onnx.load(str(_export(_Residual(), (1, 1, 8, 8, 8), tmp_path / "shared.onnx")))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0] != "input")
    model.graph.node.append(onnx.helper.make_node("Identity", [conv.input[1]], ["weight_copy"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("weight_copy", onnx.TensorProto.FLOAT, None))
    assert fold_identity_residual(model) == 0


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory) -> Path:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=2, norm="batch")
    return _export(net, (1, 1, 16, 16, 16), tmp_path_factory.mktemp("rewrites") / "fp32.onnx")


def _calibration(n: int) -> np.ndarray:
    return np.random.default_rng(3).uniform(0, 1, (n, 1, 16, 16, 16)).astype(np.float32)


def test_onnx_runtime_preset_fuses_every_conv_it_runs_faster_in_int8(unet_onnx, tmp_path):
    """u8 activations + sub-pixel: ONNX Runtime runs QLinearConv for every conv (s8 activations leave the
    convs whose input also feeds a residual branch in float), and no ConvTranspose is left; the convs it
    runs faster in float (1-channel input, the logits conv) stay float, with no Q/DQ in front of them."""
    x = _calibration(1)
    reference = _ort(unet_onnx, x)
    fused, reports = {}, {}
    for name, kwargs in (("s8", {"activations": "s8", "subpixel": False}),
                         ("u8sub", {"activations": "u8", "subpixel": True}),
                         ("u8all", {"activations": "u8", "subpixel": True, "ort_float": False})):
        out = tmp_path / f"{name}.onnx"
        reports[name] = report = quantize_cpu(unet_onnx, _calibration(4), out, **kwargs)
        assert report.rewrites["identity_residual_folded"] == 1
        optimized = tmp_path / f"{name}.opt.onnx"
        int8 = _ort(out, x, optimized)
        assert np.mean(int8.argmax(1) == reference.argmax(1)) > 0.9
        fused[name] = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
        if name == "u8sub":
            model = onnx.load(str(out))
            producer = {o: n.op_type for n in model.graph.node for o in n.output}
            float_convs = [n for n in model.graph.node if n.name in report.float_convs]
            assert len(float_convs) == 3 and all(producer.get(n.input[0]) != "DequantizeLinear" for n in float_convs)
    assert reports["s8"].float_convs == () and reports["u8all"].float_convs == ()
    # the two convs reading the 1-channel input, and the logits conv:
    assert fused["u8sub"]["ConvTranspose"] == 0 and fused["u8sub"]["Conv"] == 3
    assert fused["u8all"]["Conv"] == 1  # every conv quantized, only the float-logits one left
    assert fused["s8"]["Conv"] > 1
    assert fused["u8all"]["QLinearConv"] > fused["s8"]["QLinearConv"]
    assert fused["u8sub"]["QLinearConv"] == fused["u8all"]["QLinearConv"] - 2


def test_subpixel_placement_quantizes_only_the_shuffle_reshapes(tmp_path):
    """--subpixel: Q/DQ flows through the shuffle's Reshape/Transpose, not through other reshapes of the net."""
    class UpThenFlatten(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ConvTranspose3d(4, 4, 3, 2, 1, 1)  # 4 input channels: ONNX Runtime's preset quantizes it
            self.head = torch.nn.Conv3d(4, 2, 1)

        def forward(self, x):
            y = self.head(torch.relu(self.up(x)))
            return y.reshape(y.shape[0], 2, -1).transpose(1, 2).reshape(y.shape)

    path = _export(UpThenFlatten(), (1, 4, 6, 6, 6), tmp_path / "flat.onnx")
    out = tmp_path / "flat_int8.onnx"
    quantize_cpu(path, np.random.default_rng(5).uniform(0, 1, (2, 4, 6, 6, 6)).astype(np.float32), out,
                 activations="u8", subpixel=True)
    model = onnx.load(str(out))
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    moved = [n for n in model.graph.node if n.op_type in ("Reshape", "Transpose")]
    shuffle = [n for n in moved if "_subpixel_" in n.name]
    others = [n for n in moved if "_subpixel_" not in n.name]
    assert len(shuffle) == 7 and len(others) >= 3  # 4 reshapes, 3 single-axis transposes
    assert all(consumers.get(n.output[0]) == ["QuantizeLinear"] for n in shuffle)  # int8 through the shuffle
    assert not any("QuantizeLinear" in consumers.get(n.output[0], []) for n in others)  # the rest stays float


def test_s8_subpixel_graph_passes_the_qdq_rules_and_settings_validate(unet_onnx, tmp_path):
    out = tmp_path / "s8sub.onnx"
    quantize_cpu(unet_onnx, _calibration(2), out, activations="s8", subpixel=True)
    report = check_qdq(out)
    assert report.ok, report.violations[:3]
    with pytest.raises(InputError, match="subpixel"):
        QuantizeSettings(placement="modelopt", subpixel=True).validate()
