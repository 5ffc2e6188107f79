"""Map a MONAI bundle's preprocessing, inferer and postprocessing onto the project's spec fields.

Only the allow-listed transforms below are understood; each is read as data (its ``_target_`` name
and arguments), never imported from the config. Geometry becomes ``Preprocessing.orientation`` and
``spacing``; intensity becomes the ``"ct"`` mode where it is exactly equivalent,
otherwise ``Preprocessing.steps`` (MONAI's own intensity transforms, applied in order).
"""
from __future__ import annotations

from typing import Any

from ...core.errors import ModelError
from ...core.spec import INTENSITY_STEPS, Preprocessing
from .bundle_config import BundleConfig, key_name

# Arguments that only route dictionary keys or pick dtypes/lazy mode: accepted on every transform.
_ROUTING = {"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "dtype", "lazy", "image_only",
            "overwriting"}
# Read but do nothing here: loading, typing and channel handling are done by PTQLogic itself.
_PRE_NO_OPS = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "CastToType", "Identity",
               "CopyItems", "DeleteItems", "SelectItems", "ToDevice", "ToNumpy", "FromMetaTensor", "ToMetaTensor"}
_POST_NO_OPS = {"Invert", "SaveImage", "EnsureType", "ToTensor", "CastToType", "Identity", "CopyItems", "DeleteItems",
                "SelectItems", "ToDevice", "ToNumpy", "FromMetaTensor"}
_POST_NOT_APPLIED = {"KeepLargestConnectedComponent", "FillHoles", "RemoveSmallObjects"}
# Geometry arguments we reproduce only at MONAI's defaults.
_SPACING_DEFAULTS = {"padding_mode": "border", "align_corners": False, "diagonal": False, "scale_extent": False,
                     "recompute_affine": False, "min_pixdim": None, "max_pixdim": None}
_INFERER_RUNTIME_ONLY = {"device", "sw_device", "progress", "cache_roi_weight_map", "cpu_thresh", "buffer_steps",
                         "buffer_dim"}
_INFERERS = {"SlidingWindowInferer", "SlidingWindowInfererAdapt"}


def target_name(item: Any, path: tuple, prefix: str) -> str:
    """'Spacingd', 'monai.transforms.Spacingd' -> 'Spacingd'; anything outside MONAI's ``prefix`` is refused."""
    target = item.get("_target_") if isinstance(item, dict) else None
    if not isinstance(target, str):
        raise ModelError(f"Bundle config key '{key_name(path)}' must be a component with a '_target_' name, "
                         f"got {item!r:.120}.")
    if "." in target and not target.startswith(prefix + "."):
        raise ModelError(f"Bundle config key '{key_name(path)}#_target_' is '{target}', outside the allow-list of "
                         f"{prefix} classes this tool reads; it is never imported.")
    return target.rsplit(".", 1)[-1]


def _base(name: str, known: set[str]) -> str:
    """Dictionary transforms end in 'd' ('Spacingd'): both forms map to the array name."""
    return name[:-1] if name.endswith("d") and name[:-1] in known else name


def _check_args(item: dict, allowed: set[str], path: tuple, name: str) -> None:
    extra = sorted(k for k in item if k != "_target_" and k not in allowed | _ROUTING)
    if extra:
        raise ModelError(f"Bundle config key '{key_name(path)}' ({name}) has argument(s) {extra} that this tool "
                         f"cannot reproduce; understood: {sorted(allowed)}.")


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _compose_items(config: BundleConfig, id_: str, what: str) -> list[tuple[tuple, dict]]:
    """The (key, raw component) of each transform of a Compose/list, after ``@`` references; args unresolved."""
    value, path = config.node(config.data[id_], (id_,))
    if isinstance(value, dict):
        if _resolved_target(config, value, path, "monai.transforms") != "Compose":
            raise ModelError(f"Bundle config key '{key_name(path)}' ({what}) must be a Compose of transforms or a "
                             f"list, got '{value['_target_']}'.")
        value, path = config.node(value.get("transforms", []), path + ("transforms",))
    if isinstance(value, str) and value.startswith("$"):  # e.g. "$@a + @b": resolved as data
        value = config.resolve(value, path)
    if not isinstance(value, list):
        raise ModelError(f"Bundle config key '{key_name(path)}' ({what}) must list transforms.")
    items = []
    for i, raw in enumerate(value):
        item, item_path = config.node(raw, path + (str(i),))
        if item is not None:
            if not isinstance(item, dict):
                raise ModelError(f"Bundle config key '{key_name(item_path)}' must be a transform with a '_target_'.")
            items.append((item_path, item))
    return items


def _resolved_target(config: BundleConfig, item: dict, path: tuple, prefix: str) -> str:
    target = config.resolve(item.get("_target_"), path + ("_target_",))
    return target_name({"_target_": target}, path, prefix)


def _args(config: BundleConfig, item: dict, path: tuple, skip: set[str] = frozenset()) -> dict[str, Any]:
    """Resolve the arguments this tool reads (never routing keys or runtime-only ones)."""
    return {k: config.resolve(v, path + (k,)) for k, v in item.items()
            if k not in _ROUTING and k not in skip and not (k.startswith("_") and k.endswith("_"))}


def map_preprocessing(config: BundleConfig, id_: str = "preprocessing") -> tuple[Preprocessing, list]:
    known = _PRE_NO_OPS | {"Orientation", "Spacing", "CropForeground", *INTENSITY_STEPS}
    orientation, spacing, steps, notes, geometry_after_intensity = None, None, [], [], False
    for item_path, raw in _compose_items(config, id_, "preprocessing"):
        name = _resolved_target(config, raw, item_path, "monai.transforms")
        base = _base(name, known)
        if base not in known:
            raise ModelError(f"Bundle config key '{key_name(item_path)}#_target_' is '{name}', not in the allow-list of "
                             f"preprocessing transforms {sorted(known)}; it is never imported.")
        if base in _PRE_NO_OPS:
            continue
        item = _args(config, raw, item_path)
        if base == "Orientation":
            _check_args(item, {"axcodes", "labels", "as_closest_canonical"}, item_path, name)
            if item.get("as_closest_canonical") or item.get("labels") not in (None, [["L", "R"], ["P", "A"], ["I", "S"]]):
                raise ModelError(f"Bundle config key '{key_name(item_path)}' ({name}): only 'axcodes' is supported.")
            orientation = str(item.get("axcodes", "RAS"))
            geometry_after_intensity |= bool(steps)
        elif base == "Spacing":
            _check_args(item, {"pixdim", "mode", *_SPACING_DEFAULTS}, item_path, name)
            for arg, default in _SPACING_DEFAULTS.items():
                if arg in item and _first(item[arg]) != default:
                    raise ModelError(f"Bundle config key '{key_name(item_path + (arg,))}' is {item[arg]!r}; this tool "
                                     f"resamples with MONAI's default {arg}={default!r} only.")
            if str(_first(item.get("mode", "bilinear"))) != "bilinear":
                raise ModelError(f"Bundle config key '{key_name(item_path + ('mode',))}' is {item['mode']!r}; images "
                                 "are resampled with 'bilinear' only.")
            pixdim = item.get("pixdim")
            pixdim = [pixdim] * 3 if isinstance(pixdim, (int, float)) else pixdim
            if not isinstance(pixdim, list) or len(pixdim) != 3 or not all(
                    isinstance(v, (int, float)) and v > 0 for v in pixdim):
                raise ModelError(f"Bundle config key '{key_name(item_path + ('pixdim',))}' must be 3 positive numbers, "
                                 f"got {pixdim!r}.")
            spacing = tuple(float(v) for v in pixdim)
            geometry_after_intensity |= bool(steps)
        elif base == "CropForeground":
            notes.append(f"{name} is not applied: the whole volume is segmented")
        else:  # an intensity transform
            allowed = set(INTENSITY_STEPS[base])
            _check_args(item, allowed, item_path, name)
            steps.append({"transform": base, **{k: v for k, v in item.items() if k in allowed}})
    if geometry_after_intensity:
        notes.append("intensity transforms run after resampling here")
    prep = Preprocessing(orientation=orientation, spacing=spacing, intensity="none")
    if len(steps) == 1:
        prep = _as_mode(prep, steps[0]) or _with_steps(prep, steps)
    elif steps:
        prep = _with_steps(prep, steps)
    return prep, notes


def _with_steps(prep: Preprocessing, steps: list[dict]) -> Preprocessing:
    from dataclasses import replace

    from ...core.spec import intensity_steps

    return replace(prep, steps=intensity_steps(steps))


def _as_mode(prep: Preprocessing, step: dict) -> Preprocessing | None:
    """The project's 'ct' mode where it computes what the one MONAI transform does (clip, then scale to [0, 1]).

    NormalizeIntensity stays a MONAI step: the 'zscore' mode takes its statistics in float64, MONAI in
    float32, and bundles should give MONAI's labels.
    """
    from dataclasses import replace

    if (step["transform"] == "ScaleIntensityRange" and step.get("clip") is True
            and step.get("b_min", 0.0) == 0.0 and step.get("b_max", 1.0) == 1.0
            and isinstance(step.get("a_min"), (int, float)) and isinstance(step.get("a_max"), (int, float))
            and step["a_min"] < step["a_max"]):
        return replace(prep, intensity="ct", ct_window=(float(step["a_min"]), float(step["a_max"])))
    return None


def map_inferer(config: BundleConfig, id_: str = "inferer") -> tuple[tuple[int, int, int], float, str, dict, list]:
    raw, path = config.node(config.data[id_], (id_,))
    if not isinstance(raw, dict):
        raise ModelError(f"Bundle config key '{key_name(path)}' must be an inferer component with a '_target_'.")
    name = _resolved_target(config, raw, path, "monai.inferers")
    item = _args(config, raw, path, skip=_INFERER_RUNTIME_ONLY)
    if name not in _INFERERS:
        raise ModelError(f"Bundle config key '{key_name(path)}#_target_' is '{name}'; this tool runs a sliding window "
                         f"and reads only {sorted(_INFERERS)}.")
    _check_args(item, {"roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval",
                       *_INFERER_RUNTIME_ONLY}, path, name)
    roi = item.get("roi_size")
    roi = [roi] * 3 if isinstance(roi, int) else roi
    if not isinstance(roi, list) or len(roi) != 3 or not all(isinstance(v, int) and v > 0 for v in roi):
        raise ModelError(f"Bundle config key '{key_name(path + ('roi_size',))}' must be 3 positive integers, got {roi!r}.")
    overlap = item.get("overlap", 0.25)
    overlaps = set(overlap) if isinstance(overlap, list) else {overlap}
    if len(overlaps) != 1 or not all(isinstance(v, (int, float)) and 0 <= v < 1 for v in overlaps):
        raise ModelError(f"Bundle config key '{key_name(path + ('overlap',))}' must be one number in [0, 1), "
                         f"got {overlap!r}.")
    mode = str(item.get("mode", "constant"))
    if mode not in ("constant", "gaussian"):
        raise ModelError(f"Bundle config key '{key_name(path + ('mode',))}' is '{mode}'; use 'constant' or 'gaussian'.")
    if item.get("sigma_scale", 0.125) != 0.125 or item.get("cval", 0) != 0:
        raise ModelError(f"Bundle config key '{key_name(path)}': sigma_scale and cval are reproduced at MONAI's "
                         "defaults (0.125, 0) only.")
    notes = []
    padding = str(item.get("padding_mode", "constant"))
    if padding != "constant":
        notes.append(f"inferer padding_mode '{padding}' is replaced by zero padding (differs only where the image "
                     "is smaller than the patch)")
    details = {"sw_batch_size": item.get("sw_batch_size", 1), "padding_mode": padding}
    return tuple(roi), float(overlaps.pop()), mode, details, notes


def map_postprocessing(config: BundleConfig, id_: str = "postprocessing") -> tuple[list[str], list[str]]:
    """Names of the bundle's postprocessing steps, and notes; refuses anything but softmax/argmax label maps."""
    known = _POST_NO_OPS | _POST_NOT_APPLIED | {"Activations", "AsDiscrete"}
    names, notes, argmax = [], [], False
    for item_path, raw in _compose_items(config, id_, "postprocessing"):
        name = _resolved_target(config, raw, item_path, "monai.transforms")
        base = _base(name, known)
        if base not in known:
            raise ModelError(f"Bundle config key '{key_name(item_path)}#_target_' is '{name}', not in the allow-list of "
                             f"postprocessing transforms {sorted(known)}; it is never imported.")
        names.append(name)
        item = _args(config, raw, item_path) if base in ("Activations", "AsDiscrete") else {}
        if base == "Activations" and item.get("sigmoid"):
            raise ModelError(f"Bundle config key '{key_name(item_path)}' applies a sigmoid (multi-label output); this "
                             "tool makes one label map by argmax over channels.")
        if base == "AsDiscrete":
            if not item.get("argmax"):
                raise ModelError(f"Bundle config key '{key_name(item_path)}' ({name}) has no 'argmax': true; this tool "
                                 "makes one label map by argmax over channels.")
            argmax = True
        if base in _POST_NOT_APPLIED:
            notes.append(f"{name} is not applied")
    if names and not argmax:
        notes.append("no AsDiscreted(argmax) in postprocessing: labels are the argmax over channels")
    return names, notes
