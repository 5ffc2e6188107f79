"""UNesT (Yu et al. 2023, "UNesT: Local Spatial Representation Learning with Hierarchical Transformer
for Efficient Medical Segmentation"), the network of MONAI's model-zoo bundle
``wholeBrainSeg_Large_UNEST_segmentation`` (``scripts/networks/unest_base_patch_4.py``).

MONAI does not ship UNesT in ``monai.networks.nets`` (1.6), and the bundle keeps it in its own scripts,
which this project never imports; so it is written here following that code: a 3D NesT encoder (patch
embedding, three levels of block-local self-attention with learned position embeddings, conv + LayerNorm
+ max-pool aggregation between levels) and a UNETR-style convolutional decoder from MONAI blocks.
Module names follow the bundle (``nestViT.levels.0.transformer_encoder...``), so its weights fit.
Constraints: cubic patches with an edge that is a multiple of 32 (>= 64), ``patch_size`` 4 and ``embed_dim[2] == 32 * feature_size``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Attention(nn.Module):
    """Self-attention inside each block: x is (B, T blocks, N tokens, C)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, c = x.shape
        qkv = self.qkv(x).reshape(b, t, n, 3, self.num_heads, c // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 3, 4, 1).reshape(b, t, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvPool(nn.Module):
    """NesT block aggregation: 3x3x3 conv, LayerNorm over channels, 3x3x3 max-pool with stride 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=True)
        self.norm = nn.LayerNorm(cout, eps=1e-6)
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x).permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return self.pool(x)


def blockify(x: torch.Tensor, grid: int, block: int) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, grid^3 blocks, block^3 tokens, C)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, grid, block, grid, block, grid, block, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, grid ** 3, block ** 3, c)


def deblockify(x: torch.Tensor, grid: int, block: int) -> torch.Tensor:
    """(B, grid^3, block^3, C) -> (B, D, H, W, C)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, grid, grid, grid, block, block, block, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, grid * block, grid * block, grid * block, c)


class NestLevel(nn.Module):
    def __init__(self, grid: int, block: int, dim: int, prev_dim: int | None, num_heads: int, depth: int) -> None:
        super().__init__()
        self.grid, self.block = grid, block
        self.pos_embed = nn.Parameter(torch.zeros(1, grid ** 3, block ** 3, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2, b=2)
        self.pool = ConvPool(prev_dim, dim) if prev_dim is not None else nn.Identity()
        self.transformer_encoder = nn.Sequential(*[TransformerLayer(dim, num_heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = blockify(self.pool(x).permute(0, 2, 3, 4, 1), self.grid, self.block) + self.pos_embed
        x = deblockify(self.transformer_encoder(x), self.grid, self.block)
        return x.permute(0, 4, 1, 2, 3)


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class NestTransformer3D(nn.Module):
    """Three NesT levels: 64 blocks, then 8, then 1 (each level halves the resolution)."""

    def __init__(self, img_size: int, in_chans: int, patch_size: int, embed_dims: Sequence[int],
                 num_heads: Sequence[int], depths: Sequence[int]) -> None:
        super().__init__()
        block = img_size // patch_size // 4
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dims[0])
        self.levels = nn.ModuleList(
            NestLevel(4 >> i, block, embed_dims[i], embed_dims[i - 1] if i else None, num_heads[i], depths[i])
            for i in range(3))
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        hidden = [x]
        for level in self.levels:
            x = level(x)
            hidden.append(x)
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3), hidden


class UNesTBlock(nn.Module):
    """Decoder step: transposed-conv upsampling, concatenation with the skip, residual conv block."""

    def __init__(self, cin: int, cout: int, norm_name: str | tuple) -> None:
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetResBlock, get_conv_layer

        self.transp_conv = get_conv_layer(3, cin, cout, kernel_size=2, stride=2, conv_only=True, is_transposed=True)
        self.conv_block = UnetResBlock(3, 2 * cout, cout, kernel_size=3, stride=1, norm_name=norm_name)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UNestUpBlock(nn.Module):
    """The patch-embedding skip: one 2x transposed conv, then a 1x1 transposed conv (the bundle's encoder2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        from monai.networks.blocks.dynunet_block import get_conv_layer

        self.transp_conv_init = get_conv_layer(3, cin, cout, kernel_size=2, stride=2, conv_only=True, is_transposed=True)
        self.blocks = nn.ModuleList([get_conv_layer(3, cout, cout, kernel_size=1, stride=1, conv_only=True,
                                                    is_transposed=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for block in self.blocks:
            x = block(x)
        return x


class UNesTConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm_name: str | tuple) -> None:
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetResBlock

        self.layer = UnetResBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UNesT(nn.Module):
    """UNesT; the bundle's configuration is feature_size=16, embed_dim=(128, 256, 512), patch_size=4,
    depths=(2, 2, 8), num_heads=(4, 8, 16) on 96^3 patches."""

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int] = (96, 96, 96),
                 feature_size: int = 16, patch_size: int = 4, depths: Sequence[int] = (2, 2, 8),
                 num_heads: Sequence[int] = (4, 8, 16), embed_dim: Sequence[int] = (128, 256, 512),
                 norm_name: str | tuple = "instance") -> None:
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.blocks.dynunet_block import UnetOutBlock

        edge = int(img_size[0])
        if patch_size != 4:  # the decoder climbs back from the 1/4-resolution patch embedding
            raise ValueError(f"UNesT's decoder needs patch_size 4, got {patch_size}")
        if len(set(int(s) for s in img_size)) != 1 or edge % 32 or edge < 64:
            raise ValueError(f"UNesT needs a cubic patch whose edge is a multiple of 32 and at least 64 "
                             f"(instance norm at the 1/32 bottleneck needs 2^3 voxels), got {tuple(img_size)}")
        if len(embed_dim) != 3 or embed_dim[2] != 32 * feature_size:
            raise ValueError(f"UNesT needs three embed_dim values with embed_dim[2] == 32 * feature_size "
                             f"({32 * feature_size}), got {tuple(embed_dim)}")
        fs = feature_size
        self.nestViT = NestTransformer3D(edge, in_channels, patch_size, embed_dim, num_heads, depths)
        self.encoder1 = UNesTConvBlock(in_channels, 2 * fs, norm_name)
        self.encoder2 = UNestUpBlock(embed_dim[0], 4 * fs)
        self.encoder3 = UNesTConvBlock(embed_dim[0], 8 * fs, norm_name)
        self.encoder4 = UNesTConvBlock(embed_dim[1], 16 * fs, norm_name)
        self.encoder10 = Convolution(spatial_dims=3, in_channels=32 * fs, out_channels=64 * fs, strides=2,
                                     adn_ordering="ADN", dropout=0.0)
        self.decoder5 = UNesTBlock(2 * embed_dim[2], 32 * fs, norm_name)
        self.decoder4 = UNesTBlock(embed_dim[2], 16 * fs, norm_name)
        self.decoder3 = UNesTBlock(16 * fs, 8 * fs, norm_name)
        self.decoder2 = UNesTBlock(8 * fs, 4 * fs, norm_name)
        self.decoder1 = UNesTBlock(4 * fs, 2 * fs, norm_name)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=2 * fs, out_channels=out_channels)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden = self.nestViT(x_in)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec = self.decoder5(self.encoder10(x), hidden[3])
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(self.decoder1(dec, enc0))
