"""CPU Q/DQ placement: INT8 activations through normalization, activation, residual add, concat and ConvTranspose.

ModelOpt's default placement targets TensorRT: Q/DQ only on op *inputs*, and it skips convolutions
with fewer than 16 channels (TensorRT kernel limits) -- on a MONAI UNet that leaves the full-resolution
output convolution in FP32, which is half of OpenVINO's INT8 time. CPU runtimes want the opposite:

- every Conv/ConvTranspose quantized, whatever its channel count;
- Q/DQ on op *outputs* too (Conv, LeakyRelu, Add, Concat, pools), so ONNX Runtime fuses
  ``DQ -> Conv -> Q`` into ``QLinearConv`` (and QLinearAdd/QLinearConcat/QLinearLeakyRelu) and
  OpenVINO keeps the chain in int8 between convolutions;
- BatchNorm folded into the ConvTranspose before it and single-slope PReLU turned into LeakyRelu
  (``graph_prep``), so normalization/activation are fused instead of breaking the int8 chain; no Q/DQ
  between a remaining normalization and its activation (``fuse_norm_activation``);
- network outputs stay float (the trailing Q/DQ ORT adds on the last op is removed);
- exact conv rewrites (``conv_rewrites``): the identity residual around the full-resolution output conv
  folded into it (always; removes a full-resolution float Add), and on request (``subpixel``, for ONNX
  Runtime) ConvTranspose as a sub-pixel Conv + shuffle, whose Reshape/Transpose then carry int8;
- with s8 activations (OpenVINO), conv chains of 9-15 channels padded to 16 (``channel_padding``, exact):
  OpenVINO's int8 kernels work on 16-channel blocks.

For ONNX Runtime use ``activations="u8"``: with symmetric int8 activations it leaves every conv whose
input also feeds a residual branch in float (measured; u8 fuses them all into ``QLinearConv``).

Calibration and Q/DQ insertion use ONNX Runtime's static quantizer (the engine ModelOpt itself
drives, here in a child process, away from ModelOpt's patches), with per-channel symmetric INT8 weights; activations are symmetric INT8 (``"s8"``, legal
for TensorRT) or asymmetric UINT8 (``"u8"``, which ONNX Runtime's CPU kernels fuse most widely).
The result is always checked by :func:`PTQLogic.onnx_graph.qdq_check.check_qdq`.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import InputError, ModelError
from .child import run_module
from .percentile import DEFAULT_PERCENTILE

PLACEMENTS = ("modelopt", "cpu")  # "modelopt": ModelOpt's TensorRT placement; "cpu": this module
ACTIVATIONS = ("s8", "u8")
CPU_OP_TYPES = ("Conv", "ConvTranspose", "Add", "Concat", "LeakyRelu", "Relu", "MaxPool", "AveragePool",
                "GlobalAveragePool", "Resize", "Mul", "Sigmoid", "Reshape", "Transpose")


@dataclass(frozen=True)
class PlacementReport:
    placement: str
    activations: str
    rewrites: dict[str, int]
    op_types: tuple[str, ...]
    float_outputs: tuple[str, ...]  # network outputs whose trailing Q/DQ was removed (float logits)
    float_convs: tuple[str, ...] = ()  # convs left in float: the target runtime runs them faster that way
    target_cpu: str = "vnni"  # "avx2": weights narrowed to 7 bits for x86 CPUs without VNNI/AMX (weight_range)
    narrowed_tensors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def strip_output_qdq(model) -> list[str]:
    """Remove ``Q -> DQ`` pairs that end at a graph output, so logits are not requantized to 8 bits."""
    from ..onnx_graph.edit import remove_nodes

    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    removed, stripped = set(), []
    for output in model.graph.output:
        dq = producer.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers.get(q.output[0], 0) != 1:
            continue
        source = producer.get(q.input[0])
        if source is None or consumers.get(q.input[0], 0) != 1:
            continue
        source.output[list(source.output).index(q.input[0])] = output.name
        removed.update((id(q), id(dq)))
        stripped.append(output.name)
    remove_nodes(model, removed)
    return stripped


def strip_float_input_qdq(model, float_inputs: dict[str, list[tuple[str, str | None]]]) -> int:
    """Remove the ``Q -> DQ`` pair in front of nodes kept in float when nothing else reads it: a runtime
    would round the values to 8 bits and convert them back for nothing. Returns how many were removed.

    ``float_inputs``: node name -> its inputs before quantization, as (tensor, producing node's name). A pair
    is removed only where it quantizes that very tensor from that very node: with uint8 activations the
    quantizer drops a ``Relu`` in front of a ``QuantizeLinear`` (the zero point clips instead, and the conv
    before it takes over the Relu's output name), and removing that pair would drop the clipping with it.
    """
    from ..onnx_graph.edit import consumer_map, remove_nodes

    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = consumer_map(model)
    outputs = {o.name for o in model.graph.output}
    removed = set()
    for node in (n for n in model.graph.node if n.name and n.name in float_inputs):
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or len(consumers.get(name, [])) != 1 or name in outputs:
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
                continue
            before = float_inputs[node.name]
            source = producer.get(q.input[0])
            if index >= len(before) or (q.input[0], source.name if source else None) != before[index]:
                continue
            node.input[index] = q.input[0]
            removed.update((id(q), id(dq)))
    remove_nodes(model, removed)
    return len(removed) // 2


NORMALIZATIONS = ("InstanceNormalization", "BatchNormalization", "LayerNormalization", "GroupNormalization")
ELEMENTWISE_ACTIVATIONS = ("LeakyRelu", "Relu", "PRelu", "Elu", "Sigmoid", "Tanh", "HardSigmoid")


def fuse_norm_activation(model) -> list[str]:
    """Remove the ``Q -> DQ`` pairs inside a normalization's tail: the reshapes, per-channel affine
    (``Mul``/``Add`` by a constant, as GroupNorm exports) and activation that alone read its output.

    The last op's output Q/DQ stays, so the chain is still int8 from one conv to the next; OpenVINO then
    runs normalization + affine + activation + quantize as one MVN with post-ops (the extra quantize made
    the full-resolution InstanceNorm of a UNet 20% slower), and values are rounded to 8 bits once, not
    two to four times.
    """
    from ..onnx_graph.edit import consumer_map, remove_nodes

    consumers = consumer_map(model)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {n.output[0] for n in model.graph.node  # quantized constants (the quantizer's GroupNorm gamma)
                  if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    outputs = {output.name for output in model.graph.output}

    def in_tail(node, name: str) -> bool:
        if node.op_type in ELEMENTWISE_ACTIVATIONS or node.op_type == "Reshape":
            return node.input[0] == name
        if node.op_type in ("Mul", "Add"):
            return len(node.input) == 2 and any(i != name and i in constants for i in node.input)
        return False

    removed, fused = set(), []
    for norm in model.graph.node:
        if norm.op_type not in NORMALIZATIONS:
            continue
        name, count = norm.output[0], 0
        while name not in outputs and len(consumers.get(name, [])) == 1:
            node = consumers[name][0]
            if node.op_type == "QuantizeLinear":
                dqs = consumers.get(node.output[0], [])
                if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or node.output[0] in outputs:
                    break
                users = consumers.get(dqs[0].output[0], [])
                if len(users) != 1 or dqs[0].output[0] in outputs or not in_tail(users[0], dqs[0].output[0]):
                    break  # this pair feeds the next conv (or more than one op): it stays
                users[0].input[:] = [name if i == dqs[0].output[0] else i for i in users[0].input]
                consumers[name] = users
                removed.update((id(node), id(dqs[0])))
                count += 1
            elif in_tail(node, name):
                name = node.output[0]
            else:
                break
        if count:
            fused.append(norm.name)
    remove_nodes(model, removed)
    return fused


def _reader(input_name: str, calibration: np.ndarray, on_batch: Callable[[int, int], None] | None):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0

        def get_next(self):
            if self.index >= len(calibration):
                return None
            item = {input_name: calibration[self.index:self.index + 1]}
            self.index += 1
            if on_batch is not None:
                on_batch(self.index, len(calibration))
            return item

        def rewind(self) -> None:
            self.index = 0

    return Reader()


def _static_quantize(prepared: str, calibration: np.ndarray, out: str, op_types: list[str], activations: str,
                     method: str, on_batch: Callable[[int, int], None] | None, exclude: list[str] = ()) -> None:
    """ONNX Runtime's static Q/DQ quantizer with the CPU placement settings (runs in a clean child process)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    symmetric = activations == "s8"
    method, _, percentile = method.partition(":")  # "percentile:99.99"
    calibrate_method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}.get(
        method, CalibrationMethod.MinMax)
    clip = {"CalibPercentile": float(percentile), "CalibTensorRangeSymmetric": symmetric} if percentile else {}
    input_name = onnx.load(prepared, load_external_data=False).graph.input[0].name
    quantize_static(
        prepared, out, _reader(input_name, calibration, on_batch),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        nodes_to_exclude=list(exclude),
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=calibrate_method,
        extra_options={
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            "QuantizeBias": False,  # float bias: TensorRT and OpenVINO fold it; no int32 tensors

            "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
            **clip,
        },
    )


ORT_FLOAT_MAX_INPUT_CHANNELS = 3


def ort_float_convs(model) -> list[str]:
    """Convs that ONNX Runtime's CPU kernels run faster in float than as ``QLinearConv`` (measured, 2 cores):

    - those reading at most 3 channels (a network's first layers: 1->16 at 96^3 -> 48^3 took 28 ms as
      QLinearConv against 2.6 ms in float);
    - those writing a network output: the logits stay float, and ONNX Runtime fuses a conv into int8 only
      with an 8-bit output, so ``DQ -> Conv`` runs in float anyway; without Q/DQ in front it skips a
      full-resolution quantize and dequantize (and quantizing the logits made that conv 3.8x slower).
    """
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    chosen = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits or len(inits[node.input[1]].dims) < 3:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if inits[node.input[1]].dims[1] * group <= ORT_FLOAT_MAX_INPUT_CHANNELS or node.output[0] in outputs:
            chosen.append(node.name)
    return [name for name in chosen if name]  # unnamed nodes cannot be excluded by name (prepare_for_int8 names them)


def _run_child(workdir: Path, prepared: Path, calibration: np.ndarray, out_path: Path, op_types: tuple[str, ...],
               activations: str, method: str, on_batch: Callable[[int, int], None] | None,
               float_nodes: list[str] = ()) -> None:
    """Quantize in a child process: ModelOpt monkey-patches ONNX Runtime's calibrators process-wide, which
    breaks a plain ``quantize_static`` run later in the same process (tests, Slicer)."""
    calib_path = workdir / "calibration.npy"
    np.save(calib_path, calibration)
    # Reshape/Transpose carry int8 through the sub-pixel shuffle only (elsewhere they may feed float attention)
    import onnx

    exclude_path = workdir / "exclude.json"
    nodes = onnx.load(str(prepared), load_external_data=False).graph.node
    exclude_path.write_text(json.dumps([n.name for n in nodes if n.name and n.op_type in ("Reshape", "Transpose")
                                        and "_subpixel_" not in n.name] + list(float_nodes)))
    code, tail = run_module("PTQLogic.quantization.placement", [prepared, calib_path, out_path, ",".join(op_types),
                                                                 activations, method, exclude_path], on_batch)
    if code != 0 or not out_path.is_file():
        raise ModelError(f"CPU Q/DQ placement failed (ONNX Runtime quantizer exit code {code}): {tail}")


def quantize_cpu(fp32_onnx: str | Path, calibration: np.ndarray, out_path: str | Path, *,
                 activations: str = "s8", method: str = "max", fold_residual: bool = True,
                 subpixel: bool = False, ort_float: bool | None = None, pad_channels: bool | None = None,
                 on_batch: Callable[[int, int], None] | None = None, target_cpu: str = "auto",
                 percentile: float = DEFAULT_PERCENTILE) -> PlacementReport:
    """Write the CPU-placed Q/DQ INT8 model of ``fp32_onnx`` to ``out_path`` (not atomic: callers stage it).

    ``calibration`` is a float32 array [N, C, *patch] already validated against the model input.
    ``ort_float`` (default: with ``u8`` activations, the ONNX Runtime preset) leaves :func:`ort_float_convs`
    in float. ``pad_channels`` (default: with ``s8`` activations, the OpenVINO placement) pads chains of
    convolutions of 9-15 channels to 16 (:mod:`.channel_padding`). ``target_cpu`` (``"auto"``: this machine)
    ``"avx2"`` narrows the weights to 7 bits, which x86 CPUs without VNNI/AMX need to compute what the graph says
    (:mod:`.weight_range`); ``"vnni"`` keeps 8 bits. ``method`` "percentile": ONNX Runtime's percentile calibrator,
    activation ranges clipped at ``percentile`` (symmetric with ``s8``).
    """
    import onnx

    from ..onnx_graph.edit import drop_unused_initializers

    from ..onnx_graph.graph_prep import prepare_for_int8
    from ..onnx_graph.weight_range import narrow_model, resolve_target_cpu

    target, _ = resolve_target_cpu(target_cpu)
    if activations not in ACTIVATIONS:
        raise InputError(f"Activation type must be one of {ACTIVATIONS}, got {activations!r}.")
    if method not in ("max", "entropy", "percentile"):
        raise InputError(f"Calibration method must be 'max', 'entropy' or 'percentile', got {method!r}.")
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    model = onnx.load(str(fp32_onnx))
    pad = activations == "s8" if pad_channels is None else pad_channels
    rewrites = prepare_for_int8(model, fold_residual=fold_residual, subpixel=subpixel, pad_channels=pad)
    present = {node.op_type for node in model.graph.node}
    op_types = tuple(op for op in CPU_OP_TYPES if op in present and (subpixel or op not in ("Reshape", "Transpose")))
    workdir = Path(tempfile.mkdtemp(prefix=".placement-", dir=out_path.parent))
    try:
        prepared = workdir / "prepared.onnx"
        onnx.save(model, str(prepared))
        float_convs = ort_float_convs(model) if (activations == "u8" if ort_float is None else ort_float) else []
        producers = {o: n.name for n in model.graph.node for o in n.output}
        float_inputs = {n.name: [(i, producers.get(i)) for i in n.input] for n in model.graph.node
                        if n.name in set(float_convs)}
        _run_child(workdir, prepared, np.ascontiguousarray(calibration, dtype=np.float32), out_path, op_types,
                   activations, f"percentile:{percentile}" if method == "percentile" else method, on_batch,
                   float_convs)
        quantized = onnx.load(str(out_path))
        stripped = strip_output_qdq(quantized)
        fused = fuse_norm_activation(quantized)
        unrounded = strip_float_input_qdq(quantized, float_inputs)
        narrowed = narrow_model(quantized).narrowed_tensors if target == "avx2" else 0
        if stripped or fused or unrounded or narrowed:
            drop_unused_initializers(quantized)
            onnx.save(quantized, str(out_path))
        rewrites = {**rewrites, "norm_activation_fused": len(fused), "float_input_qdq_removed": unrounded}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return PlacementReport("cpu", activations, rewrites, op_types, tuple(stripped), tuple(float_convs), target,
                           narrowed)


if __name__ == "__main__":  # the child process of _run_child
    _prepared, _calibration, _out, _ops, _activations, _method, _exclude = sys.argv[1:8]
    _static_quantize(_prepared, np.load(_calibration), _out, _ops.split(","), _activations, _method,
                     lambda done, total: print(f"batch {done} {total}", flush=True),
                     json.loads(Path(_exclude).read_text()))
