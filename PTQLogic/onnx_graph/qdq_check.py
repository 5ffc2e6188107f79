"""Check a Q/DQ ONNX graph against TensorRT's explicit-quantization rules.

Rules (TensorRT "explicit quantization"):
- every QuantizeLinear/DequantizeLinear is INT8 (an int8 zero point; a missing zero point means
  uint8) with all zero points 0 (symmetric); scales are constant, positive and finite;
- activation scales are scalars (per-tensor);
- weight scales are per-channel on the consumer's output-channel axis: Conv axis 0 (length = output
  channels); MatMul/Gemm the output-feature axis. ONNX ConvTranspose weights are [Cin, Cout/g, k...]:
  ModelOpt quantizes them on axis 1 (length Cout/g), which is accepted; axis 0 (older TensorRT
  guidance) is accepted with a note. Per-tensor weight scales are legal in TensorRT and only noted;
- a QuantizeLinear must feed DequantizeLinear nodes only.
A Conv/ConvTranspose/MatMul/Gemm counts as quantized when both its data and weight inputs come
straight from DequantizeLinear nodes.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ModelError

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class QDQReport:
    ok: bool
    violations: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)  # compute node names
    unquantized: dict[str, str] = field(default_factory=dict)  # compute node name -> reason
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # op type -> {"total", "quantized"}
    notes: list[str] = field(default_factory=list)  # legal but worth knowing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{op}: {c.get('quantized', 0)}/{c['total']} quantized" for op, c in self.counts.items()
                 if op in COMPUTE_OPS]
        q = self.counts.get("QuantizeLinear", {}).get("total", 0)
        dq = self.counts.get("DequantizeLinear", {}).get("total", 0)
        state = "OK for TensorRT" if self.ok else f"{len(self.violations)} violation(s), first: {self.violations[0]}"
        return f"Q/DQ {state}; {', '.join(parts) or 'no Conv/MatMul'}; {q} QuantizeLinear, {dq} DequantizeLinear."


class _Graph:
    def __init__(self, model) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.dtypes: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
                        self.dtypes[node.output[0]] = attr.t.data_type
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.graph_outputs = {o.name for o in graph.output}
        for node in self.nodes:  # a QuantizeLinear's integer type: its zero point's, else output_dtype/uint8
            if node.op_type == "QuantizeLinear":
                zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
                self.dtypes[node.output[0]] = self.dtypes.get(zp) if zp else _attr(node, "output_dtype", 2)

    def is_constant(self, name: str) -> bool:
        """An initializer/Constant, possibly behind Identity nodes (exporters emit those for shared weights)."""
        while name not in self.constants and name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        return name in self.constants

    def produced_by(self, name: str, op_type: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type == op_type


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _node_name(node) -> str:
    return node.name or f"{node.op_type}->{node.output[0]}"


def _weight_source(g: _Graph, dq) -> np.ndarray | None:
    """The constant weight behind a DQ (DQ-only int8 initializer, or constant -> Q -> DQ)."""
    source = dq.input[0]
    if source in g.constants:
        return g.constants[source]
    q = g.producer.get(source)
    if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in g.constants:
        return g.constants[q.input[0]]
    return None


def _expected_weight_axes(consumer, weight: np.ndarray) -> tuple[int, ...]:
    """Accepted per-channel axes, preferred first, for a weight feeding ``consumer``'s input 1."""
    if consumer.op_type == "Conv":
        return (0,)
    if consumer.op_type == "ConvTranspose":
        return (1, 0)
    if consumer.op_type == "Gemm":
        return (0,) if _attr(consumer, "transB", 0) else (1,)
    return (weight.ndim - 1,)  # MatMul: [.., K, N]


def _check_scale_and_zero_point(g: _Graph, node, violations: list[str]) -> np.ndarray | None:
    from onnx import TensorProto

    name = _node_name(node)
    scale = g.constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        violations.append(f"{name}: scale is not a constant; TensorRT needs constant Q/DQ scales.")
    elif not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        violations.append(f"{name}: scale has non-positive or non-finite values (min {np.min(scale):.3g}).")
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp_name is None:
        # Without a zero point the integer type comes from DQ's input or Q's output_dtype (uint8 by default).
        if node.op_type == "DequantizeLinear":
            int8 = g.dtypes.get(node.input[0]) == TensorProto.INT8
        else:
            int8 = _attr(node, "output_dtype", TensorProto.UINT8) == TensorProto.INT8
        if not int8:
            violations.append(f"{name}: no zero point and no int8 type, which means uint8; "
                              "TensorRT needs int8 with zero point 0.")
    elif zp_name not in g.constants:
        violations.append(f"{name}: zero point is not a constant.")
    else:
        if g.dtypes.get(zp_name) != TensorProto.INT8:
            dtype = TensorProto.DataType.Name(g.dtypes.get(zp_name, 0))
            violations.append(f"{name}: zero point type is {dtype}; TensorRT needs INT8 (symmetric).")
        if np.any(g.constants[zp_name] != 0):
            violations.append(f"{name}: zero point is not 0 (asymmetric); TensorRT needs symmetric INT8.")
    return scale


def _check_weight_scale(g: _Graph, dq, scale: np.ndarray, weight: np.ndarray, violations, notes) -> None:
    name = _node_name(dq)
    users = [c for c in g.consumers[dq.output[0]] if c.op_type in COMPUTE_OPS and c.input[1] == dq.output[0]]
    if scale.size == 1:
        if users:
            notes.append(f"{name}: per-tensor weight scale (per-channel is more accurate).")
        return
    axis = int(_attr(dq, "axis", 1))
    axis = axis + weight.ndim if axis < 0 else axis
    if scale.ndim != 1 or not 0 <= axis < weight.ndim or scale.shape[0] != weight.shape[axis]:
        violations.append(f"{name}: per-channel scale of shape {list(scale.shape)} on axis {axis} does not "
                          f"match the weight shape {list(weight.shape)}.")
        return
    for user in users:
        accepted = _expected_weight_axes(user, weight)
        if axis not in accepted:
            violations.append(f"{name}: weight scale on axis {axis}, but {user.op_type} "
                              f"{_node_name(user)} needs the output-channel axis {accepted[0]}.")
        elif axis != accepted[0]:
            notes.append(f"{name}: {user.op_type} weight quantized on axis {axis} (ModelOpt uses {accepted[0]}).")


def _compute_node_status(g: _Graph, node) -> str | None:
    """None when quantized, else the reason it is not."""
    reasons = []
    if not g.produced_by(node.input[0], "DequantizeLinear"):
        reasons.append("input not quantized")
    weight = node.input[1] if len(node.input) > 1 else ""
    if not g.produced_by(weight, "DequantizeLinear"):
        if g.is_constant(weight) or node.op_type == "MatMul" and g.produced_by(weight, "Transpose"):
            reasons.append("weight not quantized")
        else:
            reasons.append("weight not constant")
    return "; ".join(reasons) or None


def _load(model: str | Path | Any):
    import onnx

    if not isinstance(model, (str, Path)):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"ONNX model '{path}' does not exist.")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelError(f"'{path}' is not a readable ONNX model: {type(exc).__name__}: {exc}") from None


def uint8_quantizers(model: str | Path | Any) -> list[str]:
    """QuantizeLinear nodes with a uint8 result (ONNX Runtime's asymmetric activations; TensorRT takes int8 only).

    Reads only element types (no weight is converted), so it is cheap enough to run before every TensorRT open."""
    from onnx import TensorProto

    graph = _load(model).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    dtypes.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    found = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
            dtype = dtypes.get(zero_point) if zero_point else _attr(node, "output_dtype", TensorProto.UINT8)
            if dtype == TensorProto.UINT8:
                found.append(_node_name(node))
    return found


def check_qdq(model: str | Path | Any) -> QDQReport:
    """Validate Q/DQ placement and parameters of an ONNX model (path or ``onnx.ModelProto``)."""
    g = _Graph(_load(model))
    violations: list[str] = []
    notes: list[str] = []
    for node in g.nodes:
        if node.op_type not in QDQ_OPS:
            continue
        scale = _check_scale_and_zero_point(g, node, violations)
        if node.op_type == "QuantizeLinear":
            users = g.consumers[node.output[0]]
            if not users or node.output[0] in g.graph_outputs or any(u.op_type != "DequantizeLinear" for u in users):
                violations.append(f"{_node_name(node)}: QuantizeLinear is not followed only by DequantizeLinear.")
            if node.input[0] in g.constants:
                continue  # a weight Q: its DQ is checked below
        if scale is None:
            continue
        weight = _weight_source(g, node) if node.op_type == "DequantizeLinear" else None
        if weight is not None:
            _check_weight_scale(g, node, scale, weight, violations, notes)
        elif scale.size != 1:
            violations.append(f"{_node_name(node)}: activation scale has shape {list(scale.shape)}; "
                              "TensorRT needs per-tensor (scalar) activation scales.")

    quantized: list[str] = []
    unquantized: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for node in g.nodes:
        if node.op_type in COMPUTE_OPS:
            entry = counts.setdefault(node.op_type, {"total": 0, "quantized": 0})
            entry["total"] += 1
            reason = _compute_node_status(g, node)
            if reason is None:
                entry["quantized"] += 1
                quantized.append(_node_name(node))
            else:
                unquantized[_node_name(node)] = reason
    for op, total in Counter(n.op_type for n in g.nodes if n.op_type in QDQ_OPS).items():
        counts[op] = {"total": total}
    return QDQReport(ok=not violations, violations=violations, quantized=quantized, unquantized=unquantized,
                     counts=counts, notes=notes)
