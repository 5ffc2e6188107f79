"""Accuracy (Dice) and memory measurements used by the benchmarks and ``ptqseg evaluate``."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.errors import InputError


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
    return dice_of_pairs(pred, ref, {int(label): int(label) for label in labels})


def dice_of_pairs(pred: np.ndarray, ref: np.ndarray, pairs: dict[int, int]) -> DiceResult:
    """Dice of each prediction label against the reference label it is paired with (same-shape maps)."""
    per_class: dict[int, float] = {}
    excluded: list[int] = []
    for label, target in pairs.items():
        in_pred, in_ref = pred == label, ref == target
        total = int(np.count_nonzero(in_pred)) + int(np.count_nonzero(in_ref))
        if total == 0:
            excluded.append(int(label))
            continue
        per_class[int(label)] = 2.0 * int(np.count_nonzero(in_pred & in_ref)) / total
    mean = float(np.mean(list(per_class.values()))) if per_class else None
    return DiceResult(per_class, excluded, mean)


def agreement_dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> float:
    """Mean Dice between two predictions (e.g. INT8 vs FP32) over labels present in either.

    Two maps with none of ``labels`` agree perfectly (1.0).
    """
    result = dice_per_class(a, b, labels)
    return 1.0 if result.mean is None else result.mean


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


# --- label maps against references: one definition for `evaluate` and `segment --reference` ---------

MAX_LABELS = 1000  # more distinct values than this is an image, not a label map


def check_label_map(volume_array: np.ndarray, what: str) -> np.ndarray:
    """Refuse images given as label maps (fractional, negative, huge or too many values)."""
    array = np.asarray(volume_array)
    if array.ndim != 3:
        raise InputError(f"{what} must be a 3D label map; it has shape {array.shape}.")
    hint = "it looks like an image, not a label map; give the segmentation (e.g. the output of `ptqseg segment`)."
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise InputError(f"{what} holds fractional values; {hint}")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise InputError(f"{what} holds values {low:g}..{high:g} (labels are 0..65535); {hint}")
    values = np.unique(array)
    if values.size > MAX_LABELS:
        raise InputError(f"{what} holds {values.size} distinct values (more than {MAX_LABELS} labels); {hint}")
    return array.astype(np.int64, copy=False)


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label value -> name from a label table: ours (``{"labels": [{"value", "name"}]}``), a plain
    ``{"1": "spleen", ...}`` mapping (TotalSegmentator), or a CSV with value,name columns."""
    import csv
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            return {int(row["value"]): str(row["name"]) for row in rows}
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("labels"), list):
            return {int(item["value"]): str(item["name"]) for item in data["labels"]}
        if isinstance(data, dict):
            return {int(key): str(value) for key, value in data.items()}
        raise ValueError("expected an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"Label table '{path}' cannot be read ({exc}); give a JSON like "
                         '{"1": "liver", "2": "spleen"} or a CSV with value,name columns.') from None


def parse_label_map(text: str | None) -> dict[int, int]:
    """``"1=5,2=1"`` or a JSON file/object ``{"1": 5}``: prediction label -> reference label."""
    import json

    if not text:
        return {}
    try:
        if Path(text).suffix.lower() == ".json" and Path(text).is_file():
            data = json.loads(Path(text).read_text(encoding="utf-8"))
        elif text.strip().startswith("{"):
            data = json.loads(text)
        else:
            data = dict(item.split("=", 1) for item in text.replace(" ", "").split(",") if item)
        mapping = {int(k): int(v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError, OSError):
        raise InputError(f"--label-map {text!r} is not understood; write PRED=REF pairs such as 1=5,2=1 "
                         'or a JSON object {"1": 5, "2": 1}.') from None
    if any(k <= 0 or v < 0 for k, v in mapping.items()):
        raise InputError(f"--label-map {text!r}: labels must be positive (0 is background).")
    return mapping


def _name_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


@dataclass
class LabelComparison:
    dice: DiceResult
    pairs: dict[int, int]  # prediction label -> reference label
    names: dict[int, str]  # prediction label -> name (when known)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "per_class": {str(k): v for k, v in self.dice.per_class.items()},
            "excluded": self.dice.excluded,
            "mean": self.dice.mean,
            "pairs": {str(k): v for k, v in self.pairs.items()},
            "names": {str(k): v for k, v in self.names.items()},
            "warnings": self.warnings,
        }


def compare_label_maps(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    pred_names: dict[int, str] | None = None,
    ref_names: dict[int, str] | None = None,
    label_map: dict[int, int] | None = None,
    labels: Sequence[int] | None = None,
) -> LabelComparison:
    """Dice of each prediction class against its reference label.

    Classes are the prediction's: ``labels``, else its label table, else the values present in it.
    Each is paired with a reference label by ``label_map``, else by name through the two label tables,
    else by the same value. Reference labels that no class pairs with are ignored, with a warning.
    """
    pred, ref = _check_pair(pred, ref, "prediction and reference")
    pred_names, ref_names, label_map = pred_names or {}, ref_names or {}, dict(label_map or {})
    if labels is None:
        labels = sorted(k for k in pred_names if k > 0) or [int(v) for v in np.unique(pred) if v > 0]
    by_name = {_name_key(name): value for value, name in ref_names.items()}
    pairs, warnings = {}, []
    for label in labels:
        if label in label_map:
            pairs[label] = label_map[label]
        elif label in pred_names and ref_names:
            match = by_name.get(_name_key(pred_names[label]))
            if match is None:
                other = f"reference label {label} ({ref_names[label]}), another class" if label in ref_names else \
                    f"reference label {label}, which has no name there"
                warnings.append(f"class {label} ({pred_names[label]}) has no reference label of that name: it is "
                                f"compared with {other}; pair it with --label-map {label}=REF")
            pairs[label] = label if match is None else match
        else:
            pairs[label] = label
    dice = dice_of_pairs(pred, ref, pairs)
    unpaired = sorted(set(int(v) for v in np.unique(ref) if v > 0) - set(pairs.values()))
    if unpaired:
        shown = ", ".join(f"{v} ({ref_names[v]})" if v in ref_names else str(v) for v in unpaired[:8])
        warnings.append(f"the reference has {len(unpaired)} label(s) no predicted class pairs with, ignored: {shown}"
                        f"{' ...' if len(unpaired) > 8 else ''}; pair them with --label-map PRED=REF if they match")
        by_value = [label for label in pairs if label not in label_map and pairs[label] == label]
        if by_value and pred_names and not ref_names:  # e.g. a TotalSegmentator map: its 10 is not the model's 10
            warnings.append(f"the reference has no label names, so classes {_ranges(by_value)} were paired with "
                            "reference labels by value; if it numbers its classes differently (e.g. a "
                            "TotalSegmentator map), their Dice is meaningless: give its label table with "
                            "--reference-labels NAMES.json (pairs by name) or pairs with --label-map PRED=REF")
    names = {label: pred_names.get(label) or ref_names.get(pairs[label], "") for label in pairs}
    return LabelComparison(dice, pairs, names, warnings)


def _ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def reference_names(reference: str | Path, reference_labels: str | Path | None = None) -> dict[int, str]:
    """The reference's label names: from ``reference_labels`` (--reference-labels), else the table beside it."""
    return read_label_names(reference_labels) if reference_labels else label_table_next_to(reference)


def label_table_next_to(path: str | Path) -> dict[int, str]:
    """Names from the label table beside a label map, if present: ``x.nii.gz.labels.json`` (written by
    ``ptqseg segment``), else ``x.json`` (written by earlier versions and by hand)."""
    from ..io.volumes import label_table_paths

    path = Path(path)
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    for json_path in (label_table_paths(path)[0], path.with_name(stem + ".json")):
        if json_path.is_file():
            return read_label_names(json_path)
    return {}


def evaluate_files(
    prediction: str | Path,
    reference: str | Path,
    *,
    label_map: str | dict[int, int] | None = None,
    reference_labels: str | Path | None = None,
    labels: Sequence[int] | None = None,
) -> LabelComparison:
    """`ptqseg evaluate`: read, validate and align both label maps, then :func:`compare_label_maps`."""
    from ..io.volumes import read_volume

    mapping = parse_label_map(label_map) if isinstance(label_map, str) or label_map is None else dict(label_map)
    pred = read_volume(prediction)
    check_label_map(pred.array, f"Prediction '{prediction}'")
    ref = read_volume(reference)
    check_label_map(ref.array, f"Reference '{reference}'")
    ref, note = ref.aligned_to(pred, f"Reference '{reference}'")
    ref_names = reference_names(reference, reference_labels)
    result = compare_label_maps(pred.array, ref.array, pred_names=label_table_next_to(prediction),
                                ref_names=ref_names, label_map=mapping, labels=labels)
    if note:
        result.warnings.insert(0, note)
    return result


def format_comparison(result: LabelComparison) -> str:
    rows = []
    for label, dice in result.dice.per_class.items():
        name = result.names.get(label) or ""
        target = result.pairs[label]
        rows.append(f"  {label:>3} {name:<24} vs reference {target:>3}: {dice:.4f}")
    mean = "n/a" if result.dice.mean is None else f"{result.dice.mean:.4f}"
    lines = ["Dice per class:", *rows, f"mean Dice {mean} over {len(result.dice.per_class)} classes"]
    if result.dice.excluded:
        lines.append(f"absent from both (not counted): {result.dice.excluded}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)
