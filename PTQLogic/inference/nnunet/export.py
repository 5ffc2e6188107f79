"""nnU-Net's export of logits to a label map on the input grid, one class at a time.

``convert_predicted_logits_to_segmentation_with_correct_shape`` resamples the logits of every class to the
input grid at once (through a float64 copy of all of them), then takes the argmax. Here each class is
resampled by the same configured function and folded into a running maximum, so only one class is
resampled at a time. The labels are identical: the resampling treats channels independently, and a
strict ``>`` keeps the first maximum, as ``argmax`` does (tested against nnunetv2's function).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...core.progress import Monitor


STAGE = "nnU-Net export"


def logits_to_labels(logits: torch.Tensor, plans_manager, config, label_manager, properties: dict[str, Any],
                     monitor: Monitor | None = None, stage: str = STAGE) -> np.ndarray:
    """(classes, *network grid) logits -> label map on the input grid (nnU-Net's array order); progress and
    cancel per class."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape = properties["shape_after_cropping_and_before_resampling"]
    current = config.spacing if len(config.spacing) == len(shape) else [spacing[0], *config.spacing]
    dtype = np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16
    best = labels = None
    monitor = monitor or Monitor()
    for c in range(logits.shape[0]):
        monitor.check()
        monitor.update(stage, c, logits.shape[0])
        scores = np.asarray(config.resampling_fn_probabilities(logits[c:c + 1], shape, current, spacing)[0])
        if best is None:
            best, labels = scores.copy(), np.zeros(scores.shape, dtype=dtype)
            continue
        better = scores > best
        labels[better] = c
        np.copyto(best, scores, where=better)
    monitor.update(stage, logits.shape[0], logits.shape[0])
    full = np.zeros(properties["shape_before_cropping"], dtype=dtype)
    full = insert_crop_into_image(full, labels, properties["bbox_used_for_cropping"])
    return np.asarray(full).transpose(plans_manager.transpose_backward)
