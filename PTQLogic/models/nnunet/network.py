"""Build the network named in an nnU-Net plans' ``architecture`` section from allow-lists only.

nnU-Net resolves ``network_class_name`` and the ``_kw_requires_import`` kwargs with ``pydoc.locate``;
here both go through fixed tables, so a plans file cannot make this process import anything else.
"""
from __future__ import annotations

import inspect
from typing import Any

from ...core.errors import ModelError

NETWORK_CLASSES = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")  # ResEnc M/L/XL plans use ResidualEncoderUNet
IMPORTABLE = ("Conv3d", "Conv2d", "InstanceNorm3d", "InstanceNorm2d", "BatchNorm3d", "BatchNorm2d", "GroupNorm",
              "LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "Dropout3d", "Dropout2d", "Dropout")


def _network_class(name: str):
    short = name.rsplit(".", 1)[-1]
    if short not in NETWORK_CLASSES or not (name == short or name.startswith("dynamic_network_architectures.")):
        raise ModelError(f"nnU-Net network class {name!r} is not supported; supported are dynamic_network_architectures' "
                         f"{', '.join(NETWORK_CLASSES)} (custom architectures would need their code to be run).")
    from dynamic_network_architectures.architectures import unet

    return getattr(unet, short)


def _importable(key: str, dotted: Any):
    import torch.nn as nn

    if dotted is None:
        return None
    if isinstance(dotted, str):
        short = dotted.rsplit(".", 1)[-1]
        if short in IMPORTABLE and dotted.startswith("torch.nn.") and dotted.count(".") <= 4:
            return getattr(nn, short)
    raise ModelError(f"nnU-Net plans.json: architecture kwarg {key!r} = {dotted!r} is not allowed; allowed are "
                     f"torch.nn.{{{', '.join(IMPORTABLE)}}} or null.")


def validate_architecture(architecture: dict[str, Any]) -> None:
    resolve_architecture(architecture)


def resolve_architecture(architecture: Any) -> tuple[type, dict[str, Any]]:
    """(network class, constructor kwargs with allow-listed classes in place of their dotted names)."""
    if not isinstance(architecture, dict) or "network_class_name" not in architecture:
        raise ModelError("nnU-Net plans.json: the configuration's 'architecture' needs 'network_class_name'.")
    cls = _network_class(str(architecture["network_class_name"]))
    kwargs = architecture.get("arch_kwargs")
    required = architecture.get("_kw_requires_import", [])
    if not isinstance(kwargs, dict) or not isinstance(required, list):
        raise ModelError("nnU-Net plans.json: 'arch_kwargs' must be an object and '_kw_requires_import' a list.")
    kwargs = dict(kwargs)
    for key in required:
        if key not in kwargs:
            raise ModelError(f"nnU-Net plans.json: '_kw_requires_import' names {key!r}, which is not in arch_kwargs.")
        kwargs[key] = _importable(key, kwargs[key])
    for key, value in kwargs.items():  # a dotted name not listed for import would reach the class as a string
        if key not in required and isinstance(value, str):
            raise ModelError(f"nnU-Net plans.json: arch_kwargs {key!r} = {value!r} is a name that is not in "
                             "'_kw_requires_import'.")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelError(f"nnU-Net plans.json: {cls.__name__} does not take {unknown} (installed "
                         "dynamic_network_architectures may be too old or the plans are for another class).")
    return cls, kwargs


def build_network(architecture: dict[str, Any], in_channels: int, num_classes: int):
    """The network as nnU-Net builds it for inference (no deep supervision), in eval mode, random weights."""
    cls, kwargs = resolve_architecture(architecture)
    kwargs["deep_supervision"] = False
    try:
        network = cls(input_channels=in_channels, num_classes=num_classes, **kwargs)
    except Exception as exc:
        raise ModelError(f"Could not build {cls.__name__} from the nnU-Net plans: {type(exc).__name__}: {exc}") from None
    return network.eval()


def load_weights(network, state_dict: dict[str, Any], where: str) -> None:
    """Strict load; a mismatch (e.g. a trainer that changed the architecture) is one clear error."""
    result_keys = set(network.state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(result_keys - given), sorted(given - result_keys)
    if missing or unexpected:
        raise ModelError(f"Weights in '{where}' do not fit the network built from plans.json (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}); the trainer probably changed the architecture in code.")
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(f"Weights in '{where}' do not fit the network built from plans.json: "
                         f"{first[-1] if first else exc}") from None
