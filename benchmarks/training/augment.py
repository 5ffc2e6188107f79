"""Spatial augmentation of training patches (a small subset of nnU-Net's): the phantoms' organs vary in size by
about +-15% per axis and turn by +-0.3 rad, and 32-48 of them leave gaps a network trained without augmentation
falls into (run 6's organ part: kidney Dice 0.975 on the held-out phantom, 0.54 on the test CT).

No mirroring: left and right kidney differ only by side. No intensity changes: a phantom's organs differ mostly
by their HU. (The one run with gain 0.9-1.1 and shift +-0.1, 2026-12-06 on the H100, over-segmented spleen and
liver on whole phantoms; going on without them did not recover, so that run does not settle why:
benchmarks/results/h100-cuda/whole_ct/README.md.)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# the region cropped around a patch before it is zoomed and turned: room for zooming out to 1/0.8 and a turn
REGION = 1.45


def region_for(patch: Sequence[int]) -> list[int]:
    """The crop (KJI) an augmented patch of ``patch`` is resampled from."""
    return [int(math.ceil(p * REGION)) for p in patch]


def affine(patch: Sequence[int], region: Sequence[int], zoom: float, angle: float):
    """``affine_grid``'s theta (1, 3, 4) sampling a ``patch`` grid from the centre of a ``region`` grid: output
    voxels ``zoom`` input voxels apart (above 1 organs look smaller), turned by ``angle`` about the K axis."""
    import torch

    # voxel space: in = zoom * R @ out; normalized (align_corners=False): out_v = out_n * P / 2, in_n = in_v * 2 / R
    p = np.asarray(patch[::-1], np.float64)  # grid_sample's x, y, z are I, J, K
    r = np.asarray(region[::-1], np.float64)
    c, s = math.cos(angle), math.sin(angle)
    turn = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    matrix = np.diag(1 / r) @ (zoom * turn) @ np.diag(p)
    return torch.from_numpy(np.concatenate([matrix, np.zeros((3, 1))], axis=1)[None]).float()


def resample(image, labels, patch: Sequence[int], zoom: float, angle: float):
    """``image`` (C, K, J, I) and ``labels`` (K, J, I) of a region resampled to ``patch``: image trilinear (outside
    the region: the image's minimum), labels nearest (outside: background)."""
    import torch
    import torch.nn.functional as F

    theta = affine(patch, labels.shape, zoom, angle).to(image.device)
    grid = F.affine_grid(theta, [1, image.shape[0], *patch], align_corners=False)
    low = image.min()
    out = F.grid_sample((image - low)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + low
    lab = F.grid_sample(labels[None, None].to(image.dtype), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[0, 0]
    return out, lab.round().to(torch.int64)


def draw(rng: np.random.Generator, zoom: Sequence[float] = (0.8, 1.25), angle: float = 0.35) -> dict[str, float]:
    """One patch's random transform: zoom (log-uniform) and turn about K (radians)."""
    return {"zoom": float(math.exp(rng.uniform(math.log(zoom[0]), math.log(zoom[1])))),
            "angle": float(rng.uniform(-angle, angle))}


def augment(image, labels, patch: Sequence[int], rng: np.random.Generator):
    """A ``region_for(patch)`` crop turned into an augmented ``patch``: (image, labels)."""
    t = draw(rng)
    return resample(image, labels, patch, t["zoom"], t["angle"])
