"""Which volumes a cohort holds, and where each one's label map goes."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..core.errors import InputError
from ..io.volumes import dicom_series_ids

# A volume travels to a worker as the bytes of one file, or (a DICOM series) of the files of one folder.
BATCH_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DICOM_KIND = "dicom"  # what a worker is told a DICOM folder's files are (in place of a file suffix)
LIST_SUFFIXES = (".txt", ".lst", ".list")
OUTPUT_SUFFIX = "_labels.nii.gz"


@dataclass(frozen=True)
class CohortItem:
    input: Path  # input volume file or DICOM folder, absolute; links are kept (their names name the label maps)
    output: Path  # label map written for it


def batch_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in BATCH_SUFFIXES if name.endswith(s)), None)


def volume_kind(path: Path) -> str | None:
    """The file suffix of a volume file, DICOM_KIND for a folder (of one DICOM series), None for anything else."""
    return DICOM_KIND if path.is_dir() else batch_suffix(path)


def read_input(path: Path) -> bytes | dict[str, bytes]:
    """A volume file's bytes, or a DICOM folder's files (those directly inside it) as name -> bytes."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
    return path.read_bytes()


def input_digest(data: bytes | dict[str, bytes]) -> str:
    """SHA-256 of a volume file (as ``sha256sum`` gives it), or of a DICOM folder's file names and contents."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    for name, content in sorted(data.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _series_count(folder: Path) -> int:
    """DICOM series directly inside ``folder`` (GDCM reads every file's header: asked once per folder)."""
    return len(dicom_series_ids(folder))


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(batch_suffix(path) or "")] if path.is_file() else path.name


def _absolute(path: Path) -> Path:
    # Not resolve(): datasets kept as links (git-annex, DVC, nnU-Net's raw folders) point at hashed names.
    return Path(os.path.abspath(path))


def _read_list(path: Path) -> list[Path]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [_absolute(path.parent / entry) for entry in entries]


def _expand(source: Path) -> list[Path]:
    """A folder's volume files and DICOM-series subfolders; a DICOM folder itself; a list's entries; a file."""
    if source.is_dir():
        entries = sorted(source.iterdir())
        found = [_absolute(p) for p in entries
                 if (p.is_file() and batch_suffix(p)) or (p.is_dir() and _series_count(p))]
        if not found and _series_count(source):
            return [_absolute(source)]
        if not found:
            raise InputError(f"Folder '{source}' holds no volume files ({', '.join(BATCH_SUFFIXES)}), no DICOM series "
                             "and no folders of DICOM series.")
        return found
    if source.suffix.lower() in LIST_SUFFIXES:
        return _read_list(source)
    return [_absolute(source)]


def _output_names(paths: list[Path]) -> list[str]:
    """Input file stems, or paths relative to their common folder when stems repeat (patient1/ct, patient2/ct)."""
    stems = [_stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [(p.parent.relative_to(root) / stem).as_posix().replace("/", "__") for p, stem in zip(paths, stems)]


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be segmented (None when it can)."""
    if path.is_dir():
        series = _series_count(path)
        if series == 1:
            return None
        return (f"'{path}' is a folder holding {series} DICOM series" if series else
                f"'{path}' is a folder without a DICOM series") + " (give one series per folder)"
    if not path.is_file():
        return f"'{path}' does not exist"
    if not batch_suffix(path):
        return f"'{path}' is not a volume ({', '.join(BATCH_SUFFIXES)} file or DICOM folder)"
    return None


def collect_inputs(inputs: Sequence[str | Path], output_dir: str | Path) -> list[CohortItem]:
    """Volumes from folders, list files (one path per line, relative to the list), files and DICOM folders;
    validated up front."""
    _series_count.cache_clear()  # folders may have changed since an earlier call
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
    problems = [problem for problem in map(_problem, paths) if problem]
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
