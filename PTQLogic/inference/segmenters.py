"""Which :class:`~PTQLogic.inference.interface.Segmenter` runs a model: the first kind that can open it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.errors import InputError
from ..models.model_folder import FP32_NAME, check_model_path
from .folder_segmenter import ModelFolderKind
from .fp32_segmenter import UnquantizedKind
from .interface import ModelArg, SegmenterKind, SegmentOptions, Segmenter
from .nnunet.segment import NnUNetKind, is_parts_file, read_parts_file

# Most specific first; a model folder is the fallback (its error says what a model folder needs).
KINDS: tuple[SegmenterKind, ...] = (NnUNetKind(), UnquantizedKind(), ModelFolderKind())


def open_segmenter(model: ModelArg, options: SegmentOptions) -> Segmenter:
    for path in [model] if isinstance(model, (str, Path)) else model:
        check_model_path(path)  # missing or unreadable: said so, before any kind looks inside
    kind = next(kind for kind in KINDS if kind.can_open(model))
    if options.fp32_windows and not isinstance(kind, NnUNetKind):
        raise InputError("--fp32-windows is for nnU-Net models (it works on nnU-Net's sliding window); leave it "
                         "out for this model.")
    return kind.open(model, options)


def model_onnx_files(models: str | Path | Sequence[str | Path]) -> list[Path]:
    """The FP32 ONNX files a model argument of ``segment`` runs from: an ONNX file itself, a quantized folder's
    ``fp32.onnx``, a quantized nnU-Net folder's ``fold_*/fp32.onnx``, the folders a parts file lists. What is
    not one of these gives nothing (an unquantized source is exported later)."""
    items = [models] if isinstance(models, (str, Path)) else list(models)
    found: list[Path] = []
    for item in map(Path, items):
        if item.suffix.lower() == ".onnx" and item.is_file():
            found.append(item)
        elif is_parts_file(item):
            found += model_onnx_files(read_parts_file(item)[0])
        elif item.is_dir():
            found += [p for p in [item / FP32_NAME, *sorted(item.glob(f"fold_*/{FP32_NAME}"))] if p.is_file()]
    return found
