"""Probe models: an ONNX model whose intermediate tensors are extra graph outputs, run on the CPU with ONNX
Runtime (the accuracy guard's sensitivity ranking and bias correction read layer outputs this way)."""
from __future__ import annotations

from typing import Any


def with_outputs(model, tensors: list[str], only: bool = False):
    """A copy of ``model`` that also outputs ``tensors`` (declared float, any shape); with ``only`` its own outputs
    are dropped, so the graph computes just what ``tensors`` need. ``model`` is not modified."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if only:
        del probe.graph.output[:]
    existing = {output.name for output in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in tensors if name not in existing)
    return probe


def cpu_session(model_bytes: bytes, as_written: bool = False, arena: bool = True) -> Any:
    """An ONNX Runtime CPU session of a serialized model. ``as_written``: no graph optimization, ONNX Runtime's
    warnings silenced. ``arena=False``: memory is freed after each run instead of staying reserved in the session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.enable_cpu_mem_arena = arena
    if as_written:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
