"""Which volumes a cohort holds, and where each one's label map goes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..core.errors import InputError

# Single-file formats only: a volume travels to a worker as the bytes of one file.
BATCH_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
LIST_SUFFIXES = (".txt", ".lst", ".list")
OUTPUT_SUFFIX = "_labels.nii.gz"


@dataclass(frozen=True)
class CohortItem:
    input: Path  # input volume file, absolute; symbolic links are kept (their names name the label maps)
    output: Path  # label map written for it


def batch_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in BATCH_SUFFIXES if name.endswith(s)), None)


def _absolute(path: Path) -> Path:
    # Not resolve(): datasets kept as links (git-annex, DVC, nnU-Net's raw folders) point at hashed names.
    return Path(os.path.abspath(path))


def _read_list(path: Path) -> list[Path]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [_absolute(path.parent / entry) for entry in entries]


def _expand(source: Path) -> list[Path]:
    if source.is_dir():
        found = sorted(_absolute(p) for p in source.iterdir() if p.is_file() and batch_suffix(p))
        if not found:
            raise InputError(f"Folder '{source}' holds no volume files ({', '.join(BATCH_SUFFIXES)}).")
        return found
    if source.suffix.lower() in LIST_SUFFIXES:
        return _read_list(source)
    return [_absolute(source)]


def _output_names(paths: list[Path]) -> list[str]:
    """Input file stems, or paths relative to their common folder when stems repeat (patient1/ct, patient2/ct)."""
    stems = [p.name[: -len(batch_suffix(p) or "")] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    relative = [p.relative_to(root).as_posix() for p in paths]
    return [r[: -len(batch_suffix(Path(r)) or "")].replace("/", "__") for r in relative]


def collect_inputs(inputs: Sequence[str | Path], output_dir: str | Path) -> list[CohortItem]:
    """Volumes from folders, list files (one path per line, relative to the list) and files; validated up front."""
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"Output '{output_dir}' is a file; give a folder for the label maps and the manifest.")
    paths: list[Path] = []
    for raw in inputs:
        source = Path(raw)
        if not source.exists():
            raise InputError(f"Input '{source}' does not exist; give a folder, a list file (.txt) or volume files.")
        if source.is_dir() and source.resolve() == output_dir:
            raise InputError(f"The output folder '{output_dir}' is also the input folder; choose a separate output folder.")
        paths.extend(_expand(source))
    problems = [f"'{p}' does not exist" for p in paths if not p.is_file()]
    problems += [f"'{p}' is not a single-file volume ({', '.join(BATCH_SUFFIXES)})" for p in paths
                 if p.is_file() and not batch_suffix(p)]
    if problems:
        raise InputError(f"{len(problems)} input(s) cannot be used: {'; '.join(problems[:5])}. Fix the list and rerun.")
    first: dict[Path, Path] = {}
    for path in paths:  # the same file listed twice (or through a link) is segmented once
        first.setdefault(path.resolve(), path)
    unique = list(first.values())
    if not unique:
        raise InputError("No input volumes were given.")
    names = _output_names(unique)
    items = [CohortItem(p, output_dir / (name + OUTPUT_SUFFIX)) for p, name in zip(unique, names)]
    for item in items:
        if item.output.resolve() == item.input.resolve():
            raise InputError(f"Input '{item.input}' would be overwritten by its label map; choose another output folder.")
    return items
