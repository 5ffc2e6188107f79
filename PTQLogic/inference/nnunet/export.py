"""nnU-Net's export of logits to a label map on the input grid, without resampling every class everywhere.

``convert_predicted_logits_to_segmentation_with_correct_shape`` resamples the logits of every class to the
input grid at once (through a float64 copy of all of them), then takes the argmax. With the plans' usual
order-1 resampling, :mod:`.sparse_export` takes the label straight from the network grid wherever the
interpolation cannot change it and resamples exactly only the rest. Any other resampling function runs class
by class, folded into a running maximum, so only one class is resampled at a time. Both give nnunetv2's labels
exactly (the resampling treats channels independently, and a strict ``>`` keeps the first maximum, as
``argmax`` does; tested against nnunetv2's function).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...core.progress import Monitor
from .sparse_export import order_one_kwargs, resampled_labels

STAGE = "nnU-Net export"


def logits_to_labels(logits: torch.Tensor, plans_manager, config, label_manager, properties: dict[str, Any],
                     monitor: Monitor | None = None, stage: str = STAGE) -> np.ndarray:
    """(classes, *network grid) logits -> label map on the input grid (nnU-Net's array order); progress and
    cancel per class (per block of voxels for order-1 resampling)."""
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = config.spacing if len(config.spacing) == len(shape) else [spacing[0], *config.spacing]
    dtype = np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16
    monitor = monitor or Monitor()
    order_one = order_one_kwargs(config.configuration)
    if order_one is not None and tuple(logits.shape[1:]) != tuple(shape):
        labels = resampled_labels(logits, shape, current, spacing, order_one["force_separate_z"], dtype,
                                  monitor, stage)
    else:
        labels = _fold_classes(logits, shape, current, spacing, config, dtype, monitor, stage)
    full = np.zeros(properties["shape_before_cropping"], dtype=dtype)
    full = _insert(full, labels, properties["bbox_used_for_cropping"])
    return np.asarray(full).transpose(plans_manager.transpose_backward)


def _insert(full: np.ndarray, labels: np.ndarray, bbox) -> np.ndarray:
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    return insert_crop_into_image(full, labels, bbox)


def _fold_classes(logits: torch.Tensor, shape, current, spacing, config, dtype, monitor: Monitor,
                  stage: str) -> np.ndarray:
    """Running argmax over each class resampled by the plans' function, in class order."""
    best = labels = None
    classes = logits.shape[0]
    for c in range(classes):
        monitor.check()
        monitor.update(stage, c, classes)
        scores = np.asarray(config.resampling_fn_probabilities(logits[c:c + 1], shape, current, spacing)[0])
        if best is None:
            best, labels = scores.copy(), np.zeros(scores.shape, dtype=dtype)
            continue
        better = scores > best
        labels[better] = c
        np.copyto(best, scores, where=better)
    monitor.update(stage, classes, classes)
    return labels
