"""The ``totalseg`` and ``totalseg-cuda`` rows of ``whole_ct.py``: the job as TotalSegmentator runs it.

TotalSegmentator (2.18, ``totalsegmentator/nnunet.py``) does not hand the CT to nnunetv2 at its own spacing: it
reorients the NIfTI to the orientation its networks were trained in (RAS), resamples it to the model's spacing
(cubic spline, cast to int32, one thread), writes it, lets nnunetv2's predictor segment each part at that spacing (so
nnunetv2's preprocessing only normalizes and its export only takes the argmax), merges the parts there, and
resamples the merged label map back to the CT's grid (linear, one class at a time within its bounding box,
``crop_resample``) before undoing the reorientation. The labels therefore differ from nnunetv2's on the original
grid (the ``nnunetv2`` row, which this project's pipeline reproduces voxel for voxel), and the work is much less.

This row runs those steps with TotalSegmentator's own resampling (``totalsegmentator.resampling.change_spacing``;
``pip install --no-deps TotalSegmentator``: only that module is imported, it needs nibabel, scipy and joblib) and
nnunetv2's predictor configured as TotalSegmentator configures it (step 0.8 for ``total``, no mirroring,
everything on the device). The files TotalSegmentator writes between the steps are written here too, into a
temporary folder. One step differs on purpose: the reorientation. TotalSegmentator's networks were trained on
canonical (RAS) arrays, so it turns every CT to RAS; the benchmark's networks were trained on arrays in the
orientation of the benchmark's CT (LPS), so the row keeps that orientation (turning it to RAS would show them a
mirrored body; the turn itself is an axis flip, a negligible cost). Not included: its cropping, statistics and
postprocessing options (off by default for ``total``), DICOM input, licence and download checks.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TOTALSEG_ROWS = ("totalseg", "totalseg-cuda")
INSTALL_HINT = "pip install --no-deps TotalSegmentator==2.18.0"


def missing_reason() -> str | None:
    """Why the TotalSegmentator rows cannot run here, or None."""
    import importlib.util

    for name in ("totalsegmentator", "nibabel", "joblib"):
        if importlib.util.find_spec(name) is None:
            return f"rows {', '.join(TOTALSEG_ROWS)} need the {name} module ({INSTALL_HINT})"
    return None


def run_totalseg(spec: dict[str, Any], predictor_for, lookup, clock, counter) -> dict[str, Any]:
    """One whole CT the TotalSegmentator way; ``predictor_for(folder)`` gives nnunetv2's predictor of a part,
    ``lookup(dataset, labels)`` a part's label -> global label table, ``clock(stage)`` times a stage,
    ``counter(network)`` counts a network's calls (``.calls``)."""
    import nibabel as nib
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from totalsegmentator.resampling import change_spacing

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptqseg-totalseg-") as tmp:
        scan, resampled = Path(tmp) / "s01_0000.nii.gz", Path(tmp) / "s01.nii.gz"
        with clock("other"):
            original = nib.load(spec["ct"])
            image_in = nib.Nifti1Image(original.get_fdata(), original.affine)  # kept in its orientation (above)
        with clock("build"):
            predictors = [predictor_for(folder) for folder in spec["folders"]]
        counters = [counter(predictor.network) for predictor in predictors]
        spacing = [float(v) for v in predictors[0].configuration_manager.spacing]
        with clock("preprocess"):  # TotalSegmentator's own resampling to the model's spacing, and its file
            nib.save(change_spacing(image_in, spacing[::-1], order=3, dtype=np.int32, nr_cpus=1), scan)
        with clock("other"):
            image, properties = SimpleITKIO().read_images([str(scan)])
        merged = np.zeros(image.shape[1:], dtype=np.uint8)
        for predictor in predictors:
            with clock("preprocess"):
                preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
                data, _, props = preprocessor.run_case_npy(image, None, copy.deepcopy(properties),
                                                           predictor.plans_manager, predictor.configuration_manager,
                                                           predictor.dataset_json)
            with clock("network"):
                logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            with clock("export"):  # the network's grid is the image's: the argmax, no resampling
                labels = convert_predicted_logits_to_segmentation_with_correct_shape(
                    logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, props)
            del logits, data
            with clock("other"):
                mapped = lookup(predictor.dataset_json, spec["labels"])[labels]
                np.copyto(merged, mapped, where=mapped != 0)
        with clock("other"):
            SimpleITKIO().write_seg(merged, str(resampled), properties)
            at_model_spacing = nib.load(resampled)
        with clock("export"):  # back to the CT's grid as TotalSegmentator 2.18 does by default
            back = change_spacing(at_model_spacing, spacing[::-1], image_in.shape, order=1, dtype=np.uint8,
                                  nr_cpus=1, force_affine=image_in.affine, crop_resample=True)
        with clock("other"):
            nib.save(nib.Nifti1Image(np.asanyarray(back.dataobj).astype(np.uint8), original.affine), spec["output"])
    return {"seconds": time.perf_counter() - started, "windows": sum(c.calls for c in counters)}
