"""The per-class export gives nnunetv2's label map exactly (its own export function as the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_factory import dataset, plans
from PTQLogic.core.errors import Cancelled
from PTQLogic.inference.nnunet.export import logits_to_labels
from PTQLogic.inference.nnunet.predict import NnUNetRunner
from PTQLogic.core.progress import Monitor


def _reference(logits, runner, properties):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.clone(), runner.plans_manager, runner.config, runner.label_manager, properties)


@pytest.mark.parametrize("case", ["resampled", "anisotropic", "native", "cropped", "transposed", "transposed-thick",
                                  "ties", "torch"])
def test_per_class_export_equals_nnunets(case):
    """``transposed-thick``: an isotropic plan, thick input slices and transposed axes, so the separate-z axis
    comes from the input spacing in the network's axis order (transpose_forward, not _backward)."""
    target = {"anisotropic": [4.0, 1.0, 1.0]}.get(case, [1.5, 1.5, 1.5])
    forward = (2, 0, 1) if case.startswith("transposed") else (0, 1, 2)
    plan = plans(target, [16, 16, 16], transpose_forward=forward)
    if case == "torch":  # nnU-Net's other resampling function (newer plans)
        plan["configurations"]["3d_fullres"].update(resampling_fn_probabilities="resample_torch_fornnunet",
                                                    resampling_fn_probabilities_kwargs={"is_seg": False})
    runner = NnUNetRunner(plan, dataset(["background"] + [f"c{i}" for i in range(1, 7)]), "3d_fullres")
    cropped = (20, 23, 26)  # nnU-Net axis order, after cropping
    spacing = {"native": [1.5, 1.5, 1.5], "anisotropic": [4.0, 0.7, 0.7],
               "transposed-thick": [0.8, 0.9, 3.5]}.get(case, [1.0, 0.9, 1.2])
    grid = tuple(int(round(s * sp / t)) for s, sp, t in zip(cropped, spacing, target))
    before = (24, 23, 30) if case == "cropped" else cropped
    bbox = [[2, 22], [0, 23], [1, 27]] if case == "cropped" else [[0, s] for s in cropped]
    properties = {"spacing": [spacing[i] for i in np.argsort(forward)], "shape_before_cropping": before,
                  "bbox_used_for_cropping": bbox, "shape_after_cropping_and_before_resampling": cropped}
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn((7, *grid), generator=generator)).half()
    if case == "ties":  # equal top scores: the first class wins, as with argmax
        logits[4] = logits[2]
        logits[5] = logits.max(0).values
    ours = logits_to_labels(logits, runner.plans_manager, runner.config, runner.label_manager, properties)
    reference = _reference(logits, runner, properties)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    assert np.array_equal(ours, reference) and len(np.unique(reference)) >= 4
    if case == "native":
        assert grid == cropped  # no resampling: nnunetv2 returns the logits as they are
    if case in ("anisotropic", "transposed-thick"):  # nnU-Net's separate-z path (in-plane per slice, then nearest
        from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis  # along z)

        assert determine_do_sep_z_and_axis(None, target, spacing, 3) == (True, 0 if case == "anisotropic" else 2)


def test_export_reports_progress_per_class_and_can_be_cancelled():
    runner = NnUNetRunner(plans([1.5, 1.5, 1.5], [16, 16, 16]), dataset(["background", "a", "b"]), "3d_fullres")
    properties = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": (12, 12, 12),
                  "bbox_used_for_cropping": [[0, 12]] * 3, "shape_after_cropping_and_before_resampling": (12, 12, 12)}
    logits = torch.randn((3, 8, 8, 8)).half()
    events = []
    logits_to_labels(logits, runner.plans_manager, runner.config, runner.label_manager, properties,
                     Monitor(on_progress=lambda *e: events.append(e)))
    assert [e[1:] for e in events if e[0] == "nnU-Net export"] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    monitor = Monitor()
    monitor.on_progress = lambda stage, done, total: monitor.cancel() if done == 1 else None
    with pytest.raises(Cancelled):
        logits_to_labels(logits, runner.plans_manager, runner.config, runner.label_manager, properties, monitor)
