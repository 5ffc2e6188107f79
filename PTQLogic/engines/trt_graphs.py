"""ONNX graphs TensorRT builds from, derived at build time from a model folder's files.

- :func:`make_fp16_onnx`: FP16 copy of the FP32 graph (strongly typed TensorRT builds FP16 only from FP16 types).
- :func:`make_int8_fp16_onnx`: the INT8 Q/DQ graph with FP16 as the high precision (everything not quantized
  runs in FP16 on strongly typed TensorRT 10/11, as the INT8+FP16 flags do on 8.6). ModelOpt's own
  conversion (``convert_to_f16``, what ``quantize(high_precision_dtype="fp16")`` runs) writes opset 19 with
  FP16 scales; the FP32-high-precision ``int8.onnx`` stays the artifact the CPU runtimes use.
- :func:`dq_only_to_qdq`: INT8 weight initializers back to FP32 + Q/DQ for TensorRT 8.6.
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
