"""Exact rewrite: pad a narrow convolution chain to 16 channels for OpenVINO's AMX/AVX-512 int8 kernels.

A MONAI UNet's top up-block carries one channel per class at full resolution (14 for 13 organs):
``ConvTranspose -> InstanceNorm -> LeakyRelu -> Conv``. OpenVINO's int8 kernels work on blocks of 16
channels: on a 96^3 patch on 2 cores its int8 instance normalization over those 14 channels ran 7.4 ms
against 3.3 ms over 16, and the UNet-IN INT8 call 30.3 -> 24.4 ms (``benchmarks/README.md``, sixth round).

The producer gets extra output channels with zero weights and bias, the per-channel ops on the way get
neutral parameters (InstanceNorm scale 1, bias 0), and every consumer conv gets zero weights for them:
the extra channels hold exact zeros, so they change neither the result nor a per-tensor activation range.
Only chains of 9-15 channels that end in convolutions are padded: narrower ones would double their
weights (and the file) for an unmeasured gain. Never a network output, never a tensor read inside a
subgraph; weights and parameters become new initializers, shared ones stay.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import onnx
from onnx import numpy_helper

from .edit import attribute, consumer_map

_PER_CHANNEL = ("InstanceNormalization", "LeakyRelu", "Relu")


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers (not those a caller may override as graph inputs) and Constant node values."""
    overridable = {i.name for i in model.graph.input}
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name not in overridable}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def _names_in_use(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {t.name for t in graph.initializer} | {v.name for v in graph.value_info}
    names |= {v.name for v in graph.input} | {v.name for v in graph.output}
    return names | {o for n in graph.node for o in n.output}


def _chain(start: str, consumers, outputs: set[str]) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]] | None:
    """The per-channel ops after ``start`` and the convs that read the chain's end, or None if not paddable."""
    ops, name = [], start
    while True:
        if name in outputs or not consumers[name]:
            return None
        readers = consumers[name]
        if len(readers) == 1 and readers[0].op_type in _PER_CHANNEL and readers[0].input[0] == name:
            ops.append(readers[0])
            name = readers[0].output[0]
            continue
        if all(r.op_type == "Conv" and r.input[0] == name and name not in r.input[1:] for r in readers):
            return ops, readers
        return None


def pad_channels(model: onnx.ModelProto, multiple: int = 16) -> int:
    """Pad every Conv/ConvTranspose -> per-channel ops -> Conv chain of more than ``multiple // 2`` and fewer
    than ``multiple`` channels to ``multiple``, in place; returns how many chains were padded."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return 0  # If/Loop bodies may read any tensor; their readers are not followed
    arrays = _constants(model)
    consumers = consumer_map(model)
    outputs = {o.name for o in model.graph.output}
    new = partial(_replace, arrays, _names_in_use(model), model)  # new(node, input index, array, name)
    changed: set[str] = set()
    padded = 0
    for producer in list(model.graph.node):
        if producer.op_type not in ("Conv", "ConvTranspose") or attribute(producer, "group", 1) != 1:
            continue
        if producer.input[1] not in arrays or (len(producer.input) > 2 and producer.input[2] not in arrays):
            continue
        weight = arrays[producer.input[1]]
        axis = 1 if producer.op_type == "ConvTranspose" else 0
        channels = weight.shape[axis]
        found = _chain(producer.output[0], consumers, outputs) if multiple // 2 < channels < multiple else None
        if found is None:
            continue
        ops, convs = found
        norms = [op for op in ops if op.op_type == "InstanceNormalization"]
        if any(op.input[1] not in arrays or op.input[2] not in arrays or attribute(op, "epsilon", 1e-5) <= 0
               for op in norms):  # with epsilon 0 a zero channel normalizes to 0/0
            continue
        if any(attribute(c, "group", 1) != 1 or c.input[1] not in arrays for c in convs):
            continue
        extra = multiple - channels
        base = producer.name or producer.output[0]
        new(producer, 1, _pad(weight, axis, extra), f"{base}_padded_w")
        if len(producer.input) > 2:
            new(producer, 2, _pad(arrays[producer.input[2]], 0, extra), f"{base}_padded_b")
        for op in norms:
            new(op, 1, _pad(arrays[op.input[1]], 0, extra, fill=1.0), f"{op.name}_padded_scale")
            new(op, 2, _pad(arrays[op.input[2]], 0, extra), f"{op.name}_padded_bias")
        for conv in convs:
            new(conv, 1, _pad(arrays[conv.input[1]], 1, extra), f"{conv.name or conv.output[0]}_padded_w")
        changed |= {producer.output[0], *(op.output[0] for op in ops)}
        padded += 1
    if changed:  # their channel counts changed; shape inference recomputes them
        keep = [v for v in model.graph.value_info if v.name not in changed]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        _drop_unused_constants(model)
    return padded


def _pad(array: np.ndarray, axis: int, extra: int, fill: float = 0.0) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, extra)
    return np.pad(array, widths, constant_values=fill)


def _replace(arrays: dict[str, np.ndarray], names: set[str], model: onnx.ModelProto, node: onnx.NodeProto,
             index: int, array: np.ndarray, name: str) -> None:
    """Point ``node``'s input ``index`` at a new initializer holding ``array`` (a shared one stays as it was)."""
    unique, k = name, 0
    while unique in names:
        k += 1
        unique = f"{name}_{k}"
    names.add(unique)
    model.graph.initializer.append(numpy_helper.from_array(array, unique))
    arrays[unique] = array
    node.input[index] = unique


def _drop_unused_constants(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in used]
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
