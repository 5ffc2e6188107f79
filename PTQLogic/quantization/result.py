"""What ``quantize`` returns: the model folder it wrote, the two ONNX sizes, time, report and placement."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.model_folder import FP32_NAME, INT8_NAME


@dataclass
class QuantizeResult:
    model_dir: Path
    fp32_bytes: int
    int8_bytes: int
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    # the Q/DQ placement used: placement, activations, subpixel, and "auto": what auto chose and why ("" if not auto)
    placement: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "fp32_onnx": str(self.model_dir / FP32_NAME),
            "int8_onnx": str(self.model_dir / INT8_NAME),
            "fp32_mb": self.fp32_bytes / 1e6,
            "int8_mb": self.int8_bytes / 1e6,
            "size_ratio": self.int8_bytes / self.fp32_bytes,
            "seconds": self.seconds,
            "qdq_ok": self.report.get("qdq", {}).get("ok"),
            "calibration_inputs": self.report.get("calibration", {}).get("inputs", []),
            "placement": dict(self.placement),
            **self.agreement(),
        }

    def agreement(self) -> dict[str, Any]:
        """The accuracy guard's record: FP32-vs-INT8 agreement (the lowest fold's for nnU-Net), where it was
        measured, and whether the target was enforced and met."""
        guards = [self.report["guard"]] if "guard" in self.report else \
            [fold["guard"] for fold in self.report.get("folds", {}).values() if "guard" in fold]
        if not guards:
            return {}
        worst = min(guards, key=lambda guard: guard["agreement"])
        keys = ("agreement", "runtime", "isa", "device", "held_out", "enforced", "threshold", "met", "kept")
        return {"agreement": worst["agreement"], "guard": {key: worst.get(key) for key in keys}}
