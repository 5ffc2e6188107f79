"""Empirical bias correction of a Q/DQ ONNX model (Nagel et al. 2019, "Data-free quantization", its empirical
variant; what OpenVINO NNCF calls FastBiasCorrection). Neither ModelOpt 0.47 nor ONNX Runtime 1.32 offers it.

Quantized weights (7-bit ones on AVX2 CPUs most of all) and activations shift the mean of each convolution's
output channels. For every Conv/ConvTranspose whose weight goes through a DequantizeLinear, the per-channel mean
of its output on the calibration patches is measured in the FP32 model and in the Q/DQ model (ONNX Runtime, the
Q/DQ graph run as float simulation: it computes what the INT8 kernels compute), and the difference is added to
the conv's bias (one is made when it has none). Layer by layer: convs are corrected level by level in
topological order (a level: the convs whose corrected ancestors are all of lower levels; they do not depend on
one another), each level measured on the model as corrected so far, so later layers see the corrections of
earlier ones; one run of the Q/DQ model per level. ``one_pass`` corrects every conv from one measurement: it
over-corrects later layers (their shift is partly undone by earlier corrections; measured on phantom_unet, the
deepest corrected conv's error rose from 0.032 to 0.071 FP32 standard deviations). A conv whose only
consumers are InstanceNormalization is skipped: the norm removes each channel's mean, whatever the bias.
The input file is never modified; the corrected model is written to ``out_path`` atomically.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import InputError, ModelError, PTQError
from ..core.fileio import atomic_path
from ..core.progress import Monitor
from .probe import cpu_session, with_outputs

STAGE = "bias correction"
CHUNK = 4  # patches per run: conv outputs are reduced to channel sums as they come, so memory stays bounded
MEAN_REMOVING = ("InstanceNormalization",)


@dataclass
class LayerCorrection:
    node: str
    op_type: str
    channels: int
    # largest |mean_fp32 - mean_int8| over channels, in units of that channel's FP32 standard deviation
    error_before: float
    error_after: float
    max_abs_shift: float  # largest bias change


@dataclass
class BiasCorrectionReport:
    path: Path
    mode: str  # "layer by layer" or "one pass"
    passes: int  # correction passes run: the levels of dependent convs, layer by layer
    patches: int
    layers: list[LayerCorrection]
    skipped: dict[str, str]  # conv node -> why it was left alone
    residual_per_pass: list[float]  # largest layer error before each pass, then after the last one
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    def summary(self) -> dict[str, Any]:
        """What ``quantization.json`` records: no per-layer detail, no path; errors in FP32 standard deviations."""
        before = [layer.error_before for layer in self.layers]
        after = [layer.error_after for layer in self.layers]
        return {"mode": self.mode, "passes": self.passes, "patches": self.patches, "convs_corrected": len(self.layers),
                "convs_skipped": self.skipped, "largest_error_before": max(before, default=0.0),
                "largest_error_after": max(after, default=0.0), "seconds": self.seconds, "notes": self.notes}


@dataclass(frozen=True)
class _Feed:
    """What each run of a model gets: ``patches`` in batches of ``batch`` as ``input_name``; ``tick`` per batch."""

    input_name: str
    patches: np.ndarray
    batch: int
    tick: Callable[[], None]

    @property
    def batches(self) -> int:
        return -(-len(self.patches) // self.batch)


def _check_inputs(qdq_path: Path, fp32_path: Path, out_path: Path, patches: np.ndarray) -> tuple[np.ndarray, str, int]:
    """The patches as float32, the models' input name and the batch to run them in; one clear error for each bad
    input."""
    from ..models.onnx_export import onnx_io_names

    if out_path.resolve() in (qdq_path.resolve(), fp32_path.resolve()):
        raise InputError(f"Bias correction writes a new file: '{out_path}' would overwrite its input; choose "
                         "another output path.")
    fp32_input, _, shape = onnx_io_names(fp32_path)
    qdq_input, _, _ = onnx_io_names(qdq_path)  # a missing or unreadable Q/DQ file fails here, with its name
    if qdq_input != fp32_input:
        raise InputError(f"'{qdq_path}' (input '{qdq_input}') is not a Q/DQ model of '{fp32_path}' (input "
                         f"'{fp32_input}'); give the FP32 model it was quantized from.")
    if not isinstance(patches, np.ndarray) or patches.ndim != len(shape) or patches.shape[0] < 1:
        got = getattr(patches, "shape", type(patches).__name__)
        raise InputError(f"Calibration patches must be an array [N, C, *patch] with N >= 1 matching the model "
                         f"input {shape}; got {got}.")
    for got, want in zip(patches.shape[1:], shape[1:]):
        if isinstance(want, int) and want > 0 and got != want:
            raise InputError(f"Calibration patches have shape {patches.shape}; the model expects {shape}.")
    patches = np.ascontiguousarray(patches, dtype=np.float32)
    if not np.all(np.isfinite(patches)):
        raise InputError("Calibration patches contain NaN or infinite values.")
    fixed = isinstance(shape[0], int) and shape[0] > 0  # exported models take any batch; others may not
    batch = shape[0] if fixed else CHUNK
    if fixed and len(patches) % batch:
        raise InputError(f"The model takes batches of exactly {batch} patches; give a multiple of {batch} "
                         f"calibration patches (got {len(patches)}).")
    return patches, qdq_input, batch


def _bias_kind(node, producers: dict, inits: set[str], uses: dict[str, list[str]]) -> str | None:
    """"none", "float" (an initializer) or "int32" (this conv's own DequantizeLinear of an initializer);
    None: something else (left alone)."""
    if len(node.input) < 3 or not node.input[2]:
        return "none"
    if node.input[2] in inits:
        return "float"
    dq = producers.get(node.input[2])
    if dq is not None and dq.op_type == "DequantizeLinear" and all(name in inits for name in dq.input if name) \
            and len(uses.get(dq.output[0], [])) == 1 and len(uses.get(dq.input[0], [])) == 1:
        return "int32"
    return None


def _targets(model, fp32_model) -> tuple[list[Any], dict[str, str]]:
    """The convs to correct, in graph (topological) order, and why the other quantized convs are not."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    inits = {t.name for t in model.graph.initializer}
    fp32_ops = {o: n.op_type for n in fp32_model.graph.node for o in n.output}
    targets, skipped = [], {}
    for node in model.graph.node:
        weight = producers.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in ("Conv", "ConvTranspose") or weight is None or weight.op_type != "DequantizeLinear":
            continue
        name = node.name or node.output[0]
        if fp32_ops.get(node.output[0]) != node.op_type:
            skipped[name] = "its output has no FP32 counterpart of the same name (a rewritten graph)"
        elif set(consumers.get(node.output[0], ["output"])) <= set(MEAN_REMOVING):
            skipped[name] = "only feeds InstanceNormalization, which removes each channel's mean"
        elif _bias_kind(node, producers, inits, consumers) is None:
            skipped[name] = "its bias is computed in the graph or shared, not a constant of its own"
        else:
            targets.append(node)
    return targets, skipped


def _channel_stats(model, tensors: list[str], feed: _Feed) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor -> (per-channel mean, per-channel standard deviation) over the patches and every voxel."""
    # The graph as written (Q/DQ as float simulation): with any optimization level ONNX Runtime 1.32 rewrites the
    # Q/DQ graph so that a bias change no longer moves the conv's output mean by exactly that change (measured: a
    # residual 1e-5 after correcting the first conv of phantom_segresnet, against 5e-9 here).
    session = cpu_session(with_outputs(model, tensors, only=True).SerializeToString(), as_written=True)
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    voxels: dict[str, int] = {}
    for start in range(0, len(feed.patches), feed.batch):
        outputs = session.run(tensors, {feed.input_name: feed.patches[start:start + feed.batch]})
        for tensor, value in zip(tensors, outputs):
            axes = (0, *range(2, value.ndim))
            sums[tensor] = sums.get(tensor, 0.0) + value.sum(axis=axes, dtype=np.float64)
            squares[tensor] = squares.get(tensor, 0.0) + np.square(value, dtype=np.float64).sum(axis=axes)
            voxels[tensor] = voxels.get(tensor, 0) + value.size // value.shape[1]
        feed.tick()
    stats = {}
    for tensor in tensors:
        mean = sums[tensor] / voxels[tensor]
        stats[tensor] = (mean, np.sqrt(np.maximum(squares[tensor] / voxels[tensor] - mean ** 2, 0.0)))
    return stats


def _fresh_name(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    return name


def _add_to_bias(model, node, delta: np.ndarray) -> None:
    """bias += delta for ``node`` alone (a shared float bias is copied first; a missing one is made)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, list[str]] = {}
    for other in model.graph.node:
        for name in other.input:
            uses.setdefault(name, []).append(other.name)
    kind = _bias_kind(node, producers, set(inits), uses)
    taken = set(inits) | {o for n in model.graph.node for o in n.output}
    if kind == "none":
        name = _fresh_name(f"{node.name or node.output[0]}.bias", taken)
        model.graph.initializer.append(numpy_helper.from_array(delta.astype(np.float32), name))
        if len(node.input) == 2:
            node.input.append(name)
        else:  # an empty name: "no bias"
            node.input[2] = name
    elif kind == "float":
        old = numpy_helper.to_array(inits[node.input[2]])
        name = node.input[2] if len(uses[node.input[2]]) == 1 else _fresh_name(f"{node.input[2]}.corrected", taken)
        new = numpy_helper.from_array((old.astype(np.float64) + delta).astype(old.dtype), name)
        if name == node.input[2]:
            inits[name].CopyFrom(new)
        else:
            model.graph.initializer.append(new)
            node.input[2] = name
    else:  # int32 bias behind its own DequantizeLinear: move it by whole steps of its scale
        dq = producers[node.input[2]]
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        moved = np.clip(q + np.rint(delta / scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max)
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(moved.astype(np.int32), dq.input[0]))


def _load(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several kinds for a damaged file
        raise ModelError(f"'{path}' is not a readable ONNX model: {type(exc).__name__}: {exc}") from None


def _errors(reference: dict, measured: dict) -> dict[str, float]:
    """tensor -> largest |mean difference| over channels, in units of the FP32 channel's standard deviation."""
    return {t: float(np.max(np.abs(reference[t][0] - measured[t][0]) / np.maximum(reference[t][1], 1e-6)))
            for t in reference}


def _levels(model, targets: list) -> list[int]:
    """Each target's level: 1 + the largest level among the targets upstream of it (0 where there is none), in
    graph order. Targets of one level do not depend on one another, so they are corrected together."""
    target_ids = {id(node) for node in targets}
    reach: dict[str, int] = {}  # tensor -> the deepest target level it depends on
    level: dict[int, int] = {}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        upstream = max((reach.get(name, 0) for name in node.input), default=0)
        if id(node) in target_ids:
            level[id(node)] = upstream = upstream + 1
        for name in node.output:
            reach[name] = upstream
    return [level[id(node)] for node in targets]


def _correct(model, fp32, targets: list, feed: _Feed,
             one_pass: bool) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
    """Correct level by level (all at once with ``one_pass``), measuring the model as corrected so far before
    each pass, then once more: (layer errors before each pass and after the last, the bias change per conv)."""
    tensors = [node.output[0] for node in targets]
    levels = [1] * len(targets) if one_pass else _levels(model, targets)
    reference = _channel_stats(fp32, tensors, feed)
    shifts = {t: np.zeros_like(reference[t][0]) for t in tensors}
    errors: list[dict[str, float]] = []
    for level in range(1, max(levels) + 2):
        measured = _channel_stats(model, tensors, feed)
        errors.append(_errors(reference, measured))
        for node, tensor, node_level in zip(targets, tensors, levels):
            if node_level == level:
                delta = reference[tensor][0] - measured[tensor][0]
                _add_to_bias(model, node, delta)
                shifts[tensor] += delta
    return errors, shifts


def correct_biases(qdq_path: str | Path, fp32_path: str | Path, patches: np.ndarray, out_path: str | Path,
                   monitor: Monitor | None = None, one_pass: bool = False) -> BiasCorrectionReport:
    """Write ``qdq_path`` with empirically corrected conv biases to ``out_path`` (atomic); ``fp32_path`` is the
    model it was quantized from, ``patches`` [N, C, *patch] the calibration patches. ``one_pass``: every conv
    corrected from one measurement (cheaper, less exact) instead of level by level. Inputs are not modified."""
    import onnx

    started = time.perf_counter()
    monitor = monitor or Monitor()
    qdq_path, fp32_path, out_path = Path(qdq_path), Path(fp32_path), Path(out_path)
    patches, input_name, batch = _check_inputs(qdq_path, fp32_path, out_path, patches)
    model, fp32 = _load(qdq_path), _load(fp32_path)
    targets, skipped = _targets(model, fp32)
    passes = 1 if one_pass or not targets else max(_levels(model, targets))
    done = [0]

    def tick() -> None:
        done[0] += 1
        monitor.update(STAGE, done[0], feed.batches * (passes + 2))

    feed = _Feed(input_name, patches, batch, tick)
    errors, shifts = [{}], {}
    if targets:
        try:
            errors, shifts = _correct(model, fp32, targets, feed, one_pass)
        except PTQError:  # cancelled
            raise
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors have no common base class
            raise ModelError(f"Bias correction could not run the models: {type(exc).__name__}: {exc}") from None
    layers = [LayerCorrection(node.name or node.output[0], node.op_type, int(shifts[node.output[0]].size),
                              errors[0][node.output[0]], errors[-1][node.output[0]],
                              float(np.max(np.abs(shifts[node.output[0]])))) for node in targets]
    with atomic_path(out_path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    return BiasCorrectionReport(out_path, "one pass" if one_pass else "layer by layer", passes, len(patches),
                                layers, skipped,
                                [max(e.values()) for e in errors if e], time.perf_counter() - started,
                                [] if targets else ["no conv to correct: the model was written unchanged"])
