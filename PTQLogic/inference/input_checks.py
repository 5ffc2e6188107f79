"""Does a volume look like what a model expects? Cheap checks on a sample of its voxels."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputWarning
from ..core.spec import ModelSpec
from ..core.volume import Volume

MAX_LABEL_VALUES = 256
CT_AIR_HU = -200.0  # the darkest 1 % of a CT lies below this (air, lungs, bowel gas); MR/PET never do
CHECK_SAMPLES = 1_000_000


def sample_values(array: np.ndarray) -> np.ndarray:
    flat = np.asarray(array).reshape(-1)
    step = max(1, flat.size // CHECK_SAMPLES)
    return flat[::step]


def looks_like_label_map(volume: Volume) -> bool:
    """Few distinct whole-number values (at most MAX_LABEL_VALUES): a segmentation, not an image."""
    values = np.unique(sample_values(volume.array))
    return values.size <= MAX_LABEL_VALUES and bool(np.all(values == np.round(values)))


def refuse_label_map(volume: Volume, name: str | Path) -> None:
    """A label map given as the image to segment: refused (InputError), as quantize refuses one to calibrate on."""
    if looks_like_label_map(volume):
        from ..core.errors import InputError

        count = np.unique(sample_values(volume.array)).size
        raise InputError(f"Input '{name}' looks like a label map ({count} distinct whole values), not an image; "
                         "give the image to segment (a label map to score against goes to --reference).")


def intensity_mismatch(volume: Volume, spec: ModelSpec) -> str | None:
    """Why ``volume`` does not look like what ``spec``'s intensity preprocessing expects, or None.

    A model with a CT window expects Hounsfield units, where the darkest voxels are air (~ -1000 HU);
    an MR (or a CT stored without its rescale slope/intercept) has none below ``CT_AIR_HU``.
    """
    if spec.preprocessing.intensity != "ct":
        return None
    first = sample_values(volume.array[0] if volume.array.ndim == 4 else volume.array)
    low = float(np.percentile(first, 1))
    if low > CT_AIR_HU:
        return (f"its darkest 1 % of voxels are at {low:.0f} or above, but model '{spec.name}' windows CT in "
                f"Hounsfield units (air is about -1000 HU): this looks like an MR or a CT without HU rescaling, "
                "and the result will likely be wrong")
    return None


def warn_intensity_mismatch(volume: Volume, spec: ModelSpec, name: str | Path) -> None:
    """Warn (:class:`InputWarning`) when a volume to segment does not look like the model's input modality."""
    reason = intensity_mismatch(volume, spec)
    if reason:
        warnings.warn(f"input '{name}': {reason}.", InputWarning, stacklevel=2)


def int8_target_warning(report: dict[str, Any], where: str) -> str | None:
    """A warning when a model folder's INT8 weights were made for CPUs with int8 dot-product instructions
    (8-bit weights) and this CPU has none: its INT8 convolutions then saturate (see onnx_graph.weight_range)."""
    from ..core.sysinfo import cpu_int8_target

    targets = [report.get("target_cpu")] + [fold.get("target_cpu") for fold in report.get("folds", {}).values()
                                            if isinstance(fold, dict)]
    if not any(isinstance(t, dict) and t.get("weight_bits") == 8 for t in targets) or cpu_int8_target() != "avx2":
        return None
    return (f"'{where}' was quantized for CPUs with int8 dot-product instructions (VNNI/AMX: 8-bit weights), but this "
            "CPU has none, so its INT8 convolutions can saturate and lose FP32's answer (how much depends on the "
            "network); quantize it again here (or with `--target-cpu avx2`), or use --precision fp32.")
