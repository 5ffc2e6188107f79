"""3D TransUNet (Chen et al. 2023, "3D TransUNet: Advancing Medical Image Segmentation through Vision
Transformers"), encoder-only configuration, written here because no installable package provides it.

As in the paper's code (built on nnU-Net), a CNN encoder (nnU-Net stages: two 3x3x3 conv + instance norm
+ LeakyReLU, strided downsampling) feeds its bottleneck feature map, as 1x1x1 tokens, to a ViT (pre-norm
LayerNorm, multi-head self-attention, GELU MLP, learned position embeddings sized for the patch); the
tokens are reshaped back and decoded by nnU-Net's transposed-convolution decoder with skip connections.
The paper's Transformer *decoder* variant (learnable organ queries refined by masked cross-attention) is
not implemented; the encoder-only variant is the one that keeps a plain dense-logit output.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    def unit(a: int, b: int, s: int) -> list[nn.Module]:
        return [nn.Conv3d(a, b, 3, stride=s, padding=1), nn.InstanceNorm3d(b, affine=True), nn.LeakyReLU(0.01, inplace=True)]
    return nn.Sequential(*unit(cin, cout, stride), *unit(cout, cout, 1))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ViTLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransUNet3D(nn.Module):
    """``features`` per resolution stage (each after the first halves the resolution); the ViT of
    ``vit_layers`` layers works on the bottleneck with ``hidden_size`` channels."""

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int] = (96, 96, 96),
                 features: Sequence[int] = (32, 64, 128, 256, 320), hidden_size: int = 768,
                 vit_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072) -> None:
        super().__init__()
        factor = 2 ** (len(features) - 1)
        if any(int(s) % factor for s in img_size):
            raise ValueError(f"3D TransUNet with {len(features)} stages needs patch sizes divisible by {factor}, "
                             f"got {tuple(img_size)}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.grid = tuple(int(s) // factor for s in img_size)
        self.encoder = nn.ModuleList(_conv_block(cin, cout, 1 if i == 0 else 2)
                                     for i, (cin, cout) in enumerate(zip((in_channels, *features[:-1]), features)))
        self.embed = nn.Conv3d(features[-1], hidden_size, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.vit = nn.Sequential(*[ViTLayer(hidden_size, num_heads, mlp_dim) for _ in range(vit_layers)])
        self.vit_norm = nn.LayerNorm(hidden_size)
        self.unembed = nn.Conv3d(hidden_size, features[-1], kernel_size=1)
        self.upsample = nn.ModuleList(nn.ConvTranspose3d(features[i + 1], features[i], 2, stride=2)
                                      for i in reversed(range(len(features) - 1)))
        self.decoder = nn.ModuleList(_conv_block(2 * features[i], features[i]) for i in reversed(range(len(features) - 1)))
        self.head = nn.Conv3d(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        b, c = x.shape[0], self.pos_embed.shape[-1]
        tokens = self.embed(skips.pop()).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = self.vit_norm(self.vit(tokens))
        x = self.unembed(tokens.transpose(1, 2).reshape(b, c, *self.grid))
        for up, stage in zip(self.upsample, self.decoder):
            x = stage(torch.cat((up(x), skips.pop()), dim=1))
        return self.head(x)
