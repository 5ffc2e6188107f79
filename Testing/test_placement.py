"""CPU Q/DQ placement: graph rewrites keep the function, every convolution is quantized, outputs stay float,
the TensorRT rules validator passes (s8), ONNX Runtime and OpenVINO run the result close to FP32."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from PTQLogic.core.errors import InputError
from PTQLogic.onnx_graph.qdq_check import check_qdq
from PTQLogic.onnx_graph.graph_prep import prepare_for_int8
from PTQLogic.quantization.placement import quantize_cpu
from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx
from qdq_graphs import convs_after_a_concat

PATCH = 16


def _unet(norm: str) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=1, norm=norm)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding has something to get wrong
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("placement") / "fp32.onnx"
    torch.onnx.export(_unet("batch"), torch.randn(1, 1, PATCH, PATCH, PATCH), str(path), opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamo=False)
    return path


def _calibration(n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(0, 1, size=(n, 1, PATCH, PATCH, PATCH)).astype(np.float32)


def _ort(path_or_bytes, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_graph_prep_folds_batchnorm_and_prelu_without_changing_the_output(fp32_onnx):
    model = onnx.load(str(fp32_onnx))
    before = Counter(node.op_type for node in model.graph.node)
    counts = prepare_for_int8(model)
    after = Counter(node.op_type for node in model.graph.node)
    assert before["BatchNormalization"] > 0 and after["BatchNormalization"] == 0
    assert counts["batchnorm_folded"] == before["BatchNormalization"]
    assert after["PRelu"] == 0 and after["LeakyRelu"] == before["PRelu"] > 0
    onnx.checker.check_model(model)
    x = _calibration(1)
    np.testing.assert_allclose(_ort(model.SerializeToString(), x), _ort(str(fp32_onnx), x), rtol=1e-4, atol=1e-4)


def test_cpu_placement_quantizes_every_conv_and_keeps_logits_float(fp32_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    report = quantize_cpu(fp32_onnx, _calibration(), out, activations="s8")
    assert report.float_outputs == ("logits",)
    qdq = check_qdq(out)
    assert qdq.ok, qdq.violations[:3]
    for op in ("Conv", "ConvTranspose"):
        assert qdq.counts[op]["quantized"] == qdq.counts[op]["total"] > 0, qdq.unquantized
    model = onnx.load(str(out))
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["logits"].op_type not in ("DequantizeLinear", "QuantizeLinear")
    # activations are quantized on op outputs too: LeakyRelu and Add results pass through QuantizeLinear
    quantized_outputs = {producer[n.input[0]].op_type for n in model.graph.node
                         if n.op_type == "QuantizeLinear" and n.input[0] in producer}
    assert {"LeakyRelu", "Add"} <= quantized_outputs
    x = _calibration(1)
    fp32, int8 = _ort(str(fp32_onnx), x), _ort(str(out), x)
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) > 0.9
    assert np.abs(fp32 - int8).max() < 0.25 * np.abs(fp32).max()


def test_cpu_placement_runs_int8_convolutions_on_openvino(fp32_onnx, tmp_path):
    pytest.importorskip("openvino")
    from PTQLogic.engines.openvino_engine import OpenVINOEngine

    out = tmp_path / "int8.onnx"
    quantize_cpu(fp32_onnx, _calibration(), out, activations="s8")
    engine = OpenVINOEngine(out, "int8", patch_size=(PATCH,) * 3)
    summary = engine.int8_layer_summary()
    # without AMX, OpenVINO reads a concat's quantizer as uint8 (its int8 concat->conv is wrong there): the
    # convolution after it runs in float, correctly
    in_float = convs_after_a_concat(out) if engine.unsigned_concats else 0
    assert summary["convolutions"] > 0 and summary["not_int8"] == in_float, summary["not_int8_layers"]
    x = torch.from_numpy(_calibration(1))
    reference = torch.from_numpy(_ort(str(fp32_onnx), x.numpy()))
    assert (engine(x).argmax(1) == reference.argmax(1)).float().mean() > 0.9


def test_u8_activations_are_reported_by_the_tensorrt_validator(fp32_onnx, tmp_path):
    out = tmp_path / "int8_u8.onnx"
    report = quantize_cpu(fp32_onnx, _calibration(2), out, activations="u8")
    qdq = check_qdq(out)
    assert not qdq.ok and any("UINT8" in v for v in qdq.violations)
    # ONNX Runtime's preset: the convs reading the 1-channel input and the logits conv stay float, the rest int8
    assert len(report.float_convs) == 3
    assert qdq.counts["Conv"]["quantized"] == qdq.counts["Conv"]["total"] - 3


def test_quantize_onnx_with_cpu_placement_and_bad_settings(fp32_onnx, tmp_path):
    # ModelOpt first, in this process: it monkey-patches ONNX Runtime's calibrators process-wide
    assert quantize_onnx(fp32_onnx, _calibration(2), tmp_path / "modelopt.onnx").qdq.ok
    report = quantize_onnx(fp32_onnx, _calibration(), tmp_path / "int8.onnx", QuantizeSettings(placement="cpu"))
    assert report.qdq.ok and report.ratio < 0.5
    assert "CPU Q/DQ placement" in report.log_path.read_text()
    with pytest.raises(InputError, match="placement"):
        QuantizeSettings(placement="gpu").validate()
    with pytest.raises(InputError, match="modelopt"):
        QuantizeSettings(placement="cpu", exclude_nodes=("Conv_0",)).validate()
    with pytest.raises(InputError, match="Activation"):
        quantize_cpu(fp32_onnx, _calibration(1), tmp_path / "x.onnx", activations="fp8")


def _norm_tails(model: onnx.ModelProto) -> list[list[str]]:
    """Op types from each normalization's output through its activation and the Q/DQ after it."""
    consumers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tails = []
    for node in model.graph.node:
        if node.op_type == "InstanceNormalization":
            chain, name = [], node.output[0]
            while len(consumers.get(name, [])) == 1 and consumers[name][0].op_type != "Conv":
                chain.append(consumers[name][0].op_type)
                name = consumers[name][0].output[0]
                if chain[-1] == "DequantizeLinear" and {"Relu", "LeakyRelu"} & set(chain):
                    break
            tails.append(chain)
    return tails


@pytest.mark.parametrize("network", ["unet_instance", "segresnet_groupnorm"])
def test_normalization_tail_is_quantized_once(network, tmp_path):
    """Norm -> (reshape, affine) -> activation carries one Q/DQ, at its end; still every conv in int8."""
    from monai.networks.nets import SegResNet

    from PTQLogic.engines.openvino_engine import OpenVINOEngine

    torch.manual_seed(0)
    net = _unet("instance") if network == "unet_instance" else SegResNet(3, 8, 1, 3, blocks_down=(1, 1),
                                                                          blocks_up=(1,)).eval()
    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(net, torch.randn(1, 1, PATCH, PATCH, PATCH), str(fp32), opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamo=False)
    report = quantize_cpu(fp32, _calibration(), tmp_path / "int8.onnx")
    model = onnx.load(str(tmp_path / "int8.onnx"))
    tails = _norm_tails(model)
    assert tails and report.rewrites["norm_activation_fused"] == len(tails)
    for tail in tails:  # e.g. [LeakyRelu, Q, DQ] or [Reshape, Mul, Add, Relu, Q, DQ]
        assert tail[-2:] == ["QuantizeLinear", "DequantizeLinear"] and "QuantizeLinear" not in tail[:-2], tail
    assert check_qdq(tmp_path / "int8.onnx").ok
    engine = OpenVINOEngine(tmp_path / "int8.onnx", "int8")
    summary = engine.int8_layer_summary()
    in_float = convs_after_a_concat(tmp_path / "int8.onnx") if engine.unsigned_concats else 0  # see above
    assert summary["not_int8"] == in_float and summary["int8"] == summary["convolutions"] - in_float
    x = _calibration(1)
    reference = _ort(str(fp32), x)
    int8 = _ort(str(tmp_path / "int8.onnx"), x)
    assert np.abs(int8 - reference).max() < 0.2 * np.abs(reference).max()


@pytest.mark.parametrize("flags, expected", [
    ([], {"placement": "modelopt", "activations": "s8", "subpixel": False}),
    (["--placement", "auto"], {"placement": "modelopt", "activations": "s8", "subpixel": False}),
    (["--placement", "modelopt"], {"placement": "modelopt", "activations": "s8", "subpixel": False}),
    (["--activations", "u8", "--subpixel"], {"placement": "cpu", "activations": "u8", "subpixel": True}),
], ids=["default", "auto", "modelopt", "u8-implies-cpu"])
def test_quantize_places_qdq_for_the_int8_runtime_by_default(tmp_path, capsys, flags, expected):
    """Without --placement, ``quantize`` uses the fidelity placement (ModelOpt's) for every runtime, says so and
    why, and records it; --activations or --subpixel alone mean the 'cpu' placement (the opt-in speed preset);
    an explicit placement is kept."""
    import json

    from PTQLogic.app.cli import main
    from PTQLogic.engines import choose_runtime
    from PTQLogic.samples.phantom import write_phantom_set
    from PTQLogic.core.spec import load_spec

    sample = Path(__file__).resolve().parents[1] / "PTQLogic" / "samples" / "data" / "phantom_unet.json"
    assert choose_runtime("int8")[0] == "openvino"  # installed with the engine's CPU extras, as in CI
    calibration = write_phantom_set(tmp_path / "calib", 1, 7, spacing=load_spec(sample).preprocessing.spacing)
    code = main(["quantize", "--model", str(sample), "--calibration", str(calibration[0][0]), "--out",
                 str(tmp_path / "q"), "--patches", "2", *flags, "--json"])
    data = json.loads(capsys.readouterr().out)
    auto_line = data["placement"].pop("auto")
    assert code == 0 and data["placement"] == expected
    assert ("keeps FP32's answer best" in auto_line) == (flags in ([], ["--placement", "auto"]))
    settings = json.loads((tmp_path / "q" / "quantization.json").read_text())["settings"]
    assert (settings["placement"], settings["activations"]) == (expected["placement"], expected["activations"])


def test_resolve_placement_rules():
    from PTQLogic.quantization.presets import placement_for_runtime, resolve_placement

    assert resolve_placement("auto")[:3] == ("modelopt", "s8", False)  # fidelity first: the speed preset is opt-in
    assert resolve_placement("auto", excludes_nodes=True)[0] == "modelopt"
    assert resolve_placement("auto", architecture="SwinUNETR")[3].endswith("high precision through it)")
    assert resolve_placement("auto", architecture="UNet")[0] == "modelopt"
    assert "--placement cpu" in resolve_placement("auto", architecture="UNet")[3]
    placement, _, _, line = resolve_placement("auto", nnunet=True)
    assert placement == "modelopt" and "nnU-Net" in line
    assert resolve_placement("cpu", "u8", True) == ("cpu", "u8", True, "")
    with pytest.raises(InputError, match="auto chooses"):
        resolve_placement("auto", "u8")
    with pytest.raises(InputError, match="belong to the 'cpu' placement"):
        resolve_placement("modelopt", "u8")
    assert placement_for_runtime("onnxruntime") == ("cpu", "u8", True)
    with pytest.raises(InputError, match="runtime"):
        placement_for_runtime("torch")


def test_tensorrt_refuses_an_onnx_runtime_int8_file_before_building(tmp_path):
    """A folder quantized for ONNX Runtime (u8 activations) cannot run on TensorRT: refused with what to do,
    before TensorRT is even imported; an s8 file from the same graph is not refused by this check."""
    from PTQLogic.engines import _tensorrt_engine
    from PTQLogic.core.progress import Monitor
    from PTQLogic.onnx_graph.qdq_check import uint8_quantizers

    path = tmp_path / "relu.onnx"
    onnx.save(_relu_chain(list("abcdefg")), str(path))
    data = np.random.default_rng(1).uniform(0, 1, (2, 1, 8, 8, 8)).astype(np.float32)
    quantize_cpu(path, data, tmp_path / "u8.onnx", activations="u8")
    quantize_cpu(path, data, tmp_path / "s8.onnx", activations="s8")
    assert uint8_quantizers(tmp_path / "u8.onnx") and not uint8_quantizers(tmp_path / "s8.onnx")
    with pytest.raises(InputError, match="quantized for ONNX Runtime"):
        _tensorrt_engine(tmp_path / "u8.onnx", "int8", None, None, 1, Monitor())


def _relu_chain(names: list[str]) -> onnx.ModelProto:
    """Conv(1->8) Relu Conv Relu Conv Relu Conv(8->2) -> logits: a Relu right before the float logits conv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(8, 1, 3, 3, 3), (8, 8, 3, 3, 3), (8, 8, 3, 3, 3), (2, 8, 1, 1, 1)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), f"w{i}") for i, shape in enumerate(shapes)]
    nodes, x = [], "x"
    for i in range(4):
        pads = {"pads": [1] * 6} if i < 3 else {}
        out = "y" if i == 3 else f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [out], name=names[2 * i], **pads))
        if i < 3:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=names[2 * i + 1]))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("names", [list("abcdefg"), [""] * 7, ["conv", "r", "conv", "r2", "k", "r3", "conv"]],
                         ids=["named", "unnamed", "repeated-names"])
def test_onnx_runtime_preset_keeps_a_relu_before_a_float_conv(tmp_path, names):
    """With u8 activations the quantizer folds a Relu into the Q that follows it; the Q/DQ in front of a conv
    kept in float must then stay, or the clipping is lost (found in review: agreement 0.88, max error 7.3).
    Unnamed and repeated node names still get the first and logits convs excluded, and only those."""
    path = tmp_path / "relu.onnx"
    onnx.save(_relu_chain(names), str(path))
    rng = np.random.default_rng(1)
    out = tmp_path / "relu_u8.onnx"
    report = quantize_cpu(path, rng.uniform(0, 1, (2, 1, 8, 8, 8)).astype(np.float32), out, activations="u8")
    assert len(report.float_convs) == 2 and all(report.float_convs)
    x = rng.uniform(0, 1, (1, 1, 8, 8, 8)).astype(np.float32)
    run = lambda p: onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    reference = tmp_path / "reference.onnx"  # ONNX Runtime refuses repeated names: the same graph, named
    onnx.save(_relu_chain(list("abcdefg")), str(reference))
    fp32, int8 = run(reference), run(out)
    assert np.abs(fp32 - int8).max() < 1.0 and np.mean(fp32.argmax(1) == int8.argmax(1)) > 0.98
    quantized = onnx.load(str(out))
    producer = {o: n.op_type for n in quantized.graph.node for o in n.output}
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    int8_convs = [n.name for n in convs if producer.get(n.input[1]) == "DequantizeLinear"]
    assert len(int8_convs) == 2 and not set(int8_convs) & set(report.float_convs)
