"""INT8 that x86 CPUs without int8 dot-product instructions (no VNNI, no AMX) compute as the Q/DQ graph says.

**7-bit weights** (:func:`narrow_weights`, written into the INT8 file). On such CPUs the INT8 kernels (oneDNN in
OpenVINO, MLAS in ONNX Runtime) multiply u8 activations by s8 weights and add each pair of products in 16 bits
(``vpmaddubsw``); symmetric s8 activations are shifted by +128 to u8 first. With full-range weights a pair
reaches 2 * 255 * 127 = 64770 and saturates at 32767, so the runtime silently computes something else than the
graph. With weights in [-64, 64] a pair stays within 2 * 255 * 64 = 32640 and the result is exact again.
OpenVINO's NNCF ("overflow fix") and ONNX Runtime's quantizer (``reduce_range``) make the same trade for such
CPUs; ModelOpt does not. Every ``DequantizeLinear`` that reads an int8 initializer and feeds only weights
(input 1 of Conv, ConvTranspose, MatMul, Gemm; also through a Transpose or Reshape) gets ``q -> round(q / 2)``
and ``scale -> 2 * scale`` (per-channel scales too; zero points stay 0): each dequantized weight moves by at
most one old quantization step. MatMul/Gemm too: ONNX Runtime's int8 MatMul saturates the same way (a UNesT
with random weights: 0.876 agreement with FP32 with 7-bit conv weights only, 0.942 with 7-bit MatMul weights
too, which is what the Q/DQ graph itself gives).

**uint8 after Concat** (:func:`unsigned_concat_activations`, for the OpenVINO engine to apply in memory when
it loads a file: the file keeps int8, which TensorRT needs). See its docstring.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError, ModelError

TARGET_CPUS = ("auto", "vnni", "avx2")  # QuantizeSettings.target_cpu / quantize_cpu(target_cpu=...)
NARROW_MAX = 64  # |q| <= 64: 2 * 255 * 64 = 32640 fits the int16 sum of vpmaddubsw
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")  # their input 1 is the weight
# single-input layout ops that may sit between a weight's DequantizeLinear and its op (shape inputs aside)
LAYOUT_OPS = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")


@dataclass(frozen=True)
class NarrowReport:
    narrowed_tensors: int  # weight DequantizeLinear nodes rewritten to 7 bits
    skipped: tuple[str, ...] = ()  # int8 weight DequantizeLinear nodes left at 8 bits, each with why

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = list(self.skipped)
        return data


def resolve_target_cpu(requested: str) -> tuple[str, str]:
    """(``"vnni"`` or ``"avx2"``, why) for a requested target CPU; ``"auto"`` asks this machine
    (:func:`PTQLogic.core.sysinfo.cpu_int8_target`)."""
    if requested not in TARGET_CPUS:
        raise InputError(f"Target CPU must be one of {TARGET_CPUS} ('vnni': CPUs with int8 dot-product instructions "
                         "(AVX512-VNNI, AVX-VNNI, AMX); 'avx2': x86 CPUs without them; 'auto': this computer's), "
                         f"got {requested!r}.")
    if requested != "auto":
        return requested, f"target CPU given as {requested!r}"
    from ..core.sysinfo import cpu_int8_target

    if cpu_int8_target() == "avx2":
        return "avx2", ("auto: this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX), or "
                        "ONEDNN_MAX_CPU_ISA caps them")
    return "vnni", "auto: this CPU has int8 dot-product instructions (or is not x86)"


def narrow_weights_array(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) -> (round(q / 2) clipped to [-64, 64] as int8, 2 * scale in scale's dtype).

    ``np.round`` rounds halves to even, so the error has no bias; |2 * round(q / 2) - q| <= 1 whatever the
    rounding, so each dequantized weight moves by at most one old step. ``scale`` may be per tensor or per
    channel: it is only doubled, whatever its axis.
    """
    return _halved(q), _doubled(scale)


def _halved(q: np.ndarray) -> np.ndarray:
    return np.clip(np.round(q.astype(np.float32) / 2), -NARROW_MAX, NARROW_MAX).astype(np.int8)


def _doubled(scale: np.ndarray) -> np.ndarray:
    return (scale.astype(np.float64) * 2).astype(scale.dtype)


def _graph_maps(model) -> tuple[dict, dict, dict[str, list[tuple[Any, int]]], set[str]]:
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    return inits, producer, consumers, {o.name for o in model.graph.output}


def _weight_dequantizers(model) -> tuple[list[Any], list[str]]:
    """The DequantizeLinear nodes of int8 initializers beyond [-64, 64] whose output reaches only weight inputs;
    and why other such nodes were left alone. Weights already within [-64, 64] are left as they are, so
    narrowing twice changes nothing."""
    import onnx

    inits, producer, consumers, outputs = _graph_maps(model)

    def only_weights(name: str, depth: int = 0) -> bool:
        users = consumers.get(name, [])
        if not users or name in outputs or depth > 8:
            return False
        for node, index in users:
            if node.op_type in WEIGHT_OPS and index == 1:
                continue
            if node.op_type in LAYOUT_OPS and index == 0 and only_weights(node.output[0], depth + 1):
                continue
            return False
        return True

    found, skipped, seen = [], [], set()
    fits = lambda tensor: int(np.abs(onnx.numpy_helper.to_array(tensor).astype(np.int16)).max(initial=0)) <= NARROW_MAX
    for op in model.graph.node:
        if op.op_type not in WEIGHT_OPS or len(op.input) < 2:
            continue
        name = op.input[1]
        while name in producer and producer[name].op_type in LAYOUT_OPS:
            name = producer[name].input[0]
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or id(dq) in seen or dq.input[0] not in inits:
            continue  # a float weight (kept in high precision), an activation (attention MatMul), or seen
        seen.add(id(dq))
        label = dq.name or dq.output[0]
        zero_point = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if inits[dq.input[0]].data_type != onnx.TensorProto.INT8:
            skipped.append(f"{label}: weight is not int8")
        elif len(dq.input) < 2 or dq.input[1] not in inits:
            skipped.append(f"{label}: scale is not an initializer")
        elif len(dq.input) > 2 and dq.input[2] and (zero_point is None
                                                    or np.any(onnx.numpy_helper.to_array(zero_point))):
            skipped.append(f"{label}: non-zero (or non-constant) zero point")
        elif not only_weights(dq.output[0]):
            skipped.append(f"{label}: also read by something other than a weight input")
        elif fits(inits[dq.input[0]]):
            continue  # already within [-64, 64] (narrowed before): nothing can saturate
        else:
            found.append(dq)
    return found, skipped


def _fresh_name(base: str, taken: set[str]) -> str:
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name


def narrow_model(model) -> NarrowReport:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in memory with 7-bit weights; see the module docstring."""
    from onnx import numpy_helper

    dqs, skipped = _weight_dequantizers(model)
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    taken = set(inits) | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}

    # each initializer once, whatever number of DequantizeLinear nodes read it: in place where only they read it
    readers: dict[tuple[str, int], list[Any]] = {}
    for dq in dqs:
        for slot in (0, 1):  # 0: the int8 weight, 1: its scale
            readers.setdefault((dq.input[slot], slot), []).append(dq)
    for (name, slot), nodes in readers.items():
        values = (_halved if slot == 0 else _doubled)(numpy_helper.to_array(inits[name]))
        if uses.get(name, 0) == len(nodes):
            inits[name].CopyFrom(numpy_helper.from_array(values, name))
            continue
        tensor = numpy_helper.from_array(values, _fresh_name(f"{name}_7bit", taken))
        model.graph.initializer.append(tensor)
        for dq in nodes:
            dq.input[slot] = tensor.name
    if dqs:
        from .edit import drop_unused_initializers

        drop_unused_initializers(model)
    return NarrowReport(len(dqs), tuple(skipped))


def narrow_weights(onnx_path: str | Path) -> NarrowReport:
    """Rewrite the Q/DQ ONNX at ``onnx_path`` in place, atomically, with 7-bit weights (module docstring)."""
    import onnx

    from ..core.fileio import atomic_path

    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise several types
        raise ModelError(f"Cannot read the INT8 ONNX '{onnx_path}' to narrow its weights: {exc}") from None
    report = narrow_model(model)
    if report.narrowed_tensors:
        with atomic_path(onnx_path, suffix=".onnx") as tmp:
            onnx.save(model, str(tmp))
    return report


U8_ZERO_POINT = 128


def unsigned_concat_activations(model) -> int:
    """Rewrite, in memory, each symmetric int8 activation ``QuantizeLinear`` that reads a ``Concat`` (and its
    ``DequantizeLinear`` nodes) to uint8 with zero point 128; returns how many were rewritten.

    For the OpenVINO engine, before it compiles: the values are exactly the same (uint8 q = int8 q + 128 over
    the whole range), but OpenVINO 2026.4 runs ``Concat -> Q(int8) -> DQ -> Conv`` wrongly on CPUs without AMX.
    Measured against the Q/DQ math (ONNX Runtime, graph optimizations off) on a 16-channel conv after a concat:
    0.29 relative error on an AVX2 EPYC, and on a Xeon with AMX capped by ONEDNN_MAX_CPU_ISA to AVX512_CORE or
    AVX512_CORE_VNNI; 0.002 with AMX; 0.000-0.002 everywhere once the concat's quantizer is uint8. In the
    nnU-Net-style decoders (skip concat -> conv) of nnU-Net, STUNet, SwinUNETR and TransUNet it took OpenVINO's
    FP32-vs-INT8 agreement from 0.92-0.98 (what the graph gives) to 0.45-0.83. The file itself keeps int8:
    TensorRT refuses uint8 activations.
    """
    from onnx import TensorProto, numpy_helper

    inits, producer, consumers, outputs = _graph_maps(model)
    taken = set(inits) | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    zero_point, count = None, 0
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[0] in inits or q.output[0] in outputs:
            continue
        source = producer.get(q.input[0])
        zp = inits.get(q.input[2])
        if source is None or source.op_type != "Concat" or zp is None or zp.data_type != TensorProto.INT8 \
                or list(zp.dims) not in ([], [1]) or numpy_helper.to_array(zp).any():
            continue
        dqs = [node for node, _ in consumers.get(q.output[0], [])]
        if not dqs or any(d.op_type != "DequantizeLinear" or list(d.input[1:3]) != list(q.input[1:3]) for d in dqs):
            continue
        if zero_point is None:
            zero_point = _fresh_name("u8_zero_point_128", taken)
            model.graph.initializer.append(numpy_helper.from_array(np.array(U8_ZERO_POINT, np.uint8), zero_point))
        for node in (q, *dqs):
            node.input[2] = zero_point
        count += 1
    if count:
        from .edit import drop_unused_initializers

        drop_unused_initializers(model)
    return count
