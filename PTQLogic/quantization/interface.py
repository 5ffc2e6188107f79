"""One interface for quantizing any model into a model folder: the model's kind decides how.

Specs, TorchScript/ONNX files and MONAI bundles become one model folder (spec + FP32 + INT8 Q/DQ ONNX);
nnU-Net results folders become one ONNX pair per fold, calibrated on nnU-Net-preprocessed patches.
``PTQLogic.pipeline.quantize_model`` opens the quantizer through
:func:`PTQLogic.quantization.quantizers.quantizer_for` and calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, Union

from ..core.progress import Monitor
from .result import QuantizeResult

if TYPE_CHECKING:
    from .guard import GuardTarget

Calibration = Union[str, Path, Sequence[Union[str, Path]]]


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``quantize_model`` was asked for, beyond the model, the volumes and the output folder."""

    num_patches: int = 32
    seed: int = 0
    method: str = "max"
    exclude_nodes: tuple[str, ...] = ()
    guard: "GuardTarget | None" = None
    folds: tuple[str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    placement: str = "auto"
    activations: str = "s8"
    subpixel: bool = False
    target_cpu: str = "auto"  # the CPU that runs the INT8 file: "auto" (this one), "vnni" or "avx2" (7-bit weights)

    def requested_placement(self) -> dict:
        """The arguments ``presets.resolve_placement`` decides "auto" from."""
        return dict(placement=self.placement, activations=self.activations, subpixel=self.subpixel,
                    guarded=self.guard is not None, excludes_nodes=bool(self.exclude_nodes))


class Quantizer(Protocol):
    def can_open(self, model: str | Path) -> bool:
        """True when this kind quantizes ``model`` (cheap: file names and small JSON only)."""

    def quantize(self, model: str | Path, calibration: Calibration, out_dir: str | Path, options: QuantizeOptions,
                 monitor: Monitor) -> QuantizeResult:
        """Validate everything, then write the model folder atomically."""
