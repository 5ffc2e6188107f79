"""A small, deterministic training loop on synthetic phantoms (sample models, demos, tests).

Phantoms are generated at the spec's spacing, so preprocessing is exactly what inference does
(:func:`PTQLogic.inference.preprocess.to_network_space`: orientation, identity resampling, CT window) and the
labels only need the same orientation. Patches of ``spec.patch_size`` are cropped at random, two of
three centred on a random foreground voxel. Loss: MONAI ``DiceCELoss``; optimizer: Adam with a
polynomial learning-rate decay. Same spec, seed and phantoms -> the same weights on the CPU.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ..core.errors import InputError
from ..models.torch_models import build_network
from .phantom import make_phantom
from ..inference.preprocess import labels_to_input_grid, resample_to_network, to_network_space
from ..core.progress import Monitor
from ..core.spec import ModelSpec
from ..core.volume import Volume

TRAIN_SEED_BASE = 1000  # training phantoms use seeds >= this; held-out evaluation uses seeds below it
PHANTOM_SHAPE = (64, 64, 64)


def _labels_to_network(labels: Volume, spec: ModelSpec) -> torch.Tensor:
    """(I, J, K) int64 labels, oriented by the very code that orients the image (no resampling)."""
    geometry_only = replace(spec, in_channels=1, preprocessing=replace(spec.preprocessing, spacing=None))
    tensor, _ = resample_to_network(labels, geometry_only)  # small integers are exact in float32
    return tensor[0].round().to(torch.int64).contiguous()


def phantoms_to_network(phantoms: Sequence[tuple[Volume, Volume]], spec: ModelSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preprocess (image, labels) pairs to network space: ([C, I, J, K] float32, [I, J, K] int64)."""
    pairs = []
    for index, (image, labels) in enumerate(phantoms):
        wanted = spec.preprocessing.spacing
        if wanted is not None and not np.allclose(image.spacing, wanted, atol=1e-3):
            raise InputError(f"Phantom {index} has spacing {image.spacing} but the spec resamples to {wanted}; "
                             "generate training phantoms at the spec's spacing.")
        if image.spatial_shape != labels.spatial_shape or not np.allclose(image.ijk_to_ras, labels.ijk_to_ras):
            raise InputError(f"Phantom {index}: image and labels are not on the same grid.")
        tensor, _ = to_network_space(image, spec)
        label_tensor = _labels_to_network(labels, spec)
        if tuple(tensor.shape[1:]) != tuple(label_tensor.shape):
            raise InputError(f"Phantom {index}: network-space image {tuple(tensor.shape)} and labels {tuple(label_tensor.shape)} differ.")
        pairs.append((tensor, label_tensor))
    return pairs


def _crop(image: torch.Tensor, labels: torch.Tensor, patch: Sequence[int], rng: np.random.Generator):
    """One random patch (zero-padded when the volume is smaller), foreground-centred 2 times in 3."""
    pad = [max(0, p - s) for p, s in zip(patch, labels.shape)]
    if any(pad):
        spec_pad = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
        image = torch.nn.functional.pad(image, spec_pad)
        labels = torch.nn.functional.pad(labels, spec_pad)
    shape = labels.shape
    foreground = torch.nonzero(labels > 0) if rng.random() < 2 / 3 else None
    if foreground is not None and len(foreground):
        centre = foreground[int(rng.integers(len(foreground)))].tolist()
        start = [min(max(0, c - p // 2), s - p) for c, p, s in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, shape)]
    window = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return image[(slice(None), *window)], labels[window]


def default_training_phantoms(spec: ModelSpec, count: int, seed: int = 0, shape=PHANTOM_SHAPE) -> list[tuple[Volume, Volume]]:
    spacing = spec.preprocessing.spacing or (1.5, 1.5, 1.5)
    return [make_phantom(TRAIN_SEED_BASE + seed * 1000 + i, shape, spacing) for i in range(count)]


def train_on_phantoms(
    spec: ModelSpec,
    steps: int = 300,
    batch_size: int = 2,
    lr: float = 2e-3,
    seed: int = 0,
    monitor: Monitor | None = None,
    phantoms: Sequence[tuple[Volume, Volume]] | None = None,
    num_phantoms: int = 8,
    device: str | torch.device = "cpu",
    loss_history: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``spec``'s network from scratch on phantoms; returns a CPU ``state_dict``.

    ``phantoms`` defaults to ``num_phantoms`` fresh phantoms (seeds from :data:`TRAIN_SEED_BASE`).
    Per-step losses are appended to ``loss_history`` when given.
    """
    from monai.losses import DiceCELoss

    monitor = monitor or Monitor()
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise InputError(f"Training needs steps >= 1, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}.")
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = phantoms_to_network(phantoms if phantoms is not None else default_training_phantoms(spec, num_phantoms, seed), spec)
    data = [(image.to(device), labels.to(device)) for image, labels in data]
    model = build_network(spec).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / steps) ** 0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    saved_flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        for step in range(steps):
            monitor.update("train", step, steps)
            picks = rng.integers(len(data), size=batch_size)
            crops = [_crop(*data[int(i)], spec.patch_size, rng) for i in picks]
            images = torch.stack([c[0] for c in crops])
            labels = torch.stack([c[1] for c in crops])[:, None]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            if loss_history is not None:
                loss_history.append(float(loss.detach()))
        monitor.update("train", steps, steps)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_flags
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


@torch.no_grad()
def segment_phantom(model: torch.nn.Module, image: Volume, spec: ModelSpec, device: str | torch.device = "cpu") -> np.ndarray:
    """Labels (KJI, on ``image``'s grid) from a torch model via MONAI sliding-window inference."""
    from monai.inferers import sliding_window_inference

    tensor, grid = to_network_space(image, spec)
    logits = sliding_window_inference(
        tensor[None].to(device), roi_size=spec.patch_size, sw_batch_size=4, predictor=model.eval(),
        overlap=spec.overlap, mode=spec.blend_mode,
    )
    labels_ijk = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
    return labels_to_input_grid(labels_ijk, grid)
