"""Shared fixtures: real data location, phantoms, and one quantized sample model per test session."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "PTQSEG_TEST_DATA"
# real data: $PTQSEG_TEST_DATA, else ../shared/data next to the checkout
SHARED_DATA = Path(os.environ.get(DATA_ENV) or ROOT.parent / "shared" / "data")
SAMPLE_UNET = ROOT / "PTQLogic" / "samples" / "data" / "phantom_unet.json"

torch.set_num_threads(2)
# The Ctrl-C tests press Ctrl-C at a terminal: a suite started with SIGINT ignored (nohup, `cmd &` in a script)
# would hand that on to every command it starts, and they would never see it. Children get the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# engine caches of the test run (subprocesses inherit it) stay out of the user's cache folder
if "PTQSEG_CACHE_DIR" not in os.environ:
    os.environ["PTQSEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="ptqseg-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PTQSEG_CACHE_DIR"], True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"real data (example_ct_sm.nii.gz, example_seg.nii.gz, ...) not found in {SHARED_DATA}; "
                    f"set {DATA_ENV}=/path/to/data to run the real-data tests")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    """Two calibration phantoms and one held-out phantom with its truth, written as NIfTI."""
    from PTQLogic.samples.phantom import write_phantom_set
    from PTQLogic.core.spec import load_spec

    folder = tmp_path_factory.mktemp("phantoms")
    spacing = load_spec(SAMPLE_UNET).preprocessing.spacing
    calibration = write_phantom_set(folder / "calibration", 2, 100, spacing=spacing)
    # seed 7: held out (the sample models were trained on seeds 1000-1031, calibration uses 100-101)
    (test_image, test_truth), = write_phantom_set(folder / "test", 1, 7, spacing=spacing)
    return {"calibration": [img for img, _ in calibration], "image": test_image, "truth": test_truth}


@pytest.fixture(scope="session")
def quantized_unet(tmp_path_factory, phantom_files) -> Path:
    """The shipped sample UNet quantized to INT8 on the calibration phantoms (a model folder)."""
    from PTQLogic.pipeline import quantize_model

    out = tmp_path_factory.mktemp("models") / "unet-int8"
    quantize_model(SAMPLE_UNET, phantom_files["calibration"], out, num_patches=8)
    return out
