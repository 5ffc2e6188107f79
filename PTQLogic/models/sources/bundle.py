"""MONAI bundle folders (model-zoo layout) as a model source, read without running their code.

A bundle is ``configs/inference.json|yaml`` + ``configs/metadata.json`` + ``models/model.pt`` (a state
dict, read with ``torch.load(weights_only=True)``) or ``models/model.ts`` (TorchScript). From the
inference config only ``network_def`` (or a plain ``network`` component), ``preprocessing``,
``inferer`` and ``postprocessing`` are read, through the data-only resolver of
:mod:`.bundle_config`; the network class must be one of :data:`PTQLogic.models.torch_models.ARCHITECTURES` and
every transform must be on the allow-lists of :mod:`.bundle_transforms`. Class names come from the
metadata's ``network_data_format.outputs.pred.channel_def``.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ...core.errors import ModelError
from ...core.spec import DEFAULT_COLORS, ClassInfo, ModelSpec
from .base import LoadedModel
from .bundle_config import BundleConfig, read_config
from .bundle_transforms import map_inferer, map_postprocessing, map_preprocessing, target_name

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
MODEL_NAMES = ("model.pt", "model.ts")
# Constructor arguments a bundle may carry that current MONAI dropped without changing the weights.
_DEPRECATED_ARGS = {"SwinUNETR": ("img_size",)}


def _files(path: Path) -> tuple[Path, Path, Path]:
    configs, models = path / "configs", path / "models"
    config = next((configs / n for n in CONFIG_NAMES if (configs / n).is_file()), None)
    if config is None:
        raise ModelError(f"MONAI bundle '{path}' has no configs/inference.json (or .yaml); a bundle needs "
                         "configs/inference.json, configs/metadata.json and models/model.pt or models/model.ts.")
    metadata = configs / "metadata.json"
    if not metadata.is_file():
        raise ModelError(f"MONAI bundle '{path}' has no configs/metadata.json (it names the output classes in "
                         "network_data_format.outputs.pred.channel_def); add it from the bundle's release.")
    model = next((models / n for n in MODEL_NAMES if (models / n).is_file()), None)
    if model is None:
        raise ModelError(f"MONAI bundle '{path}' has no model file: expected models/model.pt (state dict) or "
                         "models/model.ts (TorchScript). Download the bundle's weights into models/.")
    return config, metadata, model


def _classes(metadata: dict, out_channels: int | None, path: Path) -> tuple[tuple[ClassInfo, ...], list[str]]:
    pred = ((metadata.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}
    channel_def = pred.get("channel_def") if isinstance(pred, dict) else None
    count = out_channels or (pred.get("num_channels") if isinstance(pred, dict) else None)
    if not isinstance(count, int) or count < 2:
        raise ModelError(f"MONAI bundle '{path}': cannot tell the number of output channels (network out_channels or "
                         "metadata network_data_format.outputs.pred.num_channels).")
    notes = []
    names = {}
    if isinstance(channel_def, dict):
        try:
            names = {int(k): str(v) for k, v in channel_def.items()}
        except (TypeError, ValueError):
            raise ModelError(f"MONAI bundle '{path}': metadata channel_def keys must be channel numbers, "
                             f"got {sorted(channel_def)[:5]}.") from None
        if sorted(names) != list(range(count)):
            raise ModelError(f"MONAI bundle '{path}': metadata channel_def names channels {sorted(names)[:8]}... but "
                             f"the network has {count} output channels; they must be 0..{count - 1}.")
    else:
        notes.append("metadata has no pred channel_def: classes are named class_1, class_2, ...")
        names = {i: ("background" if i == 0 else f"class_{i}") for i in range(count)}
    classes = tuple(ClassInfo(names[i], DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i in range(count))
    return classes, notes


def _network(config: BundleConfig) -> tuple[str, dict[str, Any], list[str]]:
    from ..torch_models import ARCHITECTURES

    key = "network_def" if config.has("network_def") else "network"
    raw = config.data.get(key)
    if not isinstance(raw, dict):
        raise ModelError(f"Bundle config '{config.file.name}' has no network component: expected 'network_def' "
                         f"(or 'network') with a '_target_' such as {sorted(ARCHITECTURES)}.")
    item = config.get(key)
    name = target_name(item, (key,), "monai.networks.nets")
    if name not in ARCHITECTURES:
        raise ModelError(f"Bundle config key '{key}#_target_' is '{item['_target_']}', not in the allow-list of "
                         f"networks {sorted(ARCHITECTURES)}; it is never imported.")
    kwargs = {k: v for k, v in item.items() if k != "_target_"}
    for arg, value in kwargs.items():
        if _has_component(value):
            raise ModelError(f"Bundle config key '{key}#{arg}' is a component ('_target_'); network arguments must "
                             "be plain values.")
    notes = []
    for arg in _DEPRECATED_ARGS.get(name, ()):
        if arg in kwargs and not _accepts(name, arg):
            kwargs.pop(arg)
            notes.append(f"{name} argument '{arg}' dropped (removed from MONAI; it does not change the weights)")
    return name, kwargs, notes


def _accepts(architecture: str, arg: str) -> bool:
    from ..torch_models import ARCHITECTURES

    try:  # imports MONAI; where it is missing (Slicer before installing dependencies) keep the argument
        return arg in inspect.signature(ARCHITECTURES[architecture].__init__).parameters
    except ImportError:
        return True


def _has_component(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_has_component(v) for v in value.values())
    return isinstance(value, list) and any(_has_component(v) for v in value)


def read_bundle(path: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The bundle's :class:`ModelSpec` (weights = its model file) and facts for reports; reads no weights."""
    path = Path(path).resolve()
    config_file, metadata_file, model_file = _files(path)
    config = BundleConfig(read_config(config_file), config_file)
    metadata = read_config(metadata_file)
    architecture, kwargs, notes = _network(config)
    in_channels = kwargs.get("in_channels", 1)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ModelError(f"Bundle config key 'network_def#in_channels' must be a positive integer, got {in_channels!r}.")
    classes, class_notes = _classes(metadata, kwargs.get("out_channels"), path)
    for key in ("preprocessing", "inferer"):
        if key not in config.data:
            raise ModelError(f"Bundle config '{config_file.name}' has no '{key}'; this tool reproduces the bundle's "
                             "own preprocessing and sliding window and needs both.")
    preprocessing, pre_notes = map_preprocessing(config)
    patch, overlap, blend, inferer_details, inferer_notes = map_inferer(config)
    post_names, post_notes = (map_postprocessing(config)
                              if "postprocessing" in config.data else ([], []))
    torchscript = model_file.suffix == ".ts"
    spec = ModelSpec(
        name=str(metadata.get("name") or path.name),
        architecture=architecture,
        classes=classes,
        patch_size=patch,
        in_channels=in_channels,
        kwargs=kwargs,
        preprocessing=preprocessing,
        overlap=overlap,
        blend_mode=blend,
        weights=str(model_file),
        weights_format="torchscript" if torchscript else "state_dict",
        base_dir=str(path),
    )
    details = {"bundle": str(path), "config": config_file.relative_to(path).as_posix(),
               "model_file": f"models/{model_file.name}", "version": metadata.get("version"),
               "postprocessing": post_names, **inferer_details,
               "notes": notes + class_notes + pre_notes + inferer_notes + post_notes}
    return spec, details


def _describe(spec: ModelSpec, details: dict[str, Any]) -> str:
    names = spec.class_names[1:]
    shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
    version = f" {details['version']}" if details.get("version") else ""
    patch = "x".join(str(v) for v in spec.patch_size)
    notes = f"; note: {'; '.join(details['notes'])}" if details["notes"] else ""
    return (f"MONAI bundle '{spec.name}'{version}: {spec.architecture} ({details['model_file']}), "
            f"{len(names)} class{'es' if len(names) != 1 else ''} ({shown}), patch {patch}, overlap {spec.overlap:g}, {spec.blend_mode} blend"
            f"{notes}")


class BundleSource:
    kind = "monai_bundle"

    def can_open(self, path: Path) -> bool:
        path = Path(path)
        return path.is_dir() and ((path / "configs").is_dir() or (path / "models").is_dir()) \
            and not (path / "spec.json").is_file()

    def describe(self, path: Path) -> str:
        spec, details = read_bundle(path)
        return _describe(spec, details)

    def load(self, path: Path, **options: Any) -> LoadedModel:
        from ..torch_models import load_torch_model

        if options:
            raise ModelError(f"MONAI bundles take no loading options, got {sorted(options)}.")
        spec, details = read_bundle(path)
        network = load_torch_model(spec)
        return LoadedModel(spec=spec, networks=[network], source=self.kind, description=_describe(spec, details),
                           details=details)
