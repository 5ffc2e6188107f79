"""Atomic file output: write to a temporary sibling, then rename, so no partial file is ever left.

Files and folders made here get the permissions the user's umask asks for (``tempfile`` alone would
leave them 0600/0700), and errors name the final path, never the temporary one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from .errors import InputError

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` is process-wide)."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()``/``mkdir()`` would have given it (0666/0777 minus umask)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def make_temp_dir(prefix: str, parent: str | Path) -> Path:
    """``tempfile.mkdtemp`` in ``parent``, with umask permissions (it is renamed into place later)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    apply_umask(path, folder=True)
    return path


def check_writable_dir(folder: str | Path, what: str, needed_bytes: int = 0) -> Path:
    """Fail early, before long work, when ``folder`` (or its nearest existing parent) cannot take output."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"Cannot write the {what} in '{folder}': '{existing}' is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"Cannot write the {what} in '{folder}': folder '{existing}' is not writable; "
            "choose an output location you may write to."
        )
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return folder
    if free < max(needed_bytes, 1 << 20):
        raise InputError(
            f"Cannot write the {what} in '{folder}': only {free / 1e6:.1f} MB free on that disk"
            + (f" ({needed_bytes / 1e6:.1f} MB needed)" if needed_bytes else "")
            + "; free some space or choose another location."
        )
    return folder


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s folder; on success it is renamed to ``final``.

    The temporary name keeps ``final``'s suffixes (writers pick formats from them, e.g. ``.nii.gz``).
    On any exception the temporary file is removed and ``final`` is untouched; an ``OSError`` is
    reported against ``final`` (the temporary name means nothing to the user).
    """
    final = Path(final)
    suffix = suffix if suffix is not None else "".join(final.suffixes)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=".partial" + suffix, dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise InputError(f"Cannot write '{final}': {exc.strerror or exc}; choose a writable location.") from None
    tmp_path = Path(tmp)
    os.chmod(tmp_path, default_mode(directory=False))  # mkstemp makes 0600; outputs get the usual umask mode
    try:
        try:
            yield tmp_path
            if tmp_path.exists():
                apply_umask(tmp_path)
            os.replace(tmp_path, final)
        except OSError as exc:
            if exc.filename is None or Path(exc.filename) == tmp_path:
                raise InputError(f"Cannot write '{final}': {exc.strerror or exc}; "
                                 "check free disk space and permissions.") from None
            raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def staging_dir(final: str | Path) -> Path:
    """A fresh hidden folder beside ``final`` to build it in, with the mode a plain ``mkdir`` would give.

    The caller renames it to ``final`` when complete (or removes it), so no half-written folder is left.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    os.chmod(path, default_mode(directory=True))  # mkdtemp makes 0700, unreadable to the user's group
    return path


def publish_dir(staging: Path, final: Path) -> None:
    """Replace ``final`` by ``staging`` (from :func:`staging_dir`) with two renames: never half-written."""
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
    os.replace(staging, final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def default_mode(directory: bool) -> int:
    """Permission bits a new file or folder gets under the process umask."""
    mask = _umask()
    return (0o777 if directory else 0o666) & ~mask


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(output: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """A label map path that can be written: a known suffix, not an input, in a writable folder."""
    output = Path(output)
    name = output.name.lower()
    if not any(name.endswith(s) for s in LABELMAP_SUFFIXES):
        raise InputError(f"Output '{output}' must end with one of {LABELMAP_SUFFIXES} (NIfTI or NRRD label map).")
    for item in inputs:
        if Path(item).resolve() == output.resolve():
            raise InputError(f"Output '{output}' is the input file; choose another path so the input is kept.")
    if output.is_dir():
        raise InputError(f"Output '{output}' is a folder; give a file name such as labels.nii.gz.")
    check_writable_dir(output.parent, f"label map '{output.name}'")
    return output
