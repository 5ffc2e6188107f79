"""Training patches of whole phantoms, drawn as nnU-Net's data loader draws them (``crop``), optionally zoomed and
turned (``augmented_crop``, :mod:`augment`)."""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

import augment


def class_points(labels) -> list:
    """The voxels (``torch.nonzero``, int32) of each foreground class present in ``labels``, in class order: what
    nnU-Net's data loader keeps as a case's ``class_locations``."""
    import torch

    return [torch.nonzero(labels == c).to(torch.int32) for c in torch.unique(labels).tolist() if c > 0]


def crop(image, labels, patch: Sequence[int], rng: np.random.Generator, foreground: bool, points=None,
         by_voxel: bool = False):
    """One patch (the volume padded with its minimum where smaller). ``foreground``: centred on a voxel of one
    foreground class drawn with equal chance among those present, as nnU-Net's data loader draws them, so that a
    kidney is centred as often as the liver (five times its size); ``by_voxel``: on any foreground voxel, so each
    class in proportion to its size (the runs before 2026-12-06); ``points``: :func:`class_points` of ``labels``
    if known (searching the volume costs tens of ms a patch)."""
    import torch

    pad = [max(0, p - s) for p, s in zip(patch, labels.shape)]
    if any(pad):
        widths = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
        image = torch.nn.functional.pad(image, widths, value=float(image.min()))
        labels = torch.nn.functional.pad(labels, widths)
        if points is not None:
            offset = torch.tensor([p // 2 for p in pad], dtype=torch.int32)
            points = [voxels + offset for voxels in points]
    if foreground and points is None:
        points = class_points(labels)
    if foreground and points:
        if by_voxel:
            sizes = np.array([len(voxels) for voxels in points], dtype=np.float64)
            pick = rng.choice(len(points), p=sizes / sizes.sum())
        else:
            pick = rng.integers(len(points))
        voxels = points[int(pick)]
        centre = voxels[int(rng.integers(len(voxels)))].tolist()
        start = [min(max(0, c - p // 2), s - p) for c, p, s in zip(centre, patch, labels.shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, labels.shape)]
    window = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return image[(slice(None), *window)], labels[window]


def augmented_crop(volume, points, args: argparse.Namespace, rng: np.random.Generator):
    """One training patch of ``volume`` (image, labels): :func:`crop` as ``args`` asks, zoomed and turned
    (``augment.augment``) with chance ``args.augment``; on ``args.device``."""
    foreground = rng.random() < args.foreground_share
    by_voxel = args.class_draw == "by-voxel" or (args.class_draw == "mixed" and bool(rng.random() < 0.5))
    if not args.augment or rng.random() >= args.augment:
        return [t.to(args.device) for t in crop(*volume, args.patch, rng, foreground, points, by_voxel)]
    image, labels = crop(*volume, augment.region_for(args.patch), rng, foreground, points, by_voxel)
    return augment.augment(image.to(args.device), labels.to(args.device), args.patch, rng)
