"""Exact rewrites of convolution patterns that CPU runtimes run slowly, applied before Q/DQ placement.

- **ConvTranspose -> sub-pixel Conv.** A transposed convolution with stride ``s`` whose output is exactly
  ``s`` times its input (``kernel + output_padding - 2 * pad == s`` per axis, MONAI's and nnU-Net's
  up-sampling layers) equals a plain convolution producing ``s^d`` times the channels, one group per
  output phase, followed by a pixel shuffle (``Reshape``/``Transpose`` steps). ONNX Runtime's 3D
  ConvTranspose is a slow reference loop (two thirds of a MONAI UNet's time) and has no INT8 kernel;
  a Conv has both. A ``LeakyRelu``/``Relu`` right after it moves in front of the shuffle so it stays
  fused to the convolution.
- **Identity residual folded into the convolution.** ``Add(Conv(x), x)`` with a same-size convolution
  (MONAI's ``ResidualUnit`` with ``last_conv_only``, at the network's full-resolution output) equals one
  Conv whose centre tap gets the identity added: the full-resolution float Add disappears.

Both keep the function (checked to 1e-4 in the tests) and need static spatial sizes (batch may vary).
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .edit import attribute, consumer_map, initializers, remove_nodes, set_initializer

_ELEMENTWISE_AFTER = ("LeakyRelu", "Relu")




def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _phase_taps(kernel: int, stride: int, pad: int) -> tuple[int, int, list[list[tuple[int, int]]]]:
    """Per output phase r: the (input offset, kernel tap) pairs; offsets span [lo, hi] over all phases.

    Output ``o = s*m + r`` receives input ``i = m + off`` through tap ``k = o - s*i + pad = r + pad - s*off``.
    """
    taps = [[(off, r + pad - stride * off) for off in range(-kernel, kernel + 1)
             if 0 <= r + pad - stride * off < kernel] for r in range(stride)]
    offsets = [off for phase in taps for off, _ in phase]
    return min(offsets), max(offsets), taps


def _subpixel_weight(weight: np.ndarray, stride: int, kernel: int, pad: int, dims: int) -> tuple[np.ndarray, int, int]:
    """ConvTranspose weight [Cin, Cout, k..] -> Conv weight [Cout * s^d, Cin, K..] (phase-minor channels)."""
    lo, hi, taps = _phase_taps(kernel, stride, pad)
    cin, cout = weight.shape[:2]
    size = hi - lo + 1
    out = np.zeros((cout, stride ** dims, cin) + (size,) * dims, dtype=np.float64)
    for p, phase in enumerate(itertools.product(range(stride), repeat=dims)):
        for combo in itertools.product(*(taps[r] for r in phase)):
            position = tuple(off - lo for off, _ in combo)
            tap = tuple(k for _, k in combo)
            out[(slice(None), p, slice(None)) + position] = weight[(slice(None), slice(None)) + tap].T
    return out.reshape(cout * stride ** dims, cin, *(size,) * dims), lo, hi


SHUFFLES = ("steps", "depth_to_space")


def _shape(model: onnx.ModelProto, name: str, shape: list[int]) -> str:
    set_initializer(model, name, np.array(shape, dtype=np.int64))
    return name


def _depth_to_space_shuffle(model: onnx.ModelProto, base: str, source: str, out: str, channels: int, stride: int,
                            spatial: list[int]) -> list[onnx.NodeProto]:
    """The float pixel shuffle: ``DepthToSpace`` interleaves the last two phases (over depth x height merged,
    which keeps each depth slice's rows together), a block transpose moves the depth phase in behind depth.
    Float32, 14 x 96^3, 2 cores: 38 ms, against 56 ms as single-axis steps and 73 ms as one transpose."""
    s = stride
    if len(spatial) == 2:
        return [helper.make_node("DepthToSpace", [source], [out], blocksize=s, mode="CRD", name=f"{base}_subpixel_d2s")]
    d, h, w = spatial
    r0, d2s, r1, moved = (f"{base}_subpixel_{k}" for k in ("r0", "d2s", "r1", "t"))
    return [
        helper.make_node("Reshape", [source, _shape(model, f"{base}_subpixel_shape0", [-1, s * s, d * h, w])], [r0],
                         name=f"{base}_subpixel_reshape0"),
        helper.make_node("DepthToSpace", [r0], [d2s], blocksize=s, mode="CRD", name=f"{base}_subpixel_d2s"),
        helper.make_node("Reshape", [d2s, _shape(model, f"{base}_subpixel_shape1", [-1, s, d, s * s * h * w])], [r1],
                         name=f"{base}_subpixel_reshape1"),
        helper.make_node("Transpose", [r1], [moved], perm=[0, 2, 1, 3], name=f"{base}_subpixel_transpose"),
        helper.make_node("Reshape", [moved, _shape(model, f"{base}_subpixel_shape2",
                                                   [-1, channels, s * d, s * h, s * w])], [out],
                         name=f"{base}_subpixel_reshape2"),
    ]


def _pixel_shuffle(model: onnx.ModelProto, base: str, source: str, out: str, channels: int, stride: int,
                   spatial: list[int]) -> list[onnx.NodeProto]:
    """[N, C * s^d, n..] (phase-minor channels) -> [N, C, s * n..] as one single-axis move per spatial axis.

    Each step moves the leading phase axis in behind its spatial axis, the move ONNX Runtime's Transpose
    has a fast path for on 8-bit data (one 2d-axis permutation ran 52 ms on uint8 for 14 x 96^3, these
    steps 12 ms on 2 cores); a Reshape between steps merges the axes just interleaved, so the steps are
    not recombined.
    """
    dims = len(spatial)
    nodes, current = [], source
    for k in range(dims + 1):
        shape = [-1] + [stride] * (dims - k) + [stride * n for n in spatial[:k]] + spatial[k:]
        if k == dims:
            shape = [-1, channels] + [stride * n for n in spatial]
        reshaped = out if k == dims else f"{base}_subpixel_r{k}"
        shape_name = _shape(model, f"{base}_subpixel_shape{k}", shape)
        nodes.append(helper.make_node("Reshape", [current, shape_name], [reshaped], name=f"{base}_subpixel_reshape{k}"))
        if k == dims:
            break
        rank = len(shape)  # move axis 1 (this phase) in behind its spatial axis, at index dims + 1
        perm = [0] + list(range(2, dims + 2)) + [1] + list(range(dims + 2, rank))
        current = f"{base}_subpixel_t{k}"
        nodes.append(helper.make_node("Transpose", [reshaped], [current], perm=perm,
                                      name=f"{base}_subpixel_transpose{k}"))
    return nodes


def convtranspose_to_subpixel(model: onnx.ModelProto, shuffle: str = "steps") -> int:
    """Replace eligible ConvTranspose nodes by Conv + pixel shuffle; returns how many were replaced.

    ``shuffle``: ``"steps"`` (single-axis transposes, fastest on 8-bit data: for INT8 graphs) or
    ``"depth_to_space"`` (fastest in float on ONNX Runtime, 2D and 3D; other ranks use steps)."""
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    inits = initializers(model)
    shapes = _static_shapes(model)
    consumers = consumer_map(model)
    graph_outputs = {o.name for o in model.graph.output}
    new_nodes, replaced = [], 0
    moved: set[int] = set()
    for node in model.graph.node:
        if id(node) in moved:
            continue
        if node.op_type != "ConvTranspose" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        dims = weight.ndim - 2
        kernels = list(weight.shape[2:])
        strides = list(attribute(node, "strides", [1] * dims))
        pads = list(attribute(node, "pads", [0] * 2 * dims))
        out_pad = list(attribute(node, "output_padding", [0] * dims))
        in_shape = shapes.get(node.input[0])
        ok = (attribute(node, "group", 1) == 1 and list(attribute(node, "dilations", [1] * dims)) == [1] * dims
              and attribute(node, "output_shape", None) is None and attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
              and len(set(strides)) == 1 and len(set(kernels)) == 1 and len(set(pads)) == 1 and len(set(out_pad)) == 1
              and strides[0] > 1 and kernels[0] + out_pad[0] - 2 * pads[0] == strides[0]
              and in_shape is not None and len(in_shape) == dims + 2 and all(in_shape[2:])
              and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits))
        if not ok:
            new_nodes.append(node)
            continue
        s, cout, spatial = strides[0], weight.shape[1], list(in_shape[2:])
        conv_weight, lo, hi = _subpixel_weight(weight.astype(np.float64), s, kernels[0], pads[0], dims)
        base = f"{node.name or node.output[0]}_{replaced}"  # unique even where names and tensors collide
        w_name, b_name = f"{base}_subpixel_w", f"{base}_subpixel_b"
        set_initializer(model, w_name, conv_weight.astype(weight.dtype))
        conv_inputs = [node.input[0], w_name]
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]])
            set_initializer(model, b_name, np.repeat(bias, s ** dims).astype(bias.dtype))
            conv_inputs.append(b_name)
        out = node.output[0]
        after = consumers.get(out, [])
        act = after[0] if (len(after) == 1 and after[0].op_type in _ELEMENTWISE_AFTER and out not in graph_outputs) else None
        conv_out = f"{base}_subpixel"
        new_nodes.append(helper.make_node("Conv", conv_inputs, [conv_out], name=f"{base}_subpixel_conv",
                                          kernel_shape=[hi - lo + 1] * dims, pads=[-lo] * dims + [hi] * dims))
        shuffle_in = conv_out
        if act is not None:  # elementwise: commutes with the shuffle, and stays fused to the Conv
            shuffle_in = f"{base}_subpixel_act"
            new_nodes.append(helper.make_node(act.op_type, [conv_out], [shuffle_in], name=act.name or f"{base}_act",
                                              **{a.name: helper.get_attribute_value(a) for a in act.attribute}))
            moved.add(id(act))
            out = act.output[0]
        make = _depth_to_space_shuffle if shuffle == "depth_to_space" and dims in (2, 3) else _pixel_shuffle
        new_nodes += make(model, base, shuffle_in, out, cout, s, spatial)
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    return replaced


def fold_identity_residual(model: onnx.ModelProto) -> int:
    """``Add(Conv(x), x)`` -> ``Conv'(x)`` with the identity added to the centre tap; returns how many."""
    inits = initializers(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = consumer_map(model)
    graph_outputs = {o.name for o in model.graph.output}
    removed, folded = set(), 0
    for add in model.graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for conv_out, skip in (add.input, add.input[::-1]):
            conv = producer.get(conv_out)
            if conv is None or conv.op_type != "Conv" or conv.input[0] != skip or len(consumers[conv_out]) != 1:
                continue
            if conv_out in graph_outputs:  # the conv's own result is a network output too: it must stay
                continue
            if conv.input[1] not in inits or sum(i == conv.input[1] for n in model.graph.node for i in n.input) != 1:
                continue
            weight = numpy_helper.to_array(inits[conv.input[1]])
            dims = weight.ndim - 2
            kernels = weight.shape[2:]
            if (weight.shape[0] != weight.shape[1] or attribute(conv, "group", 1) != 1 or any(k % 2 == 0 for k in kernels)
                    or list(attribute(conv, "strides", [1] * dims)) != [1] * dims
                    or list(attribute(conv, "dilations", [1] * dims)) != [1] * dims
                    or list(attribute(conv, "pads", [0] * 2 * dims)) != [k // 2 for k in kernels] * 2):
                continue
            weight = weight.copy()
            centre = tuple(k // 2 for k in kernels)
            for c in range(weight.shape[0]):
                weight[(c, c) + centre] += 1
            set_initializer(model, conv.input[1], weight)
            conv.output[0] = add.output[0]
            removed.add(id(add))
            folded += 1
            break
    remove_nodes(model, removed)
    return folded
