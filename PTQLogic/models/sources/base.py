"""One loader interface for every kind of model on disk (spec, nnU-Net folder, MONAI bundle, ...).

A source turns what the user points at into a :class:`LoadedModel`: a :class:`~PTQLogic.core.spec.ModelSpec`
(classes, patch size, preprocessing, sliding-window settings) plus the FP32 PyTorch network(s) to
export. Sources read configuration as data and weights with ``torch.load(weights_only=True)``;
they never import or run code named by the files they read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ...core.spec import ModelSpec


@dataclass
class LoadedModel:
    spec: ModelSpec
    networks: list[Any]  # torch.nn.Module, eval mode, CPU; several = ensemble (folds), logits averaged
    source: str  # the source's ``kind``
    description: str  # one line for the CLI/Slicer: architecture, classes, patch, folds/parts
    details: dict[str, Any] = field(default_factory=dict)  # source-specific facts worth reporting


@runtime_checkable
class ModelSource(Protocol):
    kind: str

    def can_open(self, path: Path) -> bool:
        """Cheap check by file names/extensions only (no weights read)."""

    def describe(self, path: Path) -> str:
        """One line for the UI; raises a ModelError/InputError naming what is missing."""

    def load(self, path: Path, **options: Any) -> LoadedModel:
        """Validate everything, then build the network(s) with weights; raise ModelError on bad input."""
