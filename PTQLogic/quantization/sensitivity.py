"""Which quantized layers cost the most accuracy, each measured on its own with ONNX Runtime.

For every quantized compute node (Conv, ConvTranspose, MatMul, Gemm) of the Q/DQ graph, the
subgraph from its float inputs to its output (the input Q/DQ, the weight DQ and the node) is cut out
and fed the *FP32* model's values of those inputs on held-out patches. Its relative L2 error against
the FP32 output is the error this layer's quantization adds by itself, independent of errors it
would inherit from layers before it (which make end-to-end per-layer errors useless for ranking).
ModelOpt keeps the original tensor names when it inserts Q/DQ nodes, so both graphs share them.
Only ModelOpt-placed graphs qualify (the guard refuses the CPU placement): its rewrites change
tensors, and ``channel_padding`` channel counts, so FP32 values would not fit its subgraphs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .probe import cpu_session, with_outputs

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _float_sources(node, producers: dict, initializers: set[str]) -> list[str]:
    """The activation tensors that feed ``node``, looking through Q/DQ pairs; weights are skipped."""
    sources = []
    for name in node.input:
        if not name or name in initializers:
            continue
        dq = producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            if dq.input[0] in initializers:
                continue  # a DQ-only weight
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                name = q.input[0]
                if name in initializers:
                    continue  # FP32 weight with Q/DQ
        sources.append(name)
    return sources


def quantized_compute_nodes(int8_model) -> dict[str, tuple[list[str], str]]:
    """node name -> (float activation inputs, output) for compute nodes whose input goes through a DQ."""
    producers = {out: node for node in int8_model.graph.node for out in node.output}
    initializers = {init.name for init in int8_model.graph.initializer}
    found: dict[str, tuple[list[str], str]] = {}
    for node in int8_model.graph.node:
        if node.op_type not in COMPUTE_OPS or not node.input:
            continue
        first = producers.get(node.input[0])
        if first is None or first.op_type != "DequantizeLinear":
            continue
        found[node.name] = (_float_sources(node, producers, initializers), node.output[0])
    return found


def _fp32_values(fp32_model, names: list[str], patches: np.ndarray) -> dict[str, list[np.ndarray]]:
    session = cpu_session(with_outputs(fp32_model, names).SerializeToString())
    input_name = session.get_inputs()[0].name
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for patch in patches:
        for name, value in zip(names, session.run(names, {input_name: patch[None]})):
            values[name].append(value)
    return values


def _relative_error(test: list[np.ndarray], ref: list[np.ndarray]) -> float:
    num = sum(float(np.sum((t.astype(np.float64) - r) ** 2)) for t, r in zip(test, ref))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return float(np.sqrt(num / max(den, 1e-30)))


def rank_sensitivity(fp32_onnx: str | Path, int8_onnx: str | Path, patches: np.ndarray) -> list[tuple[str, float]]:
    """Quantized compute nodes, most sensitive first, with the relative error each adds on its own."""
    import onnx
    from onnx.utils import Extractor

    int8_model = onnx.load(str(int8_onnx))
    nodes = quantized_compute_nodes(int8_model)
    if not nodes:
        return []
    names = sorted({t for inputs, output in nodes.values() for t in (*inputs, output)})
    ref = _fp32_values(onnx.load(str(fp32_onnx)), names, patches)
    int8_model = onnx.shape_inference.infer_shapes(int8_model)
    extractor = Extractor(int8_model)
    scores = {}
    for node, (inputs, output) in nodes.items():
        session = cpu_session(extractor.extract_model(inputs, [output]).SerializeToString())
        test = [session.run([output], {name: ref[name][i] for name in inputs})[0] for i in range(len(patches))]
        scores[node] = _relative_error(test, ref[output])
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)
