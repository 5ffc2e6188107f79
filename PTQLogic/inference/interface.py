"""One interface for segmenting a volume file with any model: the model's kind decides how.

A quantized model folder runs our sliding window on one engine; nnU-Net folders (quantized, original, or
several parts) run nnU-Net's own predictor around our engines. ``PTQLogic.pipeline.segment`` opens the
:class:`Segmenter` for a model through :func:`PTQLogic.inference.segmenters.open_segmenter` and calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, Union

from ..core.progress import Monitor
from .results import SegmentOutcome

ModelArg = Union[str, Path, Sequence[Union[str, Path]]]  # one model, or several nnU-Net part folders


@dataclass(frozen=True)
class SegmentOptions:
    """What ``segment`` was asked for, beyond the model and the files (see ``PTQLogic.pipeline.segment``)."""

    runtime: str = "auto"
    precision: str = "int8"
    batch_size: int | None = None
    compare: bool = False
    reference: str | Path | None = None
    device: str | None = None
    mirroring: bool = False
    step_size: float | None = None
    label_map: str | dict[int, int] | None = None
    reference_labels: str | Path | None = None  # the reference's label table (names)
    torch_compile: str | None = None
    fp32_windows: float | None = None  # nnU-Net INT8: share of windows INT8 is least sure of taken from FP32


class Segmenter(Protocol):
    def segment(self, input_path: str | Path, output: str | Path, options: SegmentOptions,
                monitor: Monitor) -> SegmentOutcome:
        """Segment one volume file into a label map (plus its label tables) on the input's grid."""


class SegmenterKind(Protocol):
    def can_open(self, model: ModelArg) -> bool:
        """True when this kind segments ``model`` (cheap: file names and small JSON only)."""

    def open(self, model: ModelArg, options: SegmentOptions) -> Segmenter:
        """The segmenter for ``model``; refuses options this kind does not take, before any work."""
