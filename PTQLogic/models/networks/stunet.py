"""STU-Net (Huang et al. 2023, "STU-Net: Scalable and Transferable Medical Image Segmentation Models
Empowered by Large-Scale Supervised Pre-training"), following the official code (uni-medical/STU-Net,
``nnunet/network_architecture/STUNet.py``): residual blocks with instance norm and LeakyReLU, six
resolution stages, nearest-neighbour upsampling followed by a 1x1 convolution, concatenated skips.

No installable package provides STU-Net, so it is written here. Module and parameter names match the
official code, so official checkpoints load with ``strict=True``. Only the full-resolution output is
returned (deep-supervision heads are kept for checkpoint compatibility but not run).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# The paper's four sizes (depth per stage, channels per stage), from STUNetTrainer_{small,base,large,huge}.
STUNET_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "S": ((1, 1, 1, 1, 1, 1), (16, 32, 64, 128, 256, 256)),
    "B": ((1, 1, 1, 1, 1, 1), (32, 64, 128, 256, 512, 512)),
    "L": ((2, 2, 2, 2, 2, 2), (64, 128, 256, 512, 1024, 1024)),
    "H": ((3, 3, 3, 3, 3, 3), (96, 192, 384, 768, 1536, 1536)),
}
PUBLISHED_PARAMETERS = {"S": 14e6, "B": 58e6, "L": 440e6, "H": 1.4e9}
DEFAULT_POOL = ((2, 2, 2),) * 5


class BasicResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] | int = 1,
                 use_1x1conv: bool = False) -> None:
        super().__init__()
        padding = [k // 2 for k in kernel]
        self.conv1 = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(cout, cout, kernel, padding=padding)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.act2 = nn.LeakyReLU(inplace=True)
        self.conv3 = nn.Conv3d(cin, cout, kernel_size=1, stride=stride) if use_1x1conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


class UpsampleLayer(nn.Module):
    def __init__(self, cin: int, cout: int, scale: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _stage(cin: int, cout: int, depth: int, kernel: Sequence[int], stride: Sequence[int] | int = 1) -> nn.Sequential:
    return nn.Sequential(BasicResBlock(cin, cout, kernel, stride, use_1x1conv=True),
                         *[BasicResBlock(cout, cout, kernel) for _ in range(depth - 1)])


class STUNet(nn.Module):
    """STU-Net; ``size`` picks the paper's S/B/L/H configuration, or give ``depth`` and ``dims``."""

    def __init__(self, in_channels: int, out_channels: int, size: str | None = "S",
                 depth: Sequence[int] | None = None, dims: Sequence[int] | None = None,
                 pool_op_kernel_sizes: Sequence[Sequence[int]] = DEFAULT_POOL,
                 conv_kernel_sizes: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        if depth is None or dims is None:
            if size not in STUNET_SIZES:
                raise ValueError(f"size must be one of {sorted(STUNET_SIZES)} (or give depth and dims), got {size!r}")
            depth, dims = depth or STUNET_SIZES[size][0], dims or STUNET_SIZES[size][1]
        num_pool = len(pool_op_kernel_sizes)
        if not len(depth) == len(dims) == num_pool + 1:
            raise ValueError(f"depth ({len(depth)}) and dims ({len(dims)}) need one entry per stage "
                             f"({num_pool + 1} = pooling steps + 1)")
        kernels = conv_kernel_sizes or [(3, 3, 3)] * (num_pool + 1)
        self.conv_blocks_context = nn.ModuleList([_stage(in_channels, dims[0], depth[0], kernels[0])])
        for d in range(1, num_pool + 1):
            self.conv_blocks_context.append(_stage(dims[d - 1], dims[d], depth[d], kernels[d], pool_op_kernel_sizes[d - 1]))
        self.upsample_layers = nn.ModuleList(
            UpsampleLayer(dims[-1 - u], dims[-2 - u], pool_op_kernel_sizes[-1 - u]) for u in range(num_pool))
        self.conv_blocks_localization = nn.ModuleList(
            _stage(dims[-2 - u] * 2, dims[-2 - u], depth[-2 - u], kernels[-2 - u]) for u in range(num_pool))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], out_channels, kernel_size=1) for u in range(num_pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        for u, (up, stage) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization)):
            x = stage(torch.cat((up(x), skips[-(u + 1)]), dim=1))
        return self.seg_outputs[-1](x)
