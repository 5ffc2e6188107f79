"""Accuracy guard: INT8 that misses its FP32-agreement target keeps its most sensitive layers in FP32.

It is on by default (``interface.DEFAULT_GUARD``: agreement >= 0.98); without a target (``--no-guard``) the
agreement is still measured and recorded, and nothing is enforced. No labels are needed. The FP32 model's own
prediction on held-out data (:mod:`.held_out`: a whole volume, segmented as ``segment`` runs it, when 3 or more
calibration volumes are given, else patches) is the reference, so
``--max-dice-drop D`` means "INT8 Dice against the FP32 prediction is at least 1 - D", and
``--min-agreement A`` means that Dice is at least ``A``. Agreement is measured on the runtime that
will run the model (its INT8 kernels, not ONNX Runtime's reference semantics). Layers are ranked
once (:mod:`.sensitivity`); the top 1, 2, 4, ... are excluded from quantization and the model is
re-quantized until the target holds or ``max_kept`` layers are kept, which is an error: quantization
never silently costs accuracy.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import AccuracyError
from ..core.progress import Monitor
from ..evaluation.metrics import agreement_dice
from .held_out import HeldOut, HeldOutPatches
from .interface import GuardTarget
from .quantize import QuantizeReport, QuantizeSettings, quantize_onnx
from .scale_reuse import activation_scales
from .sensitivity import rank_sensitivity

STAGE = "accuracy guard"


class GuardMissed(AccuracyError):
    """INT8 missed the guard's target; ``report`` (a :class:`GuardReport`) says what was tried."""

    def __init__(self, message: str, report: "GuardReport"):
        super().__init__(message)
        self.report = report


@dataclass
class GuardStep:
    kept: list[str]  # compute nodes kept in higher precision in this attempt
    agreement: float  # INT8-vs-FP32 Dice on the held-out data, on the guard's runtime
    int8_bytes: int
    int8_latency_ms: float  # per network call on the guard's runtime: median per held-out patch, mean per window
    scales_reused: bool = False  # the first step's activation scales, not a new calibration (scale_reuse)


@dataclass
class GuardReport:
    runtime: str
    threshold: float | None  # None: measured only (--no-guard)
    held_out: str  # what the agreement was measured on
    isa: str  # the CPU's INT8 instruction set the agreement was measured with ("vnni", "avx2"), or "gpu"
    device: str  # the CPU model or GPU name
    held_out_detail: dict[str, Any] = field(default_factory=dict)  # held_out as data: kind, volumes, windows, ...
    steps: list[GuardStep] = field(default_factory=list)
    ranking: list[tuple[str, float]] = field(default_factory=list)  # node, local relative error

    @property
    def enforced(self) -> bool:
        return self.threshold is not None

    @property
    def met(self) -> bool:
        return bool(self.steps) and (self.threshold is None or self.steps[-1].agreement >= self.threshold)

    @property
    def kept(self) -> list[str]:
        return self.steps[-1].kept if self.steps else []

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        first, last = self.steps[0], self.steps[-1]
        data.update(met=self.met, enforced=self.enforced, kept=self.kept, agreement=last.agreement,
                    initial_agreement=first.agreement, final_agreement=last.agreement,
                    size_cost=last.int8_bytes / first.int8_bytes,
                    latency_cost=last.int8_latency_ms / max(first.int8_latency_ms, 1e-9))
        data["ranking"] = [{"node": n, "local_error": s} for n, s in self.ranking[:20]]
        return data


def _measure(runtime: str, int8_onnx: Path, held_out: HeldOut, reference: np.ndarray,
             num_classes: int) -> tuple[float, float]:
    from ..engines import create_engine

    engine = create_engine(runtime, "int8", int8_onnx=int8_onnx)
    labels, latency = held_out.predict(engine)
    del engine
    return agreement_dice(labels, reference, range(1, num_classes)), latency


def _exclusion(settings: QuantizeSettings, nodes: list[str]) -> QuantizeSettings:
    patterns = tuple(f"^{re.escape(name)}$" for name in nodes)
    return replace(settings, exclude_nodes=tuple(settings.exclude_nodes) + patterns)


def _where(runtime: str) -> tuple[str, str]:
    """(ISA, device) the runtime's agreement is measured on."""
    from ..core.sysinfo import cpu_int8_target, cpu_model

    if runtime == "tensorrt":
        import torch

        return "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"
    return cpu_int8_target(), cpu_model()


def guarded_quantize(fp32_onnx: str | Path, calibration: np.ndarray, held_out: HeldOut | np.ndarray,
                     out_path: str | Path, settings: QuantizeSettings, target: GuardTarget | None, num_classes: int,
                     held_out_note: str = "", monitor: Monitor | None = None) -> tuple[QuantizeReport, GuardReport]:
    """Quantize, measure agreement on ``held_out`` (:mod:`.held_out`; an array: patches, described by
    ``held_out_note``), and (when ``target`` has a threshold) keep sensitive layers in FP32 until it holds. Layers
    are kept through ModelOpt's exclusions; the 'cpu' placement can only be checked."""
    from ..engines import choose_runtime, create_engine

    monitor = monitor or Monitor()
    target = target or GuardTarget()
    target.validate()
    runtime = target.runtime if target.runtime != "auto" else choose_runtime("int8")[0]
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if isinstance(held_out, np.ndarray):
        held_out = HeldOutPatches(held_out, held_out_note, {"kind": "patches", "patches": len(held_out)})
    monitor.update(STAGE, 0, 1)
    reference, _ = held_out.predict(create_engine(runtime, "fp32", fp32_onnx=fp32_onnx))
    guard = GuardReport(runtime, target.threshold, held_out.note, *_where(runtime), held_out_detail=held_out.detail)
    report = quantize_onnx(fp32_onnx, calibration, out_path, settings, monitor)
    agreement, latency = _measure(runtime, out_path, held_out, reference, num_classes)
    guard.steps.append(GuardStep([], agreement, report.bytes, latency))
    if guard.met:
        return report, guard
    if settings.placement == "modelopt":
        guard.ranking = rank_sensitivity(fp32_onnx, out_path, held_out.ranking_patches, monitor)
    limit = min(target.max_kept, len(guard.ranking))
    count = 0
    scales = activation_scales(out_path) if limit else None  # each step keeps the first calibration's ranges
    while not guard.met and count < limit:
        count = min(max(1, 2 * count), limit)
        kept = [name for name, _ in guard.ranking[:count]]
        monitor.update(STAGE, count, limit)
        report = quantize_onnx(fp32_onnx, calibration, out_path, _exclusion(settings, kept), monitor, scales)
        agreement, latency = _measure(runtime, out_path, held_out, reference, num_classes)
        guard.steps.append(GuardStep(kept, agreement, report.bytes, latency, report.scales_reused))
    if not guard.met:
        raise GuardMissed(_miss_message(guard, settings), guard)
    return report, guard


# benchmarks/results/epyc-2core-avx512/whole_ct/: the trained 117-class --fast network, 2 CTs: 0.962 on patches
# (refused); 3 CTs: 0.981 on the held-out CT (met, nothing kept), 0.981 on the test CT
PATCHES_FIRST = ("First give 3 or more calibration volumes: the guard then holds one out whole and measures it as "
                 "segment runs it; held-out patches can read lower than whole volumes.")


def _miss_message(guard: GuardReport, settings: QuantizeSettings) -> str:
    tried = "; ".join(f"{len(step.kept)} layer(s) in FP32: {step.agreement:.4f}" for step in guard.steps)
    other = "percentile" if settings.method != "percentile" else "entropy"
    advice = ("Allow more layers (--max-kept-layers), calibrate on more volumes like those you will segment, try "
              f"--method {other}, lower the target (--min-agreement), or keep this INT8 anyway with --no-guard."
              if settings.placement == "modelopt" else
              "The 'cpu' placement cannot keep layers in FP32: use --placement modelopt (or auto), or keep this "
              "INT8 anyway with --no-guard.")
    if guard.held_out_detail.get("kind") == "patches":
        advice = f"{PATCHES_FIRST} {advice}"
    return (f"INT8 misses the accuracy target on {guard.runtime} ({guard.isa}): agreement with FP32 < "
            f"{guard.threshold:.4f} after trying up to {len(guard.kept)} layer(s) kept in FP32 ({tried}; measured on "
            f"{guard.held_out}). {advice}")


def guarded_quantize_volumes(fp32_onnx: Path, out_path: Path, volumes: list, spec, calib_settings,
                             settings: QuantizeSettings, target: GuardTarget | None,
                             monitor: Monitor | None = None,
                             names: list[str] | None = None) -> tuple[QuantizeReport, GuardReport]:
    """:func:`guarded_quantize` on calibration volumes (``names``: how the report names them), held out as
    :func:`.held_out.calibration_and_held_out` says; each volume is preprocessed once."""
    from .calibration import prepare_volume
    from .held_out import calibration_and_held_out

    names = names or [f"calibration volume {i + 1}" for i in range(len(volumes))]
    patches, held_out = calibration_and_held_out(volumes, names, lambda volume: prepare_volume(volume, spec),
                                                 spec.patch_size, calib_settings, _spec_segmenter(spec, monitor),
                                                 monitor)
    return guarded_quantize(fp32_onnx, patches, held_out, out_path, settings, target, spec.num_classes,
                            monitor=monitor)


def _spec_segmenter(spec, monitor: Monitor | None):
    """Whole held-out volumes through ``segment``'s own path (:func:`inference.segmenter.segment_volume`)."""
    import torch

    from ..inference.segmenter import segment_volume

    def segmenter(volumes: list, prepared: list):
        def segment(engine, index: int):
            network = (torch.from_numpy(prepared[index].image), prepared[index].context)
            result = segment_volume(volumes[index], spec, engine, monitor=monitor, preprocessed=network)
            return result.labels.array, result.network_seconds, result.patches

        return segment

    return segmenter
