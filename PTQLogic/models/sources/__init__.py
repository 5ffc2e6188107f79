"""Model sources behind one interface (:class:`~PTQLogic.models.sources.base.ModelSource`).

``SOURCES`` is tried in order; the first whose ``can_open`` accepts the path loads it. Add a source
by implementing the protocol in its own module and listing an instance here.
"""
from __future__ import annotations

from pathlib import Path

from ...core.errors import InputError
from .base import LoadedModel, ModelSource
from .bundle import BundleSource
from .nnunet import NnUNetSource

SOURCES: list[ModelSource] = [NnUNetSource(), BundleSource()]


def find_source(path: str | Path) -> ModelSource:
    path = Path(path)
    for source in SOURCES:
        if source.can_open(path):
            return source
    raise InputError(f"'{path}' is not a model this tool can read: give a model spec (.json/.yaml), a MONAI bundle "
                     "folder (configs/ + models/) or an nnU-Net v2 results folder (dataset.json + plans.json + fold_*).")


__all__ = ["LoadedModel", "ModelSource", "SOURCES", "find_source"]
