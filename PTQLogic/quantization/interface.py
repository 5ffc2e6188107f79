"""One interface for quantizing any model into a model folder: the model's kind decides how.

Specs, TorchScript/ONNX files and MONAI bundles become one model folder (spec + FP32 + INT8 Q/DQ ONNX);
nnU-Net results folders become one ONNX pair per fold, calibrated on nnU-Net-preprocessed patches.
``PTQLogic.pipeline.quantize_model`` opens the quantizer through
:func:`PTQLogic.quantization.quantizers.quantizer_for` and calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, Union

from ..core.errors import InputError
from ..core.progress import Monitor
from .result import QuantizeResult

Calibration = Union[str, Path, Sequence[Union[str, Path]]]
# Calibration method of every entry point: entropy kept FP32's answer as well as or better than max on the
# trained networks measured (docs/fidelity.md), by 0.025 on a real CT outside the training data (issue 22).
DEFAULT_METHOD = "entropy"
# "percentile" (activation ranges clipped at a percentile of |x|, default 99.99) is opt-in: it beat entropy on two
# of the three trained networks measured and tied on the third (docs/fidelity.md).
METHODS = ("max", "entropy", "percentile")
DEFAULT_MIN_AGREEMENT = 0.98  # FP32-vs-INT8 Dice on held-out data that every quantize must reach by default
# what quantize does when INT8 misses the guard's target: stop with the error ("fail"), or (nnU-Net folders) write
# the folder without INT8 so that `segment` runs that model, or that part of a set, in FP32 ("fp32")
ON_MISS = ("fail", "fp32")


@dataclass(frozen=True)
class GuardTarget:
    """What the accuracy guard (``quantization.guard``) must reach: INT8-vs-FP32 Dice on held-out data. Without
    ``min_agreement`` and ``max_dice_drop`` the agreement is measured on ``runtime`` and recorded, not enforced."""

    min_agreement: float | None = None
    max_dice_drop: float | None = None
    runtime: str = "auto"  # the runtime whose INT8 result is checked ("auto": the one `segment` would pick)
    max_kept: int = 8  # at most this many layers kept in higher precision

    def validate(self) -> None:
        if self.min_agreement is not None and self.max_dice_drop is not None:
            raise InputError("Give --min-agreement or --max-dice-drop, not both (--max-dice-drop D is "
                             "--min-agreement 1-D).")
        if self.min_agreement is not None and not 0.0 < self.min_agreement <= 1.0:
            raise InputError(f"--min-agreement must be in (0, 1], got {self.min_agreement}.")
        if self.max_dice_drop is not None and not 0.0 <= self.max_dice_drop < 1.0:
            raise InputError(f"--max-dice-drop must be in [0, 1), got {self.max_dice_drop}.")
        if self.runtime == "torch":
            raise InputError("--guard-runtime torch cannot run INT8 (PyTorch is the FP32 reference); choose auto, "
                             "openvino, onnxruntime or tensorrt.")
        if self.max_kept < 1:
            raise InputError(f"--max-kept-layers must be >= 1, got {self.max_kept}.")

    @property
    def threshold(self) -> float | None:
        if self.min_agreement is not None:
            return self.min_agreement
        return None if self.max_dice_drop is None else 1.0 - self.max_dice_drop


DEFAULT_GUARD = GuardTarget(min_agreement=DEFAULT_MIN_AGREEMENT)


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``quantize_model`` was asked for, beyond the model, the volumes and the output folder."""

    num_patches: int = 32
    seed: int = 0
    method: str = DEFAULT_METHOD
    exclude_nodes: tuple[str, ...] = ()
    guard: GuardTarget | None = DEFAULT_GUARD  # None: agreement is measured and recorded, nothing is enforced
    folds: tuple[str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    placement: str = "auto"
    activations: str = "s8"
    subpixel: bool = False
    target_cpu: str = "auto"  # the CPU that runs the INT8 file: "auto" (this one), "vnni" or "avx2" (7-bit weights)
    percentile: float | None = None  # method "percentile" only (None: percentile.DEFAULT_PERCENTILE)
    bias_correction: bool = False  # empirical bias correction after calibration (quantization.bias_correction)
    on_miss: str = "fail"  # ON_MISS
    equalize: bool = False  # nnU-Net PlainConvUNet: channel equalization before export (quantization.equalize)

    def validate_method(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"Calibration method must be one of {', '.join(METHODS)}; got '{self.method}'.")
        if self.percentile is not None and self.method != "percentile":
            raise InputError(f"--percentile applies to --method percentile only (the method is '{self.method}').")
        if self.percentile is not None and not 50.0 < self.percentile < 100.0:
            raise InputError(f"--percentile must be in (50, 100), got {self.percentile} (e.g. 99.99).")
        if self.on_miss not in ON_MISS:
            raise InputError(f"--on-miss must be one of {', '.join(ON_MISS)}; got '{self.on_miss}'.")

    def calibration_method(self) -> dict:
        """QuantizeSettings' ``method``, ``percentile`` and ``bias_correction``."""
        from .percentile import DEFAULT_PERCENTILE

        return {"method": self.method, "percentile": DEFAULT_PERCENTILE if self.percentile is None else self.percentile,
                "bias_correction": self.bias_correction}

    def requested_placement(self) -> dict:
        """The arguments ``presets.resolve_placement`` decides "auto" from."""
        return dict(placement=self.placement, activations=self.activations, subpixel=self.subpixel,
                    excludes_nodes=bool(self.exclude_nodes))


class Quantizer(Protocol):
    def can_open(self, model: str | Path) -> bool:
        """True when this kind quantizes ``model`` (cheap: file names and small JSON only)."""

    def quantize(self, model: str | Path, calibration: Calibration, out_dir: str | Path, options: QuantizeOptions,
                 monitor: Monitor) -> QuantizeResult:
        """Validate everything, then write the model folder atomically."""
