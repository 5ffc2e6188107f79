"""Counting things in Q/DQ ONNX graphs, for tests that check what a runtime runs in INT8."""
from __future__ import annotations

import onnx


def convs_after_a_concat(path) -> int:
    """Quantized convolutions whose input is a Concat's Q/DQ pair."""
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}

    def through_qdq(name: str) -> str:
        dq = producer.get(name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        return source.op_type if source is not None else ""

    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return sum(n.op_type in ("Conv", "ConvTranspose") and n.input[1] in dq_outputs and through_qdq(n.input[0]) == "Concat"
               for n in graph.node)
