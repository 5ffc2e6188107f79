"""``manifest.jsonl``: one row per input volume, rewritten atomically after every finished volume.

A row is ``{"input", "output", "sha256", "model", "runtime", "precision", "status": "done"|"error",
"seconds", "timings", "attempts", "error"}``. A rerun skips an input whose row is done for the same
input hash and model fingerprint (and whose label map is still there) and retries the rest.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.fileio import atomic_write_text

MANIFEST_NAME = "manifest.jsonl"


def model_fingerprint(model_dir: Path, precision: str) -> str:
    """Hash of the model folder's spec and ONNX files plus the precision: what decides the label maps."""
    digest = hashlib.sha256(precision.encode())
    for name in ("spec.json", "fp32.onnx", "int8.onnx"):
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


class Manifest:
    """The rows of one output folder, keyed by input path (last row wins)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / MANIFEST_NAME
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.rows[str(row["input"])] = row
                except (ValueError, KeyError, TypeError):
                    raise InputError(
                        f"'{self.path}' line {number} is not a manifest row; move the file away to start a fresh cohort."
                    ) from None

    def is_done(self, input_path: Path, sha256: str, model: str) -> bool:
        row = self.rows.get(str(input_path))
        return bool(
            row and row.get("status") == "done" and row.get("sha256") == sha256 and row.get("model") == model
            and row.get("output") and Path(row["output"]).is_file()
        )

    def record(self, row: dict[str, Any]) -> None:
        self.rows[str(row["input"])] = row
        text = "".join(json.dumps(r, default=str) + "\n" for r in self.rows.values())
        atomic_write_text(self.path, text)
