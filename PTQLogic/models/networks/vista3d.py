"""VISTA3D (He et al. 2024) in automatic-segmentation mode, as a plain image -> logits network.

MONAI's ``VISTA3D`` takes prompts (class indices and/or clicks) and returns one sigmoid logit map per
prompted class. For a fixed class list there are no prompts left at run time: this wrapper runs the
image encoder's automatic branch and the class head for ``class_ids`` (VISTA3D's global label indices)
and prepends a constant 0 background channel, so ``argmax`` gives exactly VISTA3D's own rule (a voxel
takes the class with the largest logit if that logit is > 0, i.e. sigmoid > 0.5, else background).
The class is a ``VISTA3D`` (same parameter names, so a VISTA3D checkpoint's state dict loads as is);
the point head is built for that reason but never run or exported.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.segresnet_ds import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM


class VISTA3DAuto(VISTA3D):
    """``encoder_embed_dim=48`` and ``blocks_down=(1, 2, 2, 4, 4)`` are ``vista3d132``'s values."""

    def __init__(self, in_channels: int, out_channels: int, class_ids: Sequence[int] | None = None,
                 encoder_embed_dim: int = 48, blocks_down: Sequence[int] = (1, 2, 2, 4, 4),
                 n_classes: int = 512, last_supported: int = 132) -> None:
        class_ids = list(class_ids) if class_ids is not None else list(range(1, out_channels))
        if len(class_ids) != out_channels - 1:
            raise ValueError(f"VISTA3DAuto has a background channel plus one per class id: {len(class_ids)} "
                             f"class_ids need out_channels={len(class_ids) + 1}, got {out_channels}")
        if not class_ids or not all(isinstance(c, int) and 0 < c < n_classes for c in class_ids):
            raise ValueError(f"class_ids must be VISTA3D label indices in 1..{n_classes - 1}, got {class_ids}")
        encoder = SegResNetDS2(in_channels=in_channels, blocks_down=tuple(blocks_down), norm="instance",
                               out_channels=encoder_embed_dim, init_filters=encoder_embed_dim, dsdepth=1)
        super().__init__(
            image_encoder=encoder,
            class_head=ClassMappingClassify(n_classes=n_classes, feature_size=encoder_embed_dim, use_mlp=True),
            point_head=PointMappingSAM(feature_size=encoder_embed_dim, n_classes=n_classes, last_supported=last_supported),
        )
        self.register_buffer("class_ids", torch.tensor(class_ids, dtype=torch.long)[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _, features = self.image_encoder(x, with_point=False, with_label=True)
        logits, _ = self.class_head(features, self.class_ids)  # (classes, B, D, H, W)
        logits = logits.transpose(0, 1)
        background = torch.zeros_like(logits[:, :1])
        return torch.cat((background, logits), dim=1)

