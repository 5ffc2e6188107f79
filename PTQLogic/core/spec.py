"""Model spec: everything needed to run a 3D segmentation network on a volume.

A spec is a small JSON (or YAML) file next to the weights. Paths inside it are relative to the
spec file. Loading a spec never executes code: the architecture is looked up by name in a fixed
table of MONAI networks (see :mod:`PTQLogic.models.torch_models`).

Example::

    {"name": "phantom-unet", "architecture": "UNet",
     "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 5,
                "channels": [16, 32, 64, 128], "strides": [2, 2, 2]},
     "in_channels": 1,
     "classes": [{"name": "background"}, {"name": "liver", "color": [221, 130, 101]}, ...],
     "patch_size": [64, 64, 64],
     "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                       "intensity": "ct", "ct_window": [-1000, 1000]},
     "overlap": 0.25, "blend_mode": "gaussian",
     "weights": "phantom-unet.pt", "weights_format": "state_dict"}
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

INTENSITY_MODES = ("ct", "zscore", "none")
# MONAI intensity transforms a spec may chain after ``intensity`` (read from MONAI bundles), with their
# accepted arguments; values are plain numbers/booleans, applied by MONAI itself (preprocess.py).
INTENSITY_STEPS: dict[str, tuple[str, ...]] = {
    "ScaleIntensityRange": ("a_min", "a_max", "b_min", "b_max", "clip"),
    "NormalizeIntensity": ("subtrahend", "divisor", "nonzero", "channel_wise"),
    "ScaleIntensity": ("minv", "maxv", "factor", "channel_wise"),
    "ScaleIntensityRangePercentiles": ("lower", "upper", "b_min", "b_max", "clip", "relative", "channel_wise"),
}
WEIGHTS_FORMATS = ("state_dict", "torchscript", "onnx")
BLEND_MODES = ("gaussian", "constant")

# A few distinct, readable colors for classes without one (Slicer's GenericAnatomyColors style).
DEFAULT_COLORS = [
    (0, 0, 0), (221, 130, 101), (157, 108, 162), (185, 102, 83), (216, 101, 79), (255, 253, 229),
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (230, 220, 70),
    (183, 156, 220), (0, 151, 206), (250, 250, 225), (244, 214, 49), (200, 200, 235),
]


@dataclass(frozen=True)
class ClassInfo:
    """One output channel of the network; its position in ``ModelSpec.classes`` is its label value."""

    name: str
    color: tuple[int, int, int] = (128, 128, 128)


@dataclass(frozen=True)
class Preprocessing:
    orientation: str | None = "RAS"  # axcodes of the network's input grid; None keeps the file's
    spacing: tuple[float, float, float] | None = None  # mm along the network's i, j, k axes; None keeps
    intensity: str = "ct"  # "ct": clip to ct_window and scale to [0, 1]; "zscore": per-volume; "none"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    # MONAI intensity transforms applied, in order, after ``intensity`` (MONAI bundles whose chain has no
    # equivalent above), e.g. ({"transform": "NormalizeIntensity", "nonzero": True}, {"transform": "ScaleIntensity",
    # "minv": -1.0, "maxv": 1.0}); names and arguments from INTENSITY_STEPS.
    steps: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str  # a MONAI network name (models.ARCHITECTURES), "torchscript" or "onnx"
    classes: tuple[ClassInfo, ...]
    patch_size: tuple[int, int, int]
    in_channels: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing = Preprocessing()
    overlap: float = 0.25
    blend_mode: str = "gaussian"
    weights: str | None = None  # path, relative to the spec file's folder
    weights_format: str = "state_dict"
    base_dir: str = "."  # folder that relative paths are resolved against (not saved)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def weights_path(self) -> Path | None:
        if self.weights is None:
            return None
        path = Path(self.weights)
        return path if path.is_absolute() else Path(self.base_dir) / path

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("base_dir")
        data["classes"] = [{"name": c.name, "color": list(c.color)} for c in self.classes]
        return data

    def save(self, path: str | Path) -> None:
        from .fileio import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def _tuple3(value: Any, what: str, cast=float) -> tuple:
    try:
        items = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise ModelError(f"Model spec: {what} must be a list of 3 numbers, got {value!r}.") from None
    if len(items) != 3 or any(v <= 0 for v in items):
        raise ModelError(f"Model spec: {what} must be 3 positive numbers, got {value!r}.")
    return items


def intensity_steps(raw: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, (list, tuple)):
        raise ModelError("Model spec: preprocessing.steps must be a list of {\"transform\": NAME, ...} objects.")
    steps = []
    for i, step in enumerate(raw):
        name = step.get("transform") if isinstance(step, dict) else None
        if name not in INTENSITY_STEPS:
            raise ModelError(f"Model spec: preprocessing.steps[{i}] must name a transform out of "
                             f"{sorted(INTENSITY_STEPS)}, got {step!r}.")
        bad = sorted(set(step) - {"transform", *INTENSITY_STEPS[name]})
        values = [v for k, v in step.items() if k != "transform"]
        if bad or not all(v is None or isinstance(v, (bool, int, float)) for v in values):
            raise ModelError(f"Model spec: preprocessing.steps[{i}] ({name}) takes numbers/booleans for "
                             f"{list(INTENSITY_STEPS[name])}, got {step!r}.")
        steps.append(dict(step))
    return tuple(steps)


def _check_keys(data: Any) -> None:
    if not isinstance(data, dict):
        raise ModelError("Model spec must be a JSON/YAML object (a mapping of keys to values).")
    known = {f for f in ModelSpec.__dataclass_fields__ if f != "base_dir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelError(f"Model spec has unknown keys {unknown}; allowed keys are {sorted(known)}.")
    for key in ("name", "architecture", "classes", "patch_size"):
        if key not in data:
            raise ModelError(f"Model spec is missing required key '{key}'.")


def _one_of(value: Any, allowed: tuple[str, ...], what: str) -> Any:
    if value not in allowed:
        raise ModelError(f"Model spec: {what} must be one of {allowed}, got {value!r}.")
    return value


def _classes(raw_classes: Any) -> tuple[ClassInfo, ...]:
    """Names as strings or {"name", "color"} objects; a class without a color gets one of DEFAULT_COLORS."""
    if not isinstance(raw_classes, list) or len(raw_classes) < 2:
        raise ModelError("Model spec: 'classes' must list every output channel, background first (>= 2).")
    classes = []
    for i, item in enumerate(raw_classes):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ModelError(f"Model spec: classes[{i}] needs a 'name' string, got {item!r}.")
        color = item.get("color", DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
        if len(color) != 3 or not all(0 <= int(c) <= 255 for c in color):
            raise ModelError(f"Model spec: classes[{i}].color must be 3 integers 0-255, got {color!r}.")
        classes.append(ClassInfo(item["name"], tuple(int(c) for c in color)))
    return tuple(classes)


def _preprocessing(pre: Any) -> Preprocessing:
    if not isinstance(pre, dict):
        raise ModelError("Model spec: 'preprocessing' must be an object.")
    bad = sorted(set(pre) - set(Preprocessing.__dataclass_fields__))
    if bad:
        raise ModelError(f"Model spec: unknown preprocessing keys {bad}.")
    intensity = _one_of(pre.get("intensity", "ct"), INTENSITY_MODES, "preprocessing.intensity")
    window = tuple(float(v) for v in pre.get("ct_window", (-1000.0, 1000.0)))
    if len(window) != 2 or window[0] >= window[1]:
        raise ModelError(f"Model spec: preprocessing.ct_window must be [low, high] with low < high, got {window}.")
    spacing = pre.get("spacing")
    steps = intensity_steps(pre.get("steps", []))
    return Preprocessing(
        orientation=pre.get("orientation", "RAS"),
        spacing=None if spacing is None else _tuple3(spacing, "preprocessing.spacing"),
        intensity=intensity,
        ct_window=window,
        steps=steps,
    )


def spec_from_dict(data: dict[str, Any], base_dir: str | Path = ".") -> ModelSpec:
    """Validate a parsed spec and build a :class:`ModelSpec`; every problem is a :class:`ModelError`."""
    _check_keys(data)
    classes = _classes(data["classes"])
    preprocessing = _preprocessing(data.get("preprocessing", {}) or {})
    weights_format = _one_of(data.get("weights_format", "state_dict"), WEIGHTS_FORMATS, "weights_format")
    blend = _one_of(data.get("blend_mode", "gaussian"), BLEND_MODES, "blend_mode")
    overlap = float(data.get("overlap", 0.25))
    if not 0.0 <= overlap < 1.0:
        raise ModelError(f"Model spec: overlap must be in [0, 1), got {overlap}.")
    in_channels = int(data.get("in_channels", 1))
    if in_channels < 1:
        raise ModelError(f"Model spec: in_channels must be >= 1, got {in_channels}.")
    kwargs = data.get("kwargs", {}) or {}
    if not isinstance(kwargs, dict):
        raise ModelError("Model spec: 'kwargs' must be an object of constructor arguments.")
    return ModelSpec(
        name=str(data["name"]),
        architecture=str(data["architecture"]),
        classes=classes,
        patch_size=_tuple3(data["patch_size"], "patch_size", int),
        in_channels=in_channels,
        kwargs=dict(kwargs),
        preprocessing=preprocessing,
        overlap=overlap,
        blend_mode=blend,
        weights=data.get("weights"),
        weights_format=weights_format,
        base_dir=str(base_dir),
    )


def load_spec(path: str | Path) -> ModelSpec:
    """Read a spec from ``.json``/``.yaml``/``.yml`` (YAML via ``yaml.safe_load``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Model spec '{path}' does not exist or is not a file.")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # any parse failure is a user-facing error
        raise ModelError(f"Model spec '{path}' is not valid {path.suffix.lstrip('.').upper()}: {exc}") from None
    try:
        return spec_from_dict(data, base_dir=path.parent)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # a value of the wrong type that a specific check missed (found by Testing/test_properties.py's fuzz)
        raise ModelError(f"Model spec '{path}' has a value of the wrong type or range ({type(exc).__name__}: "
                         f"{exc}); compare it with the example in the README.") from None
