"""The scratch folder a local cluster's workers share with the driver, and the ones killed runs left behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SCRATCH_PREFIX = "ptqseg-batch-"  # then the driver's process id: ptqseg-batch-<pid>-<random>


def make_scratch_dir() -> str:
    """A new scratch folder named after this process, after removing those of runs that were killed."""
    remove_stale_scratch_dirs()
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def remove_stale_scratch_dirs(parent: Path | None = None) -> list[Path]:
    """Remove this user's scratch folders whose process is gone (``kill -9`` leaves them); returns them."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob(SCRATCH_PREFIX + "*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-")[0]
        try:
            mine = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no pid can be that large)
        return False
    except PermissionError:  # another user's process
        return True
    return True
