"""Does an architecture go through the whole INT8 path? Export, quantize, Q/DQ rules, both CPU runtimes.

Used by ``Testing/test_architectures.py`` (random weights, a few patches) and
``benchmarks/fidelity/architectures.py`` (phantom-trained weights, whole phantoms): the same steps as
``ptqseg quantize`` (:func:`PTQLogic.models.onnx_export.export_onnx`, :func:`PTQLogic.quantization.quantize.quantize_onnx`)
with the architecture's high-precision exclusions from :data:`PTQLogic.models.networks.HIGH_PRECISION`.
(Moved here from ``PTQLogic/models/networks/support.py``: nothing in the package uses it.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from PTQLogic.core.spec import ModelSpec


@dataclass
class SupportResult:
    architecture: str
    parameters: int
    fp32_bytes: int
    int8_bytes: int
    export_max_abs_error: float
    qdq_ok: bool
    qdq_violations: list[str]
    quantized_ops: dict[str, str]  # op type -> "quantized/total"
    high_precision: dict[str, Any]
    agreement: dict[str, float] = field(default_factory=dict)  # runtime -> mean agreement Dice vs FP32

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def patch_agreement(fp32_logits: np.ndarray, int8_logits: np.ndarray, num_classes: int) -> float:
    """Mean Dice between the argmax label maps (classes absent from both excluded), over all patches."""
    from PTQLogic.evaluation.metrics import agreement_dice

    return float(agreement_dice(int8_logits.argmax(1), fp32_logits.argmax(1), list(range(1, num_classes))))


def export_and_quantize(model: torch.nn.Module, spec: ModelSpec, calibration: np.ndarray, workdir: Path,
                        settings=None, check_patches: int = 2) -> SupportResult:
    """FP32 ONNX (verified against PyTorch) and INT8 Q/DQ ONNX in ``workdir``; the Q/DQ rules checked."""
    from PTQLogic.models.onnx_export import export_onnx
    from PTQLogic.quantization.quantize import quantize_onnx, quantize_settings_for

    settings = settings or quantize_settings_for(spec.architecture)
    workdir.mkdir(parents=True, exist_ok=True)
    exported = export_onnx(model, spec, workdir / "fp32.onnx", check_patches=check_patches)
    report = quantize_onnx(workdir / "fp32.onnx", calibration, workdir / "int8.onnx", settings)
    counts = {op: f"{c.get('quantized', 0)}/{c['total']}" for op, c in report.qdq.counts.items()
              if op in ("Conv", "ConvTranspose", "MatMul", "Gemm")}
    return SupportResult(
        architecture=spec.architecture, parameters=sum(p.numel() for p in model.parameters()),
        fp32_bytes=report.fp32_bytes, int8_bytes=report.bytes, export_max_abs_error=exported.max_abs_error,
        qdq_ok=report.qdq.ok, qdq_violations=list(report.qdq.violations), quantized_ops=counts,
        high_precision={"exclude_nodes": list(settings.exclude_nodes),
                        "exclude_op_types": list(settings.exclude_op_types)},
    )


def runtime_logits(workdir: Path, runtime: str, precision: str, patches: np.ndarray) -> np.ndarray:
    """Logits of ``patches`` [N, C, *patch] from ``runtime`` at ``precision`` (one patch per call)."""
    from PTQLogic.engines import create_engine

    engine = create_engine(runtime, precision, fp32_onnx=workdir / "fp32.onnx", int8_onnx=workdir / "int8.onnx",
                           threads=2)
    with torch.no_grad():
        return np.concatenate([engine(torch.from_numpy(p[None])).numpy() for p in patches])
