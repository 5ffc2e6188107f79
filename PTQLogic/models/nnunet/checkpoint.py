"""Load an nnU-Net ``checkpoint_*.pth`` without executing anything from its pickle.

nnU-Net saves a dict (network_weights, optimizer_state, grad_scaler_state, logging, _best_ema,
current_epoch, init_args, trainer_name, inference_allowed_mirroring_axes). Besides tensors it pickles
numpy scalars/arrays (logging curves, ``_best_ema``) and ``torch.device``. Only those globals are
allowed, and only for this one ``torch.load`` call (``torch.serialization.safe_globals``).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from ...core.errors import ModelError


def _numpy_globals() -> list[Any]:
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        for name in ("scalar", "_reconstruct"):
            allowed.append((_numpy_attr(name), f"{module_name}.{name}"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes by their class
        for name in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                     "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def _numpy_attr(name: str) -> Any:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


def allowed_globals() -> list[Any]:
    import torch

    return [*_numpy_globals(), torch.device]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict; a pickle naming any other global is refused (and nothing of it runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"nnU-Net checkpoint '{path}' does not exist.")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"'{path}' is not a PyTorch zip checkpoint (legacy pickles are never loaded, for safety).")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(path)
        raise ModelError(
            f"Refused to load '{path}': its pickle names {refused or 'an object'} that is not a tensor, number or "
            "numpy value (allowed: tensors, torch.device, numpy scalars/arrays). Nothing from it was run; "
            "only load checkpoints written by nnU-Net itself."
        ) from None
    except Exception as exc:  # truncated zip, bad record, ...
        raise ModelError(f"Could not read nnU-Net checkpoint '{path}': {type(exc).__name__}: {exc}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ModelError(f"'{path}' is not an nnU-Net checkpoint (no 'network_weights' dict).")
    return checkpoint


def _refused_global(path: Path) -> str:
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return ""
    allowed = {f"{g[1]}" if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    refused = [n for n in names if n not in allowed]
    return ", ".join(repr(n) for n in refused[:3])
