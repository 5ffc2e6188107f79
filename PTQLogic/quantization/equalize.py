"""Channel equalization of nnU-Net's PlainConvUNet before quantization (``quantize --equalize``), exact in FP32.

INT8 gives each convolution input one scale for all its channels. Channels whose values span a small range then
keep few of the 256 levels, and the channels that feed a convolution differ: a block's InstanceNorm scales each
channel by its own weight, and in the decoder a transposed convolution's output is concatenated with the encoder's
skip. Both are linear up to the next convolution, and LeakyReLU commutes with a positive scale, so channel ``c`` of
such a tensor can be divided by ``s_c`` (the norm's weight and bias, or the transposed convolution's weight and bias)
and its consumers' input weights multiplied by ``s_c``: the network computes the same function. With
``s_c = a_c**alpha / w_c**(1 - alpha)`` (``a_c``: the channel's largest magnitude on calibration windows, ``w_c``:
the largest weight its consumers give it; SmoothQuant's rule), activation and weight ranges are balanced per
channel. On the whole-CT benchmark's trained organ part this raised INT8's agreement with FP32 from 0.9716 to
0.9891 (``benchmarks/results/epyc-2core-avx512/whole_ct/organs_mixed_equalized_int8.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..core.errors import InputError

DEFAULT_ALPHA = 0.5
_HOMOGENEOUS = (torch.nn.LeakyReLU, torch.nn.ReLU)  # f(s x) = s f(x) for s > 0
_NORMS = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.BatchNorm1d,
          torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


@dataclass
class _Group:
    """One equalized tensor: what scales it (a block's norm, or a transposed convolution) and its consumers
    (weight, the weight's input-channel axis, the tensor's first channel in that input)."""

    name: str
    producer: torch.nn.Module
    kind: str  # "norm" (conv -> norm -> nonlin block) or "transposed" (ConvTranspose)
    consumers: list[tuple[torch.Tensor, int, int]] = field(default_factory=list)


@dataclass
class EqualizeReport:
    alpha: float
    groups: int
    windows: int
    max_fp32_change: float  # largest change of the network's output on the first window (float rounding only)
    spread_before: float  # median over groups of max/median channel range of the equalized tensors
    spread_after: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _blocks(stacked) -> list:
    return list(stacked.convs)


def _check_block(block, where: str) -> None:
    norm, nonlin = getattr(block, "norm", None), getattr(block, "nonlin", None)
    order = list(getattr(block, "all_modules", []))
    last = bool(order) and order[-1] is nonlin  # conv -> (dropout) -> norm -> nonlin, not nonlin_first
    if not isinstance(norm, _NORMS) or not getattr(norm, "affine", False) or not isinstance(nonlin, _HOMOGENEOUS) \
            or not last:
        raise InputError(f"--equalize needs conv -> affine norm -> (Leaky)ReLU blocks; {where} has "
                         f"{type(norm).__name__} and {type(nonlin).__name__}. Leave --equalize out for this network.")
    if getattr(getattr(block, "dropout", None), "p", 0):  # nn.Dropout with p > 0 (None or Identity: none)
        raise InputError(f"--equalize: {where} has dropout in the block; leave --equalize out.")


def _chain(where: str, name: str, blocks: list, outputs: list[tuple[torch.Tensor, int, int]]) -> list[_Group]:
    """A stage's blocks: each feeds the next block's convolution, the last one ``outputs``."""
    groups = []
    for j, block in enumerate(blocks):
        _check_block(block, f"{where} block {j}")
        consumers = [(blocks[j + 1].conv.weight, 1, 0)] if j + 1 < len(blocks) else list(outputs)
        groups.append(_Group(f"{name}.{j}", block, "norm", consumers))
    return groups


def plain_unet_groups(network: torch.nn.Module) -> list[_Group]:
    """The equalizable tensors of a ``dynamic_network_architectures`` PlainConvUNet; refuses other networks."""
    encoder, decoder = getattr(network, "encoder", None), getattr(network, "decoder", None)
    if type(network).__name__ != "PlainConvUNet" or encoder is None or decoder is None:
        raise InputError(f"--equalize supports nnU-Net's PlainConvUNet (conv -> norm -> LeakyReLU blocks, no residual "
                         f"additions); this network is a {type(network).__name__}. Leave --equalize out.")
    # an encoder stage is its StackedConvBlocks, after a pooling layer where the plans pool (max pooling commutes
    # with a positive scale per channel too)
    stages = [_blocks(next(m for m in ([stage] if hasattr(stage, "convs") else stage) if hasattr(m, "convs")))
              for stage in encoder.stages]
    up = [_blocks(stage) for stage in decoder.stages]
    transposed, heads = list(decoder.transpconvs), list(decoder.seg_layers)
    groups: list[_Group] = []
    for i, blocks in enumerate(stages):
        if i + 1 < len(stages):  # a stage's output: the next stage, and the decoder after its upsampling
            level = len(stages) - 2 - i
            outputs = [(stages[i + 1][0].conv.weight, 1, 0),
                       (up[level][0].conv.weight, 1, transposed[level].weight.shape[1])]
        else:  # the bottleneck: the first transposed convolution
            outputs = [(transposed[0].weight, 0, 0)]
        groups += _chain(f"encoder stage {i}", f"encoder.{i}", blocks, outputs)
    for level, blocks in enumerate(up):
        outputs = [(heads[level].weight, 1, 0)]
        outputs += [(transposed[level + 1].weight, 0, 0)] if level + 1 < len(transposed) else []
        groups += _chain(f"decoder stage {level}", f"decoder.{level}", blocks, outputs)
    for level, conv in enumerate(transposed):
        groups.append(_Group(f"transposed.{level}", conv, "transposed", [(up[level][0].conv.weight, 1, 0)]))
    return groups


def _channel_ranges(network: torch.nn.Module, groups: Sequence[_Group], windows: Sequence[torch.Tensor],
                    progress: Callable[[int, int], None]) -> tuple[list, torch.Tensor]:
    """Each group's largest magnitude per channel over ``windows``, and the network's output on the first."""
    ranges: list[torch.Tensor | None] = [None] * len(groups)
    first = None
    hooks = []
    for index, group in enumerate(groups):
        target = group.producer.nonlin if group.kind == "norm" else group.producer

        def record(_module, _inputs, output, index=index):
            found = output.detach().abs().amax(dim=[d for d in range(output.ndim) if d != 1]).double()
            ranges[index] = found if ranges[index] is None else torch.maximum(ranges[index], found)
        hooks.append(target.register_forward_hook(record))
    try:
        with torch.inference_mode():
            for done, window in enumerate(windows, 1):
                output = network(window)
                first = output if first is None else first
                progress(done, len(windows))
    finally:
        for hook in hooks:
            hook.remove()
    return ranges, first


def equalize_plain_unet(network: torch.nn.Module, windows: Sequence[torch.Tensor], alpha: float = DEFAULT_ALPHA,
                        progress: Callable[[int, int], None] | None = None) -> EqualizeReport:
    """Equalize ``network`` (a PlainConvUNet, changed in place, in eval mode) on calibration ``windows``
    (``(1, C, *patch)`` float tensors after nnU-Net's preprocessing); ``progress(done, total)`` after each window
    (it may raise to cancel: the network is changed only after the last window)."""
    if not 0 < alpha < 1:
        raise InputError(f"The equalization strength must be in (0, 1), got {alpha:g}.")
    if not windows:
        raise InputError("--equalize needs calibration windows.")
    groups = plain_unet_groups(network)
    network.eval()
    ranges, before = _channel_ranges(network, groups, windows, progress or (lambda done, total: None))
    spreads = []
    with torch.no_grad():
        for group, activation in zip(groups, ranges):
            channels = activation.numel()
            weights = torch.zeros(channels, dtype=torch.float64)
            for weight, axis, first in group.consumers:
                moved = weight.detach().abs().double().movedim(axis, 0)[first:first + channels]
                weights = torch.maximum(weights, moved.reshape(channels, -1).amax(1))
            scale = activation.clamp_min(1e-8) ** alpha / weights.clamp_min(1e-8) ** (1 - alpha)
            dead = (activation < 1e-8) | (weights < 1e-8)
            scale = torch.where(dead, torch.ones_like(scale), scale).clamp(1e-3, 1e3)
            spreads.append((_spread(activation), _spread(activation / scale)))
            factor = scale.float()
            if group.kind == "norm":
                group.producer.norm.weight.div_(factor)
                group.producer.norm.bias.div_(factor)
            else:  # ConvTranspose weight: (in, out / groups, *kernel)
                group.producer.weight.div_(factor.view(1, channels, *[1] * (group.producer.weight.ndim - 2)))
                if group.producer.bias is not None:
                    group.producer.bias.div_(factor)
            for weight, axis, first in group.consumers:
                shape = [1] * weight.ndim
                shape[axis] = channels
                index = [slice(None)] * weight.ndim
                index[axis] = slice(first, first + channels)
                weight[tuple(index)] *= factor.view(shape)
    with torch.inference_mode():
        change = float((network(windows[0]) - before).abs().max())
    return EqualizeReport(alpha=alpha, groups=len(groups), windows=len(windows), max_fp32_change=change,
                          spread_before=_median([b for b, _ in spreads]), spread_after=_median([a for _, a in spreads]))


def _spread(ranges: torch.Tensor) -> float:
    live = ranges[ranges > 1e-8]
    return float(live.max() / live.median()) if live.numel() else 1.0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 1.0
