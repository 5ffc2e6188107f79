"""Engine cache: built artifacts (TensorRT plans, derived ONNX files) keyed by everything they depend on.

A key is a stable hash of the fields (model content sha256, precision, calibration settings, shape
profile, runtime name + version, device name, and the build recipe passed as extra fields). The
model's file name is not part of it: a renamed identical model reuses its artifacts. A matching
artifact is reused; otherwise it is built
into a temporary file and renamed, so a failed or cancelled build leaves nothing behind. A small JSON
with the fields sits next to each artifact for humans.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from .errors import PTQError
from .fileio import atomic_path, atomic_write_text, sha256_file


def engine_fields(
    model_path: str | Path,
    precision: str,
    runtime: str,
    runtime_version: str,
    device: str,
    shape_profile: dict[str, Any],
    calibration: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The standard cache fields for an engine built from ``model_path``."""
    return {
        "model_sha256": sha256_file(model_path),
        "precision": precision,
        "calibration": calibration or {},
        "shape_profile": shape_profile,
        "runtime": runtime,
        "runtime_version": runtime_version,
        "device": device,
        **extra,
    }


def user_cache_dir() -> Path:
    """Per-user cache folder (``PTQSEG_CACHE_DIR`` overrides it), e.g. for TensorRT timing caches."""
    override = os.environ.get("PTQSEG_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("ptqseg", appauthor=False))


class EngineCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(**fields: Any) -> str:
        """Stable hash of ``fields`` (order-independent; Paths and tuples hash by their text/list form)."""
        canonical = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]

    def path_for(self, fields: dict[str, Any], suffix: str = ".plan") -> Path:
        readable = "-".join(str(fields[k]) for k in ("runtime", "precision") if k in fields)
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", readable)
        name = f"{readable}-{self.key(**fields)}" if readable else self.key(**fields)
        return self.root / f"{name}{suffix}"

    def get_or_build(
        self, fields: dict[str, Any], build: Callable[[Path], None], suffix: str = ".plan"
    ) -> Path:
        """Return the cached artifact for ``fields``, calling ``build(tmp_path)`` only when it is missing."""
        final = self.path_for(fields, suffix)
        if final.is_file() and final.stat().st_size > 0:
            return final
        with atomic_path(final, suffix=suffix) as tmp:
            build(tmp)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise PTQError(f"Building '{final.name}' produced no output; nothing was cached.")
        sidecar = final.parent / (final.name[: len(final.name) - len(suffix)] + ".fields.json")
        atomic_write_text(sidecar, json.dumps(fields, indent=2, sort_keys=True, default=str) + "\n")
        return final
