"""Which :class:`~PTQLogic.quantization.interface.Quantizer` quantizes a model: the first kind that can open it."""
from __future__ import annotations

from pathlib import Path

from .interface import Quantizer
from .model_folder import SpecQuantizer
from .nnunet import NnUNetQuantizer

# Most specific first; a spec model is the fallback (its errors say what a model needs).
KINDS: tuple[Quantizer, ...] = (NnUNetQuantizer(), SpecQuantizer())


def quantizer_for(model: str | Path) -> Quantizer:
    return next(kind for kind in KINDS if kind.can_open(model))
