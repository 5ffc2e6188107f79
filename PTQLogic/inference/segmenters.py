"""Which :class:`~PTQLogic.inference.interface.Segmenter` runs a model: the first kind that can open it."""
from __future__ import annotations

from .folder_segmenter import ModelFolderKind
from .interface import ModelArg, SegmenterKind, SegmentOptions, Segmenter
from .nnunet.segment import NnUNetKind

# Most specific first; a model folder is the fallback (its error says what a model folder needs).
KINDS: tuple[SegmenterKind, ...] = (NnUNetKind(), ModelFolderKind())


def open_segmenter(model: ModelArg, options: SegmentOptions) -> Segmenter:
    kind = next(kind for kind in KINDS if kind.can_open(model))
    return kind.open(model, options)
