"""Engine cache: built artifacts (TensorRT plans, derived ONNX files) keyed by everything they depend on.

A key is a stable hash of the fields (model content sha256, precision, calibration settings, shape
profile, runtime name + version, device name, and the build recipe passed as extra fields). The
model's file name is not part of it: a renamed identical model reuses its artifacts. A matching
artifact is reused; otherwise it is built
into a temporary file and renamed, so a failed or cancelled build leaves nothing behind. A small JSON
with the fields (and the artifact's sha256) sits next to each artifact; an artifact whose sidecar is
missing, names other fields or another hash (truncated, copied from another version) is rebuilt.

Caches live in a user cache folder (``PTQSEG_CACHE_DIR``, else platformdirs' user cache folder for
"ptqseg"), one subfolder per model content, never in the model folder (which may be read-only).
Concurrent builds of one artifact take a lock (``flock``; released by the OS if a process dies), so
one process builds and the others reuse its result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import PTQError
from ..core.fileio import atomic_path, atomic_write_text, sha256_file
from ..core.offline import user_cache_root


CACHE_ENV = "PTQSEG_CACHE_DIR"


def cache_root() -> Path:
    """Where engine caches go: ``$PTQSEG_CACHE_DIR``, else the user cache folder (e.g. ~/.cache/ptqseg)."""
    return user_cache_root()


def model_cache_dir(model_files: list[Path], root: Path | None = None) -> Path:
    """The cache folder of one model, keyed by the content of its files (moving the folder keeps it)."""
    digest = hashlib.sha256()
    for path in sorted(model_files, key=lambda p: p.name):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return (root or cache_root()) / "models" / digest.hexdigest()[:24]


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path``; the file is removed on release, so none is left behind.

    A waiter that wakes up on a lock file the holder has just removed locks the file again (the path now
    names another file or none): only a lock on the file at ``lock_path`` counts.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: filelock's lock (its file is removed on release too)
        from filelock import FileLock

        with FileLock(str(lock_path)):
            yield
        return
    while True:
        handle = open(lock_path, "a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # the OS releases it if this process dies: no stale locks
            try:
                if os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            handle.close()
            raise
        handle.close()  # the holder removed the file we waited on: lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        handle.close()  # releases the lock


@contextlib.contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock for building ``final``; the lock file is removed once the build is done."""
    with file_lock(final.with_name(final.name + ".lock")):
        yield


def follow_umask(paths: list[Path]) -> None:
    """Give files a library wrote with its own fixed mode (OpenVINO's 0440 cache blobs) the mode the umask
    gives every other output (0644 under umask 022)."""
    from ..core.fileio import current_umask

    mode = 0o666 & ~current_umask()
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_file() and (path.stat().st_mode & 0o777) != mode:  # another user's: PermissionError
                path.chmod(mode)


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


user_cache_dir = cache_root  # TensorRT timing caches live there too


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

    @staticmethod
    def _sidecar(final: Path, suffix: str) -> Path:
        return final.parent / (final.name[: len(final.name) - len(suffix)] + ".fields.json")

    def is_valid(self, final: Path, fields: dict[str, Any], suffix: str) -> bool:
        """The artifact exists, its sidecar names the same fields and its sha256 matches the recorded one."""
        sidecar = self._sidecar(final, suffix)
        if not final.is_file() or not sidecar.is_file():
            return False
        try:
            recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        expected = json.loads(json.dumps(fields, sort_keys=True, default=str))
        if not isinstance(recorded, dict) or recorded.pop("artifact_sha256", None) != sha256_file(final):
            return False
        return recorded == expected

    def get_or_build(
        self, fields: dict[str, Any], build: Callable[[Path], None], suffix: str = ".plan"
    ) -> Path:
        """Return the cached artifact for ``fields``, calling ``build(tmp_path)`` only when it is missing
        or does not verify (other fields, truncated, hash mismatch)."""
        final = self.path_for(fields, suffix)
        if self.is_valid(final, fields, suffix):
            return final
        with build_lock(final):
            if self.is_valid(final, fields, suffix):  # another process built it while we waited
                return final
            # leftovers of a builder that was killed (SIGKILL, power loss): nobody else builds it now
            for stale in final.parent.glob(f".{final.name.split('.')[0]}.*.partial{suffix}"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            with atomic_path(final, suffix=suffix) as tmp:
                build(tmp)
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    raise PTQError(f"Building '{final.name}' produced no output; nothing was cached.")
                record = {**json.loads(json.dumps(fields, default=str)), "artifact_sha256": sha256_file(tmp)}
            atomic_write_text(self._sidecar(final, suffix), json.dumps(record, indent=2, sort_keys=True) + "\n")
        return final
