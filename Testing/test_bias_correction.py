"""Empirical bias correction (quantization.bias_correction) on small random conv nets with coarse Q/DQ weights."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from PTQLogic.core.errors import InputError, ModelError
from PTQLogic.quantization.bias_correction import correct_biases

SHAPE = [2, 1, 8, 8, 8]
CONV = dict(kernel_shape=[3, 3, 3], pads=[1] * 6)


def _weights(rng, out_channels: int, in_channels: int) -> np.ndarray:
    # a positive offset: rounding to few levels then shifts each output channel's mean clearly
    return (rng.normal(0.05, 0.2, (out_channels, in_channels, 3, 3, 3))).astype(np.float32)


def _coarse_dq(name: str, weight: np.ndarray, nodes: list, inits: list) -> str:
    """Per-channel int8 weights on only 7 levels (-3..3), behind a DequantizeLinear; its output name."""
    scale = (np.abs(weight).reshape(len(weight), -1).max(axis=1) / 3.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[:, None, None, None, None]), -3, 3).astype(np.int8)
    inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(scale, f"{name}_scale"),
              numpy_helper.from_array(np.zeros(len(weight), np.int8), f"{name}_zp")]
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"],
                                  axis=0))
    return f"{name}_dq"


def _save(path, nodes, inits, output: str, channels: int):
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2, channels, 8, 8, 8])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _tiny_pair(tmp_path, int32_bias: bool = False, norm: bool = False, channels: tuple[int, int] = (4, 3)):
    """(FP32, Q/DQ) files of x -> conv1 (bias) -> Relu -> conv2 (no bias) [-> InstanceNormalization]; the Q/DQ one
    has coarse weights and the Relu's output through QuantizeLinear/DequantizeLinear."""
    rng = np.random.default_rng(0)
    (c1, c2) = channels
    w1, w2 = _weights(rng, c1, 1), _weights(rng, c2, c1)
    b1 = rng.normal(0, 0.1, c1).astype(np.float32)
    tail = [helper.make_node("InstanceNormalization", ["c2", "gamma", "beta"], ["y"])] if norm else []
    norm_inits = [numpy_helper.from_array(np.ones(c2, np.float32), "gamma"),
                  numpy_helper.from_array(np.zeros(c2, np.float32), "beta")] if norm else []
    out = "y" if norm else "c2"
    fp32_nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **CONV), helper.make_node("Relu", ["c1"], ["r1"]),
                  helper.make_node("Conv", ["r1", "w2"], ["c2"], **CONV), *tail]
    fp32 = _save(tmp_path / "fp32.onnx", fp32_nodes, [numpy_helper.from_array(w1, "w1"),
                                                      numpy_helper.from_array(w2, "w2"),
                                                      numpy_helper.from_array(b1, "b1"), *norm_inits], out, c2)
    nodes, inits = [], [numpy_helper.from_array(np.float32(0.02), "a_scale"),
                        numpy_helper.from_array(np.int8(0), "a_zp"), *norm_inits]
    dq1, dq2 = _coarse_dq("w1", w1, nodes, inits), _coarse_dq("w2", w2, nodes, inits)
    bias = "b1"
    if int32_bias:  # the form ONNX Runtime's quantizer writes: int32 behind a DequantizeLinear
        scale = np.full(c1, 1e-4, np.float32)
        inits += [numpy_helper.from_array(np.rint(b1 / scale).astype(np.int32), "b1_q"),
                  numpy_helper.from_array(scale, "b1_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["b1_q", "b1_scale"], ["b1_dq"], axis=0))
        bias = "b1_dq"
    else:
        inits.append(numpy_helper.from_array(b1, "b1"))
    nodes += [helper.make_node("Conv", ["x", dq1, bias], ["c1"], **CONV), helper.make_node("Relu", ["c1"], ["r1"]),
              helper.make_node("QuantizeLinear", ["r1", "a_scale", "a_zp"], ["r1_q"]),
              helper.make_node("DequantizeLinear", ["r1_q", "a_scale", "a_zp"], ["r1_dq"]),
              helper.make_node("Conv", ["r1_dq", dq2], ["c2"], **CONV), *tail]
    return fp32, _save(tmp_path / "int8.onnx", nodes, inits, out, c2)


def _patches(count: int = 6, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.5, 1.0, (count, *SHAPE[1:])).astype(np.float32)


def _channel_means(path, patches: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel means of both conv outputs, from the graph as written (no ONNX Runtime rewrites)."""
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("c1", "c2"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [session.run(["c1", "c2"], {"x": patches[i:i + 2]}) for i in range(0, len(patches), 2)]
    return {name: np.mean([r[k].mean(axis=(0, 2, 3, 4)) for r in runs], axis=0) for k, name in enumerate(["c1", "c2"])}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_corrected_means_match_fp32_and_input_is_unchanged(tmp_path):
    fp32, qdq = _tiny_pair(tmp_path)
    patches = _patches()
    before_sha = _sha(qdq)
    report = correct_biases(qdq, fp32, patches, tmp_path / "corrected.onnx")
    assert _sha(qdq) == before_sha
    reference, before, after = (_channel_means(p, patches) for p in (fp32, qdq, tmp_path / "corrected.onnx"))
    for name in ("c1", "c2"):
        assert np.abs(reference[name] - before[name]).max() > 0.01  # coarse weights do shift the means
        assert np.abs(reference[name] - after[name]).max() < 1e-5
    assert report.mode == "layer by layer" and report.passes == 2  # conv2 depends on conv1: two levels
    assert [layer.op_type for layer in report.layers] == ["Conv", "Conv"]
    assert all(layer.error_after < 1e-4 < layer.error_before for layer in report.layers)
    corrected = onnx.load(str(tmp_path / "corrected.onnx"))
    conv2 = [n for n in corrected.graph.node if n.op_type == "Conv"][1]
    assert len(conv2.input) == 3  # conv2 had no bias: one was made


def test_one_pass_leaves_the_second_conv_off(tmp_path):
    """One pass corrects conv2 for conv1's uncorrected shift too: it is measurably worse than layer by layer."""
    fp32, qdq = _tiny_pair(tmp_path)
    patches = _patches()
    one = correct_biases(qdq, fp32, patches, tmp_path / "one.onnx", one_pass=True)
    assert one.mode == "one pass" and one.passes == 1
    assert one.layers[0].error_after < 1e-4  # the first conv sees no earlier correction: exact either way
    assert one.layers[1].error_after > 1e-3


def test_int32_bias_moves_by_whole_steps(tmp_path):
    fp32, qdq = _tiny_pair(tmp_path, int32_bias=True)
    patches = _patches()
    correct_biases(qdq, fp32, patches, tmp_path / "corrected.onnx")
    reference, after = _channel_means(fp32, patches), _channel_means(tmp_path / "corrected.onnx", patches)
    assert np.abs(reference["c1"] - after["c1"]).max() <= 1e-4  # within half a bias step (scale 1e-4)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "corrected.onnx")).graph.initializer}
    assert inits["b1_q"].dtype == np.int32


def test_conv_feeding_only_instance_norm_is_left_alone(tmp_path):
    fp32, qdq = _tiny_pair(tmp_path, norm=True)
    report = correct_biases(qdq, fp32, _patches(), tmp_path / "corrected.onnx")
    assert [layer.node for layer in report.layers] == ["c1"]  # unnamed nodes go by their output
    assert report.skipped == {"c2": "only feeds InstanceNormalization, which removes each channel's mean"}


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path):
    fp32, qdq = _tiny_pair(tmp_path)
    patches = _patches()
    before_sha = _sha(qdq)
    with pytest.raises(InputError, match="overwrite"):
        correct_biases(qdq, fp32, patches, qdq)
    with pytest.raises(InputError, match="expects"):
        correct_biases(qdq, fp32, patches[:, :, :4], tmp_path / "out.onnx")
    with pytest.raises(InputError, match="NaN"):
        correct_biases(qdq, fp32, np.full_like(patches, np.nan), tmp_path / "out.onnx")
    with pytest.raises(InputError, match="multiple of 2"):  # the tiny models take batches of exactly 2
        correct_biases(qdq, fp32, patches[:5], tmp_path / "out.onnx")
    with pytest.raises(ModelError, match="does not exist"):
        correct_biases(tmp_path / "missing.onnx", fp32, patches, tmp_path / "out.onnx")
    assert _sha(qdq) == before_sha and not (tmp_path / "out.onnx").exists()


def _dynamic_batch(path):
    """The same model taking any batch (as exported models do): what ModelOpt calibrates."""
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(path))
    return path


def test_quantize_onnx_corrects_the_final_7bit_model_and_records_it(tmp_path):
    """``QuantizeSettings(bias_correction=True)``: ModelOpt's Q/DQ model, weights narrowed to 7 bits, then corrected;
    the report (quantization.json) says so, and the conv output means land on FP32's."""
    from PTQLogic.quantization.interface import QuantizeOptions
    from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx

    fp32 = _dynamic_batch(_tiny_pair(tmp_path, channels=(8, 16))[0])  # channels ModelOpt quantizes for TensorRT
    patches = _patches(8)
    settings = QuantizeSettings(**QuantizeOptions(method="max", bias_correction=True).calibration_method(),
                                target_cpu="avx2")
    plain = quantize_onnx(fp32, patches, tmp_path / "plain.onnx", QuantizeSettings(method="max", target_cpu="avx2"))
    corrected = quantize_onnx(fp32, patches, tmp_path / "corrected.onnx", settings)
    assert plain.bias_correction is None and plain.to_dict()["settings"]["bias_correction"] is False
    recorded = corrected.to_dict()
    assert recorded["settings"]["bias_correction"] is True and recorded["target_cpu"]["weight_bits"] == 7
    assert recorded["bias_correction"]["convs_corrected"] == 2
    summary = recorded["bias_correction"]
    assert summary["largest_error_after"] < 1e-4 < summary["largest_error_before"]
    reference, before, after = (_channel_means(p, patches) for p in (fp32, plain.path, corrected.path))
    for name in ("c1", "c2"):
        assert np.abs(reference[name] - after[name]).max() < 0.1 * np.abs(reference[name] - before[name]).max()


def test_cli_option_is_opt_in():
    from PTQLogic.app.cli import build_parser

    base = ["quantize", "--model", "m.json", "--calibration", "c.nii.gz", "--out", "o"]
    assert build_parser().parse_args(base).bias_correction is False
    assert build_parser().parse_args([*base, "--bias-correction"]).bias_correction is True


def test_cli_quantize_corrects_biases_and_says_so(phantom_files, tmp_path, capsys):
    """`ptqseg quantize --bias-correction` on the trained sample network: the summary line, and quantization.json."""
    import json

    from conftest import ROOT
    from PTQLogic.app.cli import main

    out = tmp_path / "unet-int8"
    code = main(["quantize", "--model", str(ROOT / "PTQLogic" / "samples" / "data" / "phantom_unet.json"),
                 "--calibration", str(phantom_files["image"]), "--out", str(out), "--patches", "4", "--no-guard",
                 "--bias-correction"])
    said = capsys.readouterr().out
    assert code == 0
    recorded = json.loads((out / "quantization.json").read_text())
    summary = recorded["bias_correction"]
    assert recorded["settings"]["bias_correction"] is True and summary["convs_corrected"] >= 1
    assert summary["largest_error_after"] < summary["largest_error_before"]
    assert f"bias correction (layer by layer): {summary['convs_corrected']} convolution(s) corrected" in said
