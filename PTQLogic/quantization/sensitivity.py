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

from ..core.progress import Monitor
from .probe import cpu_session, with_outputs

STAGE = "ranking layers"  # one step per held-out patch

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


def rank_sensitivity(fp32_onnx: str | Path, int8_onnx: str | Path, patches: np.ndarray,
                     monitor: Monitor | None = None) -> list[tuple[str, float]]:
    """Quantized compute nodes, most sensitive first, with the relative error each adds on its own.

    Patches are taken one at a time: the FP32 values of every layer's inputs and output for one patch are a
    whole network's activations (3.4 GB for a 128^3 window of TotalSegmentator's 1.5 mm network), so
    holding them for every held-out patch at once does not fit in a laptop's memory."""
    import onnx
    from onnx.utils import Extractor

    int8_model = onnx.load(str(int8_onnx))
    nodes = quantized_compute_nodes(int8_model)
    if not nodes:
        return []
    names = sorted({t for inputs, output in nodes.values() for t in (*inputs, output)})
    fp32 = cpu_session(with_outputs(onnx.load(str(fp32_onnx)), names).SerializeToString())
    input_name = fp32.get_inputs()[0].name
    extractor = Extractor(onnx.shape_inference.infer_shapes(int8_model))
    # no memory arena: a large activation is freed after each run instead of staying reserved in every session
    sessions = {node: cpu_session(extractor.extract_model(inputs, [output]).SerializeToString(), arena=False)
                for node, (inputs, output) in nodes.items()}
    squared = {node: [0.0, 0.0] for node in nodes}  # sum of squared error, sum of squared FP32 output
    monitor = monitor or Monitor()
    for index, patch in enumerate(patches):
        monitor.update(STAGE, index, len(patches))
        ref = dict(zip(names, fp32.run(names, {input_name: patch[None]})))
        for node, (inputs, output) in nodes.items():
            test = sessions[node].run([output], {name: ref[name] for name in inputs})[0]
            expected = ref[output].astype(np.float64)
            squared[node][0] += float(np.sum((test - expected) ** 2))
            squared[node][1] += float(np.sum(expected ** 2))
        del ref
    monitor.update(STAGE, len(patches), len(patches))
    scores = {node: float(np.sqrt(err / max(norm, 1e-30))) for node, (err, norm) in squared.items()}
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)
