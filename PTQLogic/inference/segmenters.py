"""Which :class:`~PTQLogic.inference.interface.Segmenter` runs a model: the first kind that can open it."""
from __future__ import annotations

from pathlib import Path

from ..models.model_folder import check_model_path
from .folder_segmenter import ModelFolderKind
from .fp32_segmenter import UnquantizedKind
from .interface import ModelArg, SegmenterKind, SegmentOptions, Segmenter
from .nnunet.segment import NnUNetKind

# Most specific first; a model folder is the fallback (its error says what a model folder needs).
KINDS: tuple[SegmenterKind, ...] = (NnUNetKind(), UnquantizedKind(), ModelFolderKind())


def open_segmenter(model: ModelArg, options: SegmentOptions) -> Segmenter:
    for path in [model] if isinstance(model, (str, Path)) else model:
        check_model_path(path)  # missing or unreadable: said so, before any kind looks inside
    kind = next(kind for kind in KINDS if kind.can_open(model))
    return kind.open(model, options)
