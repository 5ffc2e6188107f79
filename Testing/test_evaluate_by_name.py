"""Dice against a reference that numbers the classes differently (TotalSegmentator): matched by name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
# TotalSegmentator's values for the sample model's classes (liver 5, spleen 1, ...); vertebra has no match.
TOTALSEG = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "aorta": 52, "vertebra": 27}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "PTQLogic.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_reference_with_other_numbering(quantized_unet, phantom_files, tmp_path):
    from PTQLogic.spec import load_spec

    classes = [c.name for c in load_spec(quantized_unet / "spec.json").classes]
    truth = sitk.ReadImage(str(phantom_files["truth"]))
    values = sitk.GetArrayFromImage(truth)
    renumbered = np.zeros_like(values)
    for value, name in enumerate(classes[1:], start=1):
        renumbered[values == value] = TOTALSEG[name] if name != "vertebra" else 0
    reference = sitk.GetImageFromArray(renumbered)
    reference.CopyInformation(truth)
    sitk.WriteImage(reference, str(tmp_path / "totalseg.nii.gz"))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver",
                                 "27": "vertebrae_L1", "52": "aorta"}))
    labels = tmp_path / "labels.nii.gz"

    segment = _cli("segment", "--model", str(quantized_unet), "--input", str(phantom_files["image"]),
                   "--output", str(labels), "--runtime", "onnxruntime", "--reference", str(tmp_path / "totalseg.nii.gz"))
    assert segment.returncode == 0, segment.stderr
    assert "warning: reference" in segment.stderr and "--reference-names" in segment.stderr

    by_name = _cli("evaluate", "--json", "--prediction", str(labels), "--reference", str(tmp_path / "totalseg.nii.gz"),
                   "--reference-names", str(names))
    same_numbers = _cli("evaluate", "--json", "--prediction", str(labels), "--reference", str(phantom_files["truth"]),
                        "--labels", "1", "2", "3", "4", "5")
    assert by_name.returncode == 0 and same_numbers.returncode == 0, by_name.stderr + same_numbers.stderr
    result, expected = json.loads(by_name.stdout), json.loads(same_numbers.stdout)
    assert result["names"] == {"1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left", "5": "aorta"}
    assert result["per_class"] == expected["per_class"] and result["mean"] > 0.9

    wrong = _cli("evaluate", "--prediction", str(labels), "--reference", str(tmp_path / "totalseg.nii.gz"),
                 "--reference-names", str(phantom_files["truth"]))
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: Cannot read label names")
