"""ONNX graphs TensorRT builds from, derived at build time from a model folder's files.

- :func:`make_fp16_onnx`: FP16 copy of the FP32 graph (strongly typed TensorRT builds FP16 only from FP16 types).
- :func:`make_int8_fp16_onnx`: the INT8 Q/DQ graph with FP16 as the high precision (everything not quantized
  runs in FP16 on strongly typed TensorRT 10/11, as the INT8+FP16 flags do on 8.6). ModelOpt's own
  conversion (``convert_to_f16``, what ``quantize(high_precision_dtype="fp16")`` runs) writes opset 19 with
  FP16 scales; the FP32-high-precision ``int8.onnx`` stays the artifact the CPU runtimes use.
- :func:`dq_only_to_qdq`: INT8 weight initializers back to FP32 + Q/DQ for TensorRT 8.6.
- :func:`decompose_instancenorm`: InstanceNormalization as elementary ops, for TensorRT without a native
  InstanceNorm (8.6.0 and older parse it into a plugin that needs cuDNN 8).
- :func:`dequantize_interpolation_inputs`: no Q/DQ pair right before a linear/cubic Resize, for TensorRT 8.6.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..core.errors import ModelError
from ..core.fileio import atomic_path


def _load(src: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(src))
    except Exception as exc:
        raise ModelError(f"Cannot read ONNX '{src}': {exc}") from None


def make_fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """FP16 copy of an FP32 ONNX with FP32 inputs/outputs (for strongly-typed TensorRT FP16 engines)."""
    from onnxconverter_common import float16

    model = _load(src)
    fp16 = float16.convert_float_to_float16(model, keep_io_types=True)
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(fp16, str(tmp))
    return dst


def _along_axis(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-tensor values stay scalars; per-channel values broadcast along ``axis``."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0:
        return values
    return values.reshape([-1 if i == axis % ndim else 1 for i in range(ndim)])


def dq_only_to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn INT8 weight initializers + DequantizeLinear into FP32 initializer + QuantizeLinear + DequantizeLinear.

    Same scales, zero points and axis, so the dequantized weights are bit-identical; the file gets
    ~4x larger, which is why this runs only at build time for TensorRT versions that need it.
    Returns a new model; the argument is not modified.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes = []
    for node in graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if weight is None or weight.data_type != onnx.TensorProto.INT8 or attrs.get("block_size"):
            new_nodes.append(node)
            continue
        q = numpy_helper.to_array(weight).astype(np.float32)
        axis = attrs.get("axis", 1)
        scale = numpy_helper.to_array(inits[node.input[1]])
        zero = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
        weight_float = (q - _along_axis(zero, q.ndim, axis)) * _along_axis(scale, q.ndim, axis)
        float_name = f"{weight.name}_float"
        graph.initializer.append(numpy_helper.from_array(weight_float.astype(scale.dtype), float_name))
        quantized_name = f"{weight.name}_QuantizeLinear_Output"
        new_nodes.append(onnx.helper.make_node(
            "QuantizeLinear", [float_name, *node.input[1:]], [quantized_name],
            name=f"{node.name or weight.name}_weight_QuantizeLinear",
            **({"axis": attrs["axis"]} if "axis" in attrs else {}),
        ))
        node.input[0] = quantized_name
        new_nodes.append(node)
        users[weight.name] -= 1
        if users[weight.name] == 0:
            graph.initializer.remove(weight)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


def _interpolates(node: onnx.NodeProto) -> bool:
    """A Resize that computes new values (linear, cubic); ``nearest`` (ONNX's default) only copies them."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return node.op_type == "Resize" and mode != b"nearest"


def dequantize_interpolation_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every linear/cubic Resize reading the float tensor its input Q/DQ pair was made from.

    ModelOpt quantizes the input of SegResNet's trilinear upsampling; TensorRT 8.6.0 then asks for an INT8
    trilinear 3D Resize, which it has not ("Could not find any implementation for node .../Resize", on an H100).
    Skipping that one rounding step only brings the Resize closer to FP32. A Q or DQ that other nodes still read
    stays. Returns a new model (the argument itself when nothing changes); the argument is not modified.
    """
    if not any(_interpolates(node) for node in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    changed = False
    for node in graph.node:
        dq = producers.get(node.input[0]) if _interpolates(node) and node.input else None
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[0] = q.input[0]
            changed = True
    dropped: set[str] = set()
    for _ in range(2 if changed else 0):  # a DQ nothing reads now, then the Q only that DQ read
        read = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        unread = [n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in read for n in graph.node]
        kept = [n for n, drop in zip(graph.node, unread) if not drop]
        dropped |= {name for n, drop in zip(graph.node, unread) if drop for name in n.input}
        del graph.node[:]
        graph.node.extend(kept)
    read = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name in dropped and i.name not in read]  # their scales, zero points
    for init in unused:
        graph.initializer.remove(init)
    return model


def int8_fp16_converter() -> str | None:
    """``"modelopt <version>"`` when the INT8-with-FP16 conversion is available here, else None."""
    try:
        import modelopt
        from modelopt.onnx.autocast import convert_to_f16  # noqa: F401
    except Exception:
        return None
    return f"modelopt {modelopt.__version__}"


def make_int8_fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """Copy of a Q/DQ INT8 ONNX whose unquantized part is FP16 (FP32 inputs/outputs kept)."""
    from modelopt.onnx.autocast import convert_to_f16

    model = _load(src)
    if not any(node.op_type == "DequantizeLinear" for node in model.graph.node):
        raise ModelError(f"'{src}' has no DequantizeLinear nodes; it is not an INT8 Q/DQ model.")
    try:
        converted = convert_to_f16(model, low_precision_type="fp16", keep_io_types=True)
    except Exception as exc:
        raise ModelError(f"Converting the high precision of '{src}' to FP16 failed: {type(exc).__name__}: {exc}") from None
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(converted, str(tmp))
    return dst


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(element type, rank) of every tensor whose shape inference knows them."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values
            if v.type.tensor_type.HasField("shape")}


# doc_string of every node decompose_instancenorm writes: how a TensorRT build finds the norms' layers again
DECOMPOSED_NORM_MARK = "ptqseg: decomposed InstanceNormalization"


def decomposed_norm_prefixes(model: onnx.ModelProto) -> set[str]:
    """Name prefixes ("<norm>/") shared by the nodes of each decomposed norm; TensorRT names layers after them."""
    return {node.name.rsplit("/", 1)[0] + "/" for node in model.graph.node if node.doc_string == DECOMPOSED_NORM_MARK}


def decompose_instancenorm(model: onnx.ModelProto, fp16_guard: bool = True) -> onnx.ModelProto:
    """Every InstanceNormalization node as elementary ops, with scale and bias broadcast over the channel axis.
    Returns a new model; the argument is not modified.

    TensorRT 8.6.0's parser maps InstanceNormalization to a plugin that needs cuDNN 8 at build and run time
    (and fails without it); elementary ops are built from TensorRT's own kernels. With ``fp16_guard`` (plans that
    may run these ops in FP16) the centred values are divided by their largest magnitude m (at least 1e-3) before
    squaring, so FP16 cannot overflow (a plain (x - mean)^2 does once |x - mean| > 256):
    y = (d / m) / sqrt(mean((d / m)^2) + eps / m^2) = d / sqrt(var + eps). That ReduceMax is costly (1.5 ms per
    norm at 96³ on an H100, 25x a ReduceMean; about 20 ms in an INT8 plan), so FP32 plans go without it:
    y = d / sqrt(mean(d^2) + eps), and so may FP16/INT8 plans that keep these nodes in FP32 (their nodes carry
    :data:`DECOMPOSED_NORM_MARK`, see :func:`decomposed_norm_prefixes`).
    """
    if not any(n.op_type == "InstanceNormalization" for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, opset, types = model.graph, _opset(model), _tensor_types(model)
    inits = {i.name: i for i in graph.initializer}
    replaced: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization":
            new_nodes.append(node)
            continue
        x, scale, bias = node.input[:3]
        if x not in types:
            raise ModelError(f"Cannot tell the rank of the input of '{node.name}' (InstanceNormalization) to rewrite it "
                             "for this TensorRT; export the model with static shapes.")
        dtype, rank = types[x]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        tag = f"{node.name or 'InstanceNormalization'}_{index}"
        axes = list(range(2, rank))
        channel_shape = [1, -1] + [1] * (rank - 2)

        def name(part: str) -> str:
            return f"{tag}/{part}"

        def add(op: str, inputs: list[str], part: str, **attrs) -> str:
            new_nodes.append(onnx.helper.make_node(op, inputs, [name(part)], name=name(part),
                                                   doc_string=DECOMPOSED_NORM_MARK, **attrs))
            return name(part)

        def constant(part: str, value, data_type: int = dtype) -> str:
            graph.initializer.append(onnx.helper.make_tensor(name(part), data_type, np.shape(value),
                                                             np.ravel(value).tolist()))
            return name(part)

        def reduce(op: str, src: str, part: str) -> str:
            if opset >= 18:
                return add(op, [src, axes_name], part, keepdims=1)
            return add(op, [src], part, axes=axes, keepdims=1)

        def per_channel(src: str, part: str) -> str:
            if src in inits:  # a constant: reshaped once, no node needed
                replaced.add(src)
                reshaped = numpy_helper.to_array(inits[src]).reshape(channel_shape)
                graph.initializer.append(numpy_helper.from_array(reshaped, name(part)))
                return name(part)
            return add("Reshape", [src, constant(f"{part}_shape", channel_shape, onnx.TensorProto.INT64)], part)

        axes_name = constant("axes", axes, onnx.TensorProto.INT64) if opset >= 18 else ""
        centered = add("Sub", [x, reduce("ReduceMean", x, "mean")], "centered")
        if fp16_guard:
            largest = add("Max", [reduce("ReduceMax", add("Abs", [centered], "magnitude"), "largest_magnitude"),
                                  constant("smallest_scale", 1e-3)], "scale_down")
            unit = add("Div", [centered, largest], "unit")
            epsilon = add("Div", [constant("eps_value", eps), add("Mul", [largest, largest], "scale_squared")],
                          "epsilon")
        else:
            unit, epsilon = centered, constant("eps_value", eps)
        variance = reduce("ReduceMean", add("Mul", [unit, unit], "squared"), "variance")
        std = add("Sqrt", [add("Add", [variance, epsilon], "variance_eps")], "std")
        scaled = add("Mul", [add("Div", [unit, std], "normalized"), per_channel(scale, "scale")], "scaled")
        new_nodes.append(onnx.helper.make_node("Add", [scaled, per_channel(bias, "bias")], [node.output[0]],
                                               name=name("shifted"), doc_string=DECOMPOSED_NORM_MARK))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input}
    for init in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
        graph.initializer.remove(init)
    return model
