"""Build networks from a spec and load trained weights without executing untrusted code.

Architectures come from a fixed table (no dynamic imports from user strings): MONAI networks, nnU-Net's
(``dynamic_network_architectures``) and the ones written in :mod:`PTQLogic.models.networks`; state dicts are read
with ``torch.load(weights_only=True)``; TorchScript archives are loaded with ``torch.jit.load``.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any

from ..core.errors import ModelError
from ..core.spec import ModelSpec

_ARCHITECTURE_PATHS = {
    "UNet": "monai.networks.nets:UNet",
    "BasicUNet": "monai.networks.nets:BasicUNet",
    "SegResNet": "monai.networks.nets:SegResNet",
    "SwinUNETR": "monai.networks.nets:SwinUNETR",
    "UNETR": "monai.networks.nets:UNETR",
    "DynUNet": "monai.networks.nets:DynUNet",
    "PlainConvUNet": "PTQLogic.models.networks.nnunet:plain_conv_unet",
    "ResidualEncoderUNet": "PTQLogic.models.networks.nnunet:residual_encoder_unet",
    "STUNet": "PTQLogic.models.networks.stunet:STUNet",
    "UNesT": "PTQLogic.models.networks.unest:UNesT",
    "TransUNet3D": "PTQLogic.models.networks.transunet:TransUNet3D",
    "VISTA3DAuto": "PTQLogic.models.networks.vista3d:VISTA3DAuto",
}


class _LazyClassTable(Mapping):
    """Read-only name -> class (or factory) mapping that imports a module only when a name is looked up."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = dict(paths)

    def __getitem__(self, name: str) -> type:
        module_name, class_name = self._paths[name].split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


ARCHITECTURES: Mapping[str, type] = _LazyClassTable(_ARCHITECTURE_PATHS)
CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model", "network_weights", "model_state_dict")
_LIST_LIMIT = 5


def architecture_class(name: str) -> type:
    if name not in ARCHITECTURES:
        raise ModelError(f"Unknown architecture '{name}'; known networks are {sorted(ARCHITECTURES)} "
                         "(or give weights_format 'torchscript' or 'onnx').")
    return ARCHITECTURES[name]


def build_network(spec: ModelSpec):
    """Instantiate ``spec.architecture`` from ``spec.kwargs`` (channels and 3D filled in from the spec)."""
    cls = architecture_class(spec.architecture)
    kwargs: dict[str, Any] = dict(spec.kwargs)
    parameters = inspect.signature(cls).parameters  # a class's __init__ (without self) or a factory's
    defaults = {"spatial_dims": 3, "in_channels": spec.in_channels, "out_channels": spec.num_classes}
    if "img_size" in parameters:  # UNETR's positional embedding is sized for the patch
        defaults["img_size"] = list(spec.patch_size)
    for key, value in defaults.items():
        if key in parameters:
            kwargs.setdefault(key, value)
    if kwargs.get("spatial_dims", 3) != 3:
        raise ModelError(f"{spec.architecture}: spatial_dims must be 3 for volumes, got {kwargs['spatial_dims']}.")
    if kwargs.get("in_channels", spec.in_channels) != spec.in_channels:
        raise ModelError(f"{spec.architecture}: kwargs in_channels={kwargs['in_channels']} but the spec says "
                         f"in_channels={spec.in_channels}; make them equal.")
    if kwargs.get("out_channels", spec.num_classes) != spec.num_classes:
        raise ModelError(f"{spec.architecture}: kwargs out_channels={kwargs['out_channels']} but the spec lists "
                         f"{spec.num_classes} classes (background included); make them equal.")
    try:
        with warnings.catch_warnings():  # dynamic_network_architectures warns about unused kwargs
            warnings.simplefilter("ignore", UserWarning)
            return cls(**kwargs)
    except TypeError as exc:
        unknown = sorted(set(kwargs) - set(parameters))
        detail = f"unknown argument(s) {unknown}" if unknown else str(exc)
        raise ModelError(f"Cannot build {spec.architecture}: {detail}. Accepted arguments: "
                         f"{[p for p in parameters if p != 'self']}.") from None
    except ImportError as exc:  # MONAI's OptionalImportError, e.g. einops for UNETR/SwinUNETR
        first_line = str(exc).strip().splitlines()[0]
        raise ModelError(f"{spec.architecture} needs an optional package that is not installed: {first_line}") from None
    except (ValueError, AssertionError, RuntimeError, KeyError, IndexError) as exc:
        raise ModelError(f"Cannot build {spec.architecture} with {kwargs}: {type(exc).__name__}: {exc}") from None


def _short_list(keys: list[str]) -> str:
    more = f" (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return f"{len(keys)}: {keys[:_LIST_LIMIT]}{more}"


def _unwrap_state_dict(obj: Any, path: Path) -> dict:
    import torch

    if isinstance(obj, dict):
        for key in CHECKPOINT_WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"'{path}' is not a state dict (a mapping of parameter names to tensors, possibly "
                         f"under one of {list(CHECKPOINT_WRAPPER_KEYS)}).")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel/DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_state_dict(network, state: dict, path: Path, architecture: str) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"Weights '{path}' do not fit {architecture} with the spec's kwargs: missing keys "
                         f"{_short_list(missing)}; unexpected keys {_short_list(unexpected)}.")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(f"Weights '{path}': tensor '{key}' has shape {tuple(tensor.shape)} but {architecture} "
                             f"with the spec's kwargs needs {tuple(expected[key].shape)}; check the kwargs.")
    network.load_state_dict(state, strict=True)


def load_torch_model(spec: ModelSpec):
    """The spec's network with its weights, on CPU, in eval mode. Never writes to the user's files."""
    import torch

    is_onnx = spec.weights_format == "onnx" or spec.architecture == "onnx"
    is_torchscript = spec.weights_format == "torchscript" or spec.architecture == "torchscript"
    if is_onnx:
        raise ModelError(f"Spec '{spec.name}' gives an ONNX model: no PyTorch model is available for it "
                         "(the ONNX file is used directly).")
    path = spec.weights_path()
    if path is None:
        raise ModelError(f"Spec '{spec.name}' names no weights file ('weights').")
    path = path.resolve()
    if not path.is_file():
        raise ModelError(f"Weights file '{path}' does not exist.")
    if is_torchscript:
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, still the way to read archives
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelError(f"'{path}' is not a loadable TorchScript archive: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
        return model.eval()
    network = build_network(spec)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"'{path}' could not be read as a PyTorch checkpoint with weights_only=True "
                         f"(it is corrupt, or holds objects other than tensors): {first}") from None
    _load_state_dict(network, _unwrap_state_dict(obj, path), path, spec.architecture)
    return network.eval()
