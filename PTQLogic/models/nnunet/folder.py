"""Read and validate an nnU-Net v2 trained-model folder (``Trainer__Plans__configuration``).

Everything in dataset.json/plans.json that nnU-Net would turn into code (network class, ``_kw_requires_import``
entries, normalization schemes, resampling functions, preprocessor, label manager, image reader) is checked
against an allow-list here, before any weights are read; nothing named by the files is imported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.errors import InputError, ModelError

DATASET_JSON = "dataset.json"
PLANS_JSON = "plans.json"
MODEL_DIR_MARKER = "nnunet_model.json"  # marks a quantized nnU-Net model folder (quantization.nnunet writes it)
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")
RESAMPLING_FUNCTIONS = ("resample_data_or_seg_to_shape", "resample_torch_fornnunet")
PREPROCESSORS = ("DefaultPreprocessor",)
# readers that keep the file's voxel order (SimpleITK's (z, y, x) array); *WithReorient ones reorient first
IMAGE_READERS = ("SimpleITKIO", "NibabelIO")
LABEL_MANAGERS = ("LabelManager",)


def is_nnunet_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DATASET_JSON).is_file() and (path / PLANS_JSON).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"nnU-Net folder '{path.parent}' has no {path.name}; copy the whole trained-model folder "
                         f"(dataset.json, plans.json, fold_*/checkpoint_final.pth).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"'{path}' must hold a JSON object.")
    return data


@dataclass(frozen=True)
class NnUNetFolder:
    root: Path
    dataset: dict[str, Any]
    plans: dict[str, Any]
    configuration: str
    folds: tuple[str, ...]  # "0", "1", ..., or "all"
    checkpoint_name: str
    trainer_name: str

    def checkpoint_path(self, fold: str) -> Path:
        return self.root / f"fold_{fold}" / self.checkpoint_name

    @property
    def config(self) -> dict[str, Any]:
        return resolve_configuration(self.plans, self.configuration)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.dataset)

    @property
    def patch_size(self) -> list[int]:
        return [int(v) for v in self.config["patch_size"]]

    @property
    def network_class(self) -> str:
        return str(self.config["architecture"]["network_class_name"]).rsplit(".", 1)[-1]

    def describe(self) -> str:
        names = self.class_names[1:]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        patch = "x".join(str(v) for v in self.patch_size)
        spacing = "x".join(f"{v:g}" for v in self.config["spacing"])
        folds = ", ".join(self.folds)
        return (f"nnU-Net v2 {self.network_class} ({self.configuration}, {self.plans.get('dataset_name', '?')}), "
                f"{len(names)} classes ({shown}), patch {patch} at {spacing} mm, folds {folds}")


def class_names(dataset: dict[str, Any]) -> list[str]:
    """Names by label value (0..n-1); region-based and non-consecutive label sets are refused."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelError("nnU-Net dataset.json has no 'labels' mapping (name -> value).")
    if "regions_class_order" in dataset or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise ModelError("This nnU-Net model is trained on regions (overlapping label sets, 'regions_class_order'); "
                         "region-based models are not supported yet: use a model trained on plain labels.")
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ModelError(f"nnU-Net dataset.json: label {name!r} has value {value!r}; label values must be integers.")
        by_value[value] = str(name)
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise ModelError(f"nnU-Net dataset.json: label values must be 0, 1, ..., n-1 (background 0); got "
                         f"{sorted(by_value)}.")
    return [by_value[v] for v in range(len(by_value))]


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The configuration dict with ``inherits_from`` resolved, as nnU-Net's PlansManager does."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        available = list(configurations) if isinstance(configurations, dict) else []
        raise ModelError(f"nnU-Net plans.json has no configuration {name!r} (available: {available}).")
    chain, current = [], name
    while True:
        if current in chain:
            raise ModelError(f"nnU-Net plans.json: circular 'inherits_from' between configurations {chain}.")
        chain.append(current)
        parent = configurations[current].get("inherits_from")
        if parent is None:
            break
        if parent not in configurations:
            raise ModelError(f"nnU-Net plans.json: configuration {current!r} inherits from unknown {parent!r}.")
        current = parent
    resolved: dict[str, Any] = {}
    for item in reversed(chain):
        resolved.update(configurations[item])
    return resolved


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelError(message)


def validate_plans(plans: dict[str, Any], configuration: str, dataset: dict[str, Any]) -> None:
    """Every name in the plans that nnU-Net would resolve to code must be on an allow-list."""
    from .network import validate_architecture

    for key in ("transpose_forward", "transpose_backward", "foreground_intensity_properties_per_channel"):
        _require(key in plans, f"nnU-Net plans.json is missing '{key}'.")
    _require(sorted(plans["transpose_forward"]) == [0, 1, 2], "nnU-Net plans.json: transpose_forward must be a "
             f"permutation of [0, 1, 2], got {plans['transpose_forward']}.")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    _require(reader in IMAGE_READERS, f"nnU-Net plans.json: image_reader_writer {reader!r} is not supported "
             f"(supported: {IMAGE_READERS}; reorienting readers and 2D readers are not).")
    manager = plans.get("label_manager", "LabelManager")
    _require(manager in LABEL_MANAGERS, f"nnU-Net plans.json: label_manager {manager!r} is not supported.")
    config = resolve_configuration(plans, configuration)
    for key in ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "architecture",
                "resampling_fn_data", "resampling_fn_probabilities", "resampling_fn_data_kwargs",
                "resampling_fn_probabilities_kwargs"):
        _require(key in config, f"nnU-Net plans.json: configuration {configuration!r} is missing '{key}' (plans "
                 "written before nnU-Net v2.2 are not supported; re-plan with a current nnU-Net).")
    _require(len(config["patch_size"]) == 3, f"nnU-Net configuration {configuration!r} is 2D (patch "
             f"{config['patch_size']}); only 3D configurations (3d_fullres, 3d_lowres) are supported.")
    _require(config.get("previous_stage") is None, f"nnU-Net configuration {configuration!r} is a cascade stage; "
             "cascades are not supported: use 3d_fullres.")
    _require(config.get("preprocessor_name", "DefaultPreprocessor") in PREPROCESSORS,
             f"nnU-Net preprocessor {config.get('preprocessor_name')!r} is not supported ({PREPROCESSORS}).")
    channels = dataset.get("channel_names", dataset.get("modality"))
    _require(isinstance(channels, dict) and len(channels) >= 1, "nnU-Net dataset.json has no 'channel_names'.")
    _require(len(config["normalization_schemes"]) == len(channels), "nnU-Net plans.json: one normalization scheme "
             f"per input channel expected ({len(channels)} channels, {config['normalization_schemes']}).")
    for scheme in config["normalization_schemes"]:
        _require(scheme in NORMALIZATIONS, f"nnU-Net normalization {scheme!r} is not supported ({NORMALIZATIONS}).")
    for key in ("resampling_fn_data", "resampling_fn_probabilities", "resampling_fn_seg"):
        if key in config:
            _require(config[key] in RESAMPLING_FUNCTIONS, f"nnU-Net plans.json: {key} {config[key]!r} is not "
                     f"supported ({RESAMPLING_FUNCTIONS}).")
            _require(isinstance(config.get(key + "_kwargs", {}), dict), f"nnU-Net plans.json: {key}_kwargs must "
                     "be an object.")
    properties = plans["foreground_intensity_properties_per_channel"]
    for index, scheme in enumerate(config["normalization_schemes"]):
        if scheme == "CTNormalization":
            stats = properties.get(str(index), {})
            missing = [k for k in ("mean", "std", "percentile_00_5", "percentile_99_5") if k not in stats]
            _require(not missing, f"nnU-Net plans.json: CT normalization of channel {index} needs {missing} in "
                     "foreground_intensity_properties_per_channel.")
    validate_architecture(config["architecture"])


def _folds(root: Path, checkpoint_name: str, wanted: list[str] | None) -> tuple[str, ...]:
    present = sorted((p.name[len("fold_"):] for p in root.glob("fold_*") if (p / checkpoint_name).is_file()),
                     key=lambda f: (f == "all", int(f) if f.isdigit() else 0))
    if wanted:
        missing = [f for f in wanted if f not in present]
        if missing:
            raise ModelError(f"nnU-Net folder '{root}' has no {', '.join(f'fold_{f}/{checkpoint_name}' for f in missing)}"
                             f" (folds with that checkpoint: {present or 'none'}).")
        return tuple(wanted)
    numbered = [f for f in present if f != "all"]
    if not present:
        raise ModelError(f"nnU-Net folder '{root}' has no fold_*/{checkpoint_name}; copy the trained folds too "
                         "(or choose checkpoint_best.pth if only that was kept).")
    return tuple(numbered or present)


def open_nnunet_folder(path: str | Path, folds: list[str] | None = None,
                       checkpoint: str = "checkpoint_final.pth") -> NnUNetFolder:
    """Validate the folder (files, plans allow-lists, folds) without reading any weights."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"nnU-Net model folder '{root}' does not exist.")
    if checkpoint not in CHECKPOINTS:
        raise InputError(f"Checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}.")
    dataset = _read_json(root / DATASET_JSON)
    plans = _read_json(root / PLANS_JSON)
    class_names(dataset)
    parts = root.name.split("__")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise ModelError(f"nnU-Net plans.json in '{root}' has no 'configurations'; it is not a trained model's plans.")
    if len(parts) == 3 and parts[2] in configurations:
        configuration = parts[2]
    elif "3d_fullres" in configurations:
        configuration = "3d_fullres"
    else:
        raise ModelError(f"Cannot tell the nnU-Net configuration of '{root}': name the folder "
                         "Trainer__Plans__configuration as nnU-Net does (e.g. nnUNetTrainer__nnUNetPlans__3d_fullres).")
    validate_plans(plans, configuration, dataset)
    wanted = [str(f) for f in folds] if folds else None
    return NnUNetFolder(root=root, dataset=dataset, plans=plans, configuration=configuration,
                        folds=_folds(root, checkpoint, wanted), checkpoint_name=checkpoint,
                        trainer_name=parts[0] if len(parts) == 3 else "nnUNetTrainer")
