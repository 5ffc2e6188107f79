"""nnU-Net's networks (``dynamic_network_architectures``, installed with nnunetv2) built from JSON kwargs.

nnU-Net's plans name the layer types as dotted paths (``torch.nn.modules.conv.Conv3d``); a spec is
JSON too, so the types are looked up in a fixed allow-list here instead of being imported by name.
Parameter names equal nnU-Net's, so a ``checkpoint_final.pth`` ``network_weights`` dict loads as is.
Deep supervision is off: inference uses the full-resolution output only.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

_LAYERS: dict[str, type[nn.Module]] = {
    "Conv3d": nn.Conv3d,
    "InstanceNorm3d": nn.InstanceNorm3d,
    "BatchNorm3d": nn.BatchNorm3d,
    "LeakyReLU": nn.LeakyReLU,
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
}


def layer_type(name: str | None) -> type[nn.Module] | None:
    """Allow-listed layer class for ``name`` (short or dotted, as nnU-Net plans write it)."""
    if name is None:
        return None
    short = name.rsplit(".", 1)[-1]
    if short not in _LAYERS:
        raise ValueError(f"layer type {name!r} is not allowed; use one of {sorted(_LAYERS)}")
    return _LAYERS[short]


def _common(conv_op: str, norm_op: str | None, norm_op_kwargs: dict | None, nonlin: str | None,
            nonlin_kwargs: dict | None) -> dict[str, Any]:
    if layer_type(conv_op) is not nn.Conv3d:
        raise ValueError(f"conv_op must be Conv3d for volumes, got {conv_op!r}")
    return dict(conv_op=nn.Conv3d, norm_op=layer_type(norm_op),
                norm_op_kwargs=dict(norm_op_kwargs if norm_op_kwargs is not None else {"eps": 1e-5, "affine": True}),
                nonlin=layer_type(nonlin), nonlin_kwargs=dict(nonlin_kwargs if nonlin_kwargs is not None else {"inplace": True}),
                dropout_op=None, deep_supervision=False)


def _plain_conv_unet_base():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet


def _residual_encoder_unet_base():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    return ResidualEncoderUNet


def plain_conv_unet(in_channels: int, out_channels: int, features_per_stage: Sequence[int],
                      kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                      n_conv_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                      conv_bias: bool = True, conv_op: str = "Conv3d", norm_op: str | None = "InstanceNorm3d",
                      norm_op_kwargs: dict | None = None, nonlin: str | None = "LeakyReLU",
                      nonlin_kwargs: dict | None = None, n_stages: int | None = None) -> nn.Module:
    """nnU-Net's default 3d_fullres network (``PlainConvUNet``)."""
    return _plain_conv_unet_base()(
        input_channels=in_channels, num_classes=out_channels, n_stages=n_stages or len(features_per_stage),
        features_per_stage=list(features_per_stage), kernel_sizes=[list(k) for k in kernel_sizes],
        strides=[list(s) for s in strides], n_conv_per_stage=list(n_conv_per_stage),
        n_conv_per_stage_decoder=list(n_conv_per_stage_decoder), conv_bias=conv_bias,
        **_common(conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs))


def residual_encoder_unet(in_channels: int, out_channels: int, features_per_stage: Sequence[int],
                          kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                          n_blocks_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                          conv_bias: bool = True, conv_op: str = "Conv3d", norm_op: str | None = "InstanceNorm3d",
                          norm_op_kwargs: dict | None = None, nonlin: str | None = "LeakyReLU",
                          nonlin_kwargs: dict | None = None, n_stages: int | None = None) -> nn.Module:
    """nnU-Net ResEnc presets (M/L/XL differ only in widths and blocks per stage)."""
    return _residual_encoder_unet_base()(
        input_channels=in_channels, num_classes=out_channels, n_stages=n_stages or len(features_per_stage),
        features_per_stage=list(features_per_stage), kernel_sizes=[list(k) for k in kernel_sizes],
        strides=[list(s) for s in strides], n_blocks_per_stage=list(n_blocks_per_stage),
        n_conv_per_stage_decoder=list(n_conv_per_stage_decoder), conv_bias=conv_bias,
        **_common(conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs))
