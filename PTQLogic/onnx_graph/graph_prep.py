"""Graph rewrites that make a float ONNX graph quantize into fused INT8 chains on CPU runtimes.

- ``Identity`` nodes in front of initializers are bypassed (exporters emit them for shared weights);
- ``BatchNormalization`` after a Conv/ConvTranspose is folded into that layer's weights and bias
  (PyTorch's exporter folds it only after Conv), so the layer's output goes straight to the activation;
- ``PRelu`` with one learned slope (MONAI's default ``PReLU()``) becomes ``LeakyRelu(alpha)``: both
  runtimes have an INT8 kernel (ONNX Runtime ``QLinearLeakyRelu``) or a conv post-op for it.
The rewritten graph computes the same function (checked in the tests to 1e-4).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .channel_padding import pad_channels as pad
from .conv_rewrites import convtranspose_to_subpixel, fold_identity_residual
from .edit import consumer_map, drop_unused_initializers, initializers, remove_nodes, set_initializer




def bypass_identities(model: onnx.ModelProto) -> int:
    """Remove Identity nodes whose input is an initializer; consumers read the initializer directly."""
    inits = initializers(model)
    outputs = {o.name for o in model.graph.output}
    rename = {n.output[0]: n.input[0] for n in model.graph.node
              if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not rename:
        return 0
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in rename)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(rename)


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node, and every repeat of a name, a unique name: the quantizer's exclusion list
    matches nodes by name (an empty name would match every unnamed node) and its calibration session
    rejects repeated names. Returns how many were (re)named."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    named = 0
    for index, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:  # the first node of a name keeps it
            seen.add(node.name)
            continue
        name, k = f"{node.op_type}_{index}", 0
        while name in taken:
            k += 1
            name = f"{node.op_type}_{index}_{k}"
        node.name = name
        taken.add(name)
        named += 1
    return named








def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold inference BatchNormalization into the Conv/ConvTranspose that feeds it (sole consumer only)."""
    inits = initializers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = consumer_map(model)
    graph_outputs = {o.name for o in model.graph.output}
    removed, folded = set(), 0
    for bn in model.graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(consumers[conv.output[0]]) != 1:
            continue
        if conv.output[0] in graph_outputs or not all(name in inits for name in bn.input[1:5]):
            continue
        if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
            continue
        if sum(1 for n in model.graph.node for i in n.input if i == conv.input[1]) != 1:
            continue  # shared weight: folding would change the other user
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in bn.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if conv.op_type == "Conv":
            weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
        else:  # ConvTranspose weight [Cin, Cout/group, k...]; output channel o = g * Cout/g + j
            cin, cout_g = weight.shape[:2]
            w = weight.reshape(group, cin // group, cout_g, *weight.shape[2:])
            w = w * scale.reshape(group, 1, cout_g, *([1] * (weight.ndim - 2)))
            weight = w.reshape(weight.shape)
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros_like(scale)
        bias = (bias - mean) * scale + beta
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype
        set_initializer(model, conv.input[1], weight.astype(dtype))
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else conv.name + "_folded_bias"
        set_initializer(model, bias_name, bias.astype(dtype))
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    remove_nodes(model, removed)
    return folded


def prelu_to_leakyrelu(model: onnx.ModelProto) -> int:
    """Replace PRelu nodes whose slope is a single constant with LeakyRelu(alpha=slope)."""
    inits = initializers(model)
    changed = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "PRelu" or node.input[1] not in inits:
            continue
        slope = numpy_helper.to_array(inits[node.input[1]])
        if slope.size != 1:
            continue
        leaky = helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name or f"leaky_{i}",
                                 alpha=float(slope.reshape(-1)[0]))
        model.graph.node[i].CopyFrom(leaky)
        changed += 1
    return changed


def prepare_for_int8(model: onnx.ModelProto, *, fold_residual: bool = False, subpixel: bool = False,
                     shuffle: str = "steps", pad_channels: bool = False) -> dict[str, int]:
    """Apply the rewrites in place (``conv_rewrites``' two and ``channel_padding`` on request; ``shuffle``: the
    sub-pixel shuffle's form, ``"depth_to_space"`` for graphs that stay float); returns how many of each were made."""
    counts = {"nodes_named": name_unnamed_nodes(model), "identities_bypassed": bypass_identities(model)}
    counts["batchnorm_folded"] = fold_batchnorm(model)
    counts["prelu_to_leakyrelu"] = prelu_to_leakyrelu(model)
    if fold_residual:
        counts["identity_residual_folded"] = fold_identity_residual(model)
    if subpixel:
        counts["convtranspose_to_subpixel"] = convtranspose_to_subpixel(model, shuffle)
    if pad_channels:
        counts["channels_padded"] = pad(model)
    drop_unused_initializers(model)
    return counts

