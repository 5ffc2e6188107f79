"""Shared fixtures: real data location, phantoms, and one quantized sample model per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_UNET = ROOT / "PTQLogic" / "data" / "phantom_unet.json"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"real data not found in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    """Two calibration phantoms and one held-out phantom with its truth, written as NIfTI."""
    from PTQLogic.phantom import write_phantom_set
    from PTQLogic.spec import load_spec

    folder = tmp_path_factory.mktemp("phantoms")
    spacing = load_spec(SAMPLE_UNET).preprocessing.spacing
    calibration = write_phantom_set(folder / "calibration", 2, 100, spacing=spacing)
    (test_image, test_truth), = write_phantom_set(folder / "test", 1, 1000, spacing=spacing)
    return {"calibration": [img for img, _ in calibration], "image": test_image, "truth": test_truth}


@pytest.fixture(scope="session")
def quantized_unet(tmp_path_factory, phantom_files) -> Path:
    """The shipped sample UNet quantized to INT8 on the calibration phantoms (a model folder)."""
    from PTQLogic.pipeline import quantize_model

    out = tmp_path_factory.mktemp("models") / "unet-int8"
    quantize_model(SAMPLE_UNET, phantom_files["calibration"], out, num_patches=8)
    return out
