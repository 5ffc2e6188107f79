"""Accuracy (Dice), latency and memory measurements used by the benchmarks and ``ptqseg evaluate``."""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InputError


@dataclass
class DiceResult:
    per_class: dict[int, float]  # label -> Dice, for labels present in prediction or reference
    excluded: list[int] = field(default_factory=list)  # labels absent from both (Dice undefined)
    mean: float | None = None  # mean over per_class; None when every label was excluded

    def to_dict(self) -> dict:
        data = asdict(self)
        data["per_class"] = {str(k): v for k, v in self.per_class.items()}
        return data


def _check_pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"Cannot compare {what}: shapes differ ({a.shape} vs {b.shape}); "
                         "resample both label maps to the same grid first.")
    return a, b


def dice_per_class(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> DiceResult:
    """Dice of each label in ``labels`` (typically the foreground classes) between two label maps.

    A label absent from both maps has no defined Dice: it is listed in ``excluded`` and left out of
    the mean rather than counted as 1 or 0.
    """
    pred, ref = _check_pair(pred, ref, "prediction and reference")
    per_class: dict[int, float] = {}
    excluded: list[int] = []
    for label in labels:
        in_pred, in_ref = pred == label, ref == label
        total = int(np.count_nonzero(in_pred)) + int(np.count_nonzero(in_ref))
        if total == 0:
            excluded.append(int(label))
            continue
        per_class[int(label)] = 2.0 * int(np.count_nonzero(in_pred & in_ref)) / total
    mean = float(np.mean(list(per_class.values()))) if per_class else None
    return DiceResult(per_class, excluded, mean)


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label value -> name from ``{"1": "spleen", ...}`` (TotalSegmentator) or a ``.labels.json`` table of ours."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("labels"), list):
            return {int(row["value"]): str(row["name"]) for row in data["labels"]}
        if isinstance(data, dict):
            return {int(value): str(name) for value, name in data.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"Cannot read label names from '{path}': {exc}. Give a JSON object of value -> name "
                         '(e.g. {"1": "spleen"}) or a .labels.json table written by ptqseg.') from None
    raise InputError(f"Label names '{path}' must be a JSON object of value -> name (e.g. {{\"1\": \"spleen\"}}).")


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def dice_by_name(pred: np.ndarray, ref: np.ndarray, pred_names: dict[int, str],
                 ref_names: dict[int, str]) -> tuple[DiceResult, dict[int, str]]:
    """Dice of the classes both tables name alike (case, spaces and dashes aside), whatever their values.

    The reference's values are mapped onto the prediction's; returns the result keyed by prediction
    value and the names of the classes compared.
    """
    pred, ref = _check_pair(pred, ref, "prediction and reference")
    by_key = {_key(name): value for value, name in ref_names.items() if value != 0}
    matched = {value: by_key[_key(name)] for value, name in pred_names.items() if value != 0 and _key(name) in by_key}
    if not matched:
        raise InputError("No class name of the prediction appears among the reference's label names "
                         f"(prediction: {', '.join(sorted(pred_names.values())[:6])}; reference: "
                         f"{', '.join(sorted(ref_names.values())[:6])}, ...); check the label name files.")
    mapped = np.zeros(ref.shape, dtype=np.int32)
    for value, ref_value in matched.items():
        mapped[ref == ref_value] = value
    return dice_per_class(pred, mapped, list(matched)), {value: pred_names[value] for value in matched}


def dice_of_named_files(prediction: str | Path, pred: np.ndarray, ref: np.ndarray, reference_names: str | Path,
                        prediction_names: str | Path | None = None) -> tuple[DiceResult, dict[int, str]]:
    """:func:`dice_by_name` with the names read from files; the prediction's default to its ``.labels.json``."""
    from .imageio import label_table_paths

    table = Path(prediction_names or label_table_paths(prediction)[0])
    if not table.is_file():
        raise InputError(f"No label names for the prediction: '{table}' does not exist; give --prediction-names.")
    return dice_by_name(pred, ref, read_label_names(table), read_label_names(reference_names))


def warn_foreign_reference(ref: np.ndarray, num_classes: int, reference: str | Path) -> None:
    """Warn when a reference holds label values a model with ``num_classes`` outputs cannot produce."""
    import warnings

    from .errors import InputWarning

    extra = [int(v) for v in np.unique(ref) if v >= num_classes]
    if extra:  # e.g. a TotalSegmentator map (117 classes) against a 6-class model: values mean other organs
        warnings.warn(f"reference '{reference}' holds label values the model does not have ({len(extra)}, e.g. "
                      f"{extra[:3]}); Dice compares label values, so it is meaningless if the two number classes "
                      "differently: use `ptqseg evaluate --reference-names NAMES.json` to match classes by name.",
                      InputWarning, stacklevel=2)


def mean_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> float | None:
    return dice_per_class(pred, ref, labels).mean


def agreement_dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> float:
    """Mean Dice between two predictions (e.g. INT8 vs FP32) over labels present in either.

    Two maps with none of ``labels`` agree perfectly (1.0).
    """
    result = dice_per_class(a, b, labels)
    return 1.0 if result.mean is None else result.mean


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(engine, patch_shape: Sequence[int], warmup: int = 3, repeats: int = 10, seed: int = 0) -> LatencyStats:
    """Wall-clock time of ``engine(batch)`` on a random (N, C, D, H, W) batch, after ``warmup`` calls.

    CUDA work is synchronized before and after each call so the time covers the whole inference.
    """
    shape = tuple(int(v) for v in patch_shape)
    if len(shape) != 5 or any(v < 1 for v in shape):
        raise InputError(f"Latency patch shape must be (N, C, D, H, W) positive sizes; got {tuple(patch_shape)}.")
    if repeats < 1 or warmup < 0:
        raise InputError(f"Latency needs repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}.")
    device = torch.device(getattr(engine, "device", "cpu"))
    generator = torch.Generator().manual_seed(seed)
    batch = torch.rand(shape, generator=generator, dtype=torch.float32).to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            engine(batch)
        _synchronize(device)
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            engine(batch)
            _synchronize(device)
            times.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return LatencyStats(statistics.median(times), p90, statistics.fmean(times), repeats)


def peak_memory_bytes() -> dict[str, int | None]:
    """Peak resident memory of this process and, when CUDA is in use, peak allocated GPU memory."""
    peak_rss = None
    try:
        import resource

        # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        peak_rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except (ImportError, AttributeError):
        import psutil

        info = psutil.Process().memory_info()
        peak_rss = int(getattr(info, "peak_wset", info.rss))
    cuda_peak = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_peak = int(torch.cuda.max_memory_allocated())
    return {"cpu_peak_rss": peak_rss, "cuda_peak_allocated": cuda_peak}


def file_size_mb(path: str | Path) -> float:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}' is not a file; cannot measure its size.")
    return path.stat().st_size / 1e6
