"""Percentile calibration (``--method percentile``) on ModelOpt's Q/DQ placement.

ModelOpt 0.47's ONNX INT8 path hands ONNX Runtime's calibrators ``Entropy`` for ``calibration_method="entropy"``
and ``MinMax`` for anything else, and its table of calibrator options has no percentile key: percentile cannot
be asked of it. So ModelOpt places the Q/DQ nodes (calibrated with ``max``); then ONNX Runtime's own
``PercentileCalibrater`` (symmetric, 2048 bins: the calibrator ModelOpt would have called) measures the FP32
model's activations on the same calibration patches, and each activation scale becomes ``percentile / 127``.
Tensors that ModelOpt made share one scale around a Concat (so TensorRT can drop the Q/DQ pairs there) keep
sharing it: the largest of their percentiles. The calibrator runs in a child process, since ModelOpt patches
ONNX Runtime's calibrators for the rest of a process once it has run (``create_calibrator`` then takes node
names, not op types). The 'cpu' placement calls ONNX Runtime's quantizer, which offers percentile itself.
"""
from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.errors import ModelError
from .child import run_module

DEFAULT_PERCENTILE = 99.99  # kept FP32's answer best of 99.9, 99.99 and 99.999 on the trained networks
NUM_BINS = 2048
CHUNK = 8  # patches per calibrator pass: histograms merge across passes, so memory stays bounded


def activation_scales(model) -> dict[str, str]:
    """Activation tensor -> its QuantizeLinear scale initializer (weights, whose input is an initializer, skipped)."""
    inits = {i.name for i in model.graph.initializer}
    return {n.input[0]: n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"
            and n.input[0] not in inits}


def _scale_groups(model, scale_names: dict[str, str], scales: dict[str, float]) -> dict[str, str]:
    """tensor -> group root: a Concat's quantized output with the quantized inputs ModelOpt gave its scale."""
    parent = {t: t for t in scale_names}

    def root(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "Concat" or node.output[0] not in scale_names:
            continue
        for name in node.input:
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in scale_names \
                    and scales[q.input[0]] == scales[node.output[0]]:
                parent[root(q.input[0])] = root(node.output[0])
    return {t: root(t) for t in scale_names}


def percentile_ranges(fp32_onnx: str, tensors: list[str], calibration: np.ndarray, percentile: float,
                      on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """tensor -> symmetric percentile range, by ONNX Runtime's PercentileCalibrater on the FP32 model (run this
    in a process where ModelOpt has not run: :func:`apply_percentile` does)."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    fp32 = onnx.load(fp32_onnx, load_external_data=False)
    input_name = fp32.graph.input[0].name
    producers = {o: n.op_type for n in fp32.graph.node for o in n.output}
    consumers: dict[str, set[str]] = {}
    for node in fp32.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    op_types = {producers[t] for t in tensors if t in producers}
    op_types |= {op for t in tensors if t not in producers for op in consumers.get(t, ())}  # the graph input

    class Reader(CalibrationDataReader):
        def __init__(self, batch: np.ndarray):
            self.items = iter(batch)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {input_name: item[None]}

    with tempfile.TemporaryDirectory(prefix="ptqseg-percentile-") as tmp:
        calibrator = create_calibrator(fp32_onnx, sorted(op_types), str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile,
                                       extra_options={"percentile": percentile, "symmetric": True,
                                                      "num_bins": NUM_BINS})
        for start in range(0, len(calibration), CHUNK):
            calibrator.collect_data(Reader(calibration[start:start + CHUNK]))
            if on_batch is not None:
                on_batch(min(start + CHUNK, len(calibration)), len(calibration))
        ranges = calibrator.compute_data()
    return {t: max(abs(float(np.asarray(v).reshape(-1)[0])) for v in ranges[t].range_value) for t in tensors}


def _ranges_in_child(fp32_onnx: Path, tensors: list[str], calibration: np.ndarray, percentile: float,
                     on_batch: Callable[[int, int], None] | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ptqseg-percentile-") as tmp:
        work = Path(tmp)
        np.save(work / "calibration.npy", calibration)
        (work / "tensors.json").write_text(json.dumps(tensors))
        code, tail = run_module("PTQLogic.quantization.percentile", [fp32_onnx, work, percentile], on_batch)
        if code != 0 or not (work / "ranges.json").is_file():
            raise ModelError(failure_message(code, tail, len(calibration)))
        return json.loads((work / "ranges.json").read_text())


def failure_message(code: int, tail: str, patches: int) -> str:
    """Why the calibrator's process failed; a kill by SIGKILL is almost always the kernel's out-of-memory killer
    (ONNX Runtime's percentile calibrator holds every activation tensor of the patches it reads at once)."""
    if code == -signal.SIGKILL:
        return (f"Percentile calibration was killed (SIGKILL), most likely out of memory: ONNX Runtime's percentile "
                f"calibrator holds every activation of the network for up to {min(patches, CHUNK)} patch(es) at "
                "once, which for a large network can exceed this machine's memory. Use fewer --patches (fewer "
                f"than {min(patches, CHUNK)}), or --method entropy (the default) or max.")
    return f"Percentile calibration failed (ONNX Runtime calibrator exit code {code}): {tail}"


def apply_percentile(int8_onnx: str | Path, fp32_onnx: str | Path, calibration: np.ndarray, percentile: float,
                     on_batch: Callable[[int, int], None] | None = None) -> int:
    """Set the activation scales of ModelOpt's symmetric int8 Q/DQ model ``int8_onnx`` (in place) from percentile
    ranges of ``fp32_onnx`` on ``calibration``; returns how many activation tensors were rescaled."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    scale_names = activation_scales(model)
    old = {t: float(numpy_helper.to_array(inits[s])) for t, s in scale_names.items()}
    groups = _scale_groups(model, scale_names, old)
    ranges = _ranges_in_child(Path(fp32_onnx), sorted(scale_names), calibration, percentile, on_batch)
    amax: dict[str, float] = {}
    for tensor, value in ranges.items():
        amax[groups[tensor]] = max(amax.get(groups[tensor], 0.0), value)
    for tensor, name in scale_names.items():
        scale = max(amax[groups[tensor]], 1e-12) / 127.0
        inits[name].CopyFrom(numpy_helper.from_array(np.asarray(scale, dtype=np.float32), name))
    onnx.save(model, str(int8_onnx))
    return len(scale_names)


if __name__ == "__main__":  # the child process of _ranges_in_child
    _fp32, _work, _percentile = sys.argv[1:4]
    _ranges = percentile_ranges(_fp32, json.loads((Path(_work) / "tensors.json").read_text()),
                                np.load(Path(_work) / "calibration.npy"), float(_percentile),
                                lambda done, total: print(f"batch {done} {total}", flush=True))
    (Path(_work) / "ranges.json").write_text(json.dumps(_ranges))
