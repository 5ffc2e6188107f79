"""How much memory one volume may use: the OS's available memory, or a cap set by the user."""
from __future__ import annotations

import os

MEMORY_ENV = "PTQSEG_MAX_MEMORY_GB"  # optional cap on the estimated working memory of one volume
ENGINE_WORKING_BYTES = 2**29


def available_memory_bytes() -> int:
    """Memory this process may use: $PTQSEG_MAX_MEMORY_GB if set, else what the OS reports as available."""
    if os.environ.get(MEMORY_ENV):
        return int(float(os.environ[MEMORY_ENV]) * 2**30)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return 1 << 62
