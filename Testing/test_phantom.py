"""Phantoms, the training loop and the shipped sample models (real MONAI/torch computations)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from PTQLogic.core.errors import InputError
from PTQLogic.evaluation.metrics import dice_per_class
from PTQLogic.models.torch_models import build_network
from PTQLogic.samples.phantom import LABELS, PHANTOM_CLASSES, make_phantom, write_phantom_set
from PTQLogic.core.progress import Monitor
from PTQLogic.core.spec import load_spec, spec_from_dict
from PTQLogic.samples.train import TRAIN_SEED_BASE, segment_phantom, train_on_phantoms

DATA = Path(__file__).resolve().parents[1] / "PTQLogic" / "samples" / "data"


def test_phantom_is_deterministic_and_varies_with_seed():
    image_a, labels_a = make_phantom(3, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    image_b, labels_b = make_phantom(3, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    assert np.array_equal(image_a.array, image_b.array) and np.array_equal(labels_a.array, labels_b.array)
    image_c, labels_c = make_phantom(4, shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    assert not np.array_equal(labels_a.array, labels_c.array)
    assert np.count_nonzero(labels_a.array != labels_c.array) > 100  # organs moved, not just noise


def test_phantom_grid_classes_and_hu():
    image, labels = make_phantom(0)
    assert image.array.shape == labels.array.shape == (64, 64, 64)
    assert image.array.dtype == np.int16 and labels.array.dtype == np.uint8
    assert np.array_equal(image.ijk_to_ras, labels.ijk_to_ras)
    assert image.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert np.allclose(np.diag(image.ijk_to_ras)[:3], [-1.5, -1.5, 1.5])  # LPS-like, like DICOM NIfTIs
    image.validate()
    counts = np.bincount(labels.array.ravel(), minlength=len(PHANTOM_CLASSES))
    assert len(counts) == len(PHANTOM_CLASSES) and np.all(counts > 500)
    hu = image.array.astype(float)
    assert np.median(hu[0, 0, :5]) < -900  # air corner
    for name, low, high in [("liver", 70, 130), ("spleen", 55, 120), ("aorta", 110, 220), ("vertebra", 250, 700)]:
        assert low < np.median(hu[labels.array == LABELS[name]]) < high, name
    assert np.std(hu[labels.array == LABELS["liver"]]) > 10  # noisy like CT, not flat


def test_phantom_anatomy_sides():
    image, labels = make_phantom(7, shape=(48, 48, 48))
    ras = image.ijk_to_ras
    def centre_x(name):  # RAS x of an organ's centroid: + is the patient's right
        k, j, i = np.nonzero(labels.array == LABELS[name])
        return (ras @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[0]
    assert centre_x("liver") > 0 > centre_x("spleen")
    assert centre_x("kidney_right") > 0 > centre_x("kidney_left")


def test_bad_phantom_arguments():
    with pytest.raises(InputError):
        make_phantom(0, shape=(4, 64, 64))
    with pytest.raises(InputError):
        make_phantom(0, spacing=(1.5, 0, 1.5))


def test_write_phantom_set_round_trip(tmp_path):
    from PTQLogic.io.volumes import read_volume

    pairs = write_phantom_set(tmp_path / "set", 2, seed=5, shape=(16, 20, 24), spacing=(2.0, 2.0, 3.0))
    assert len(pairs) == 2
    image, labels = make_phantom(6, shape=(16, 20, 24), spacing=(2.0, 2.0, 3.0))
    read_image, read_labels = read_volume(pairs[1][0]), read_volume(pairs[1][1])
    assert np.array_equal(read_image.array, image.array)
    assert np.array_equal(read_labels.array, labels.array)
    assert np.allclose(read_image.ijk_to_ras, image.ijk_to_ras, atol=1e-5)


def _tiny_spec():
    return spec_from_dict({
        "name": "tiny", "architecture": "UNet", "classes": [c.name for c in PHANTOM_CLASSES], "patch_size": [16, 16, 16],
        "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": len(PHANTOM_CLASSES), "channels": [4, 8],
                   "strides": [2], "num_res_units": 0},
        "preprocessing": {"spacing": [3.0, 3.0, 3.0], "ct_window": [-200, 300]},
    })


def test_short_training_decreases_loss_and_is_deterministic():
    torch.set_num_threads(2)
    spec = _tiny_spec()
    phantoms = [make_phantom(TRAIN_SEED_BASE + i, (32, 32, 32), (3.0, 3.0, 3.0)) for i in range(2)]
    losses: list[float] = []
    progress = []
    state = train_on_phantoms(spec, steps=40, batch_size=2, lr=1e-2, seed=0, phantoms=phantoms, loss_history=losses,
                              monitor=Monitor(on_progress=lambda *args: progress.append(args)))
    assert len(losses) == 40 and progress[-1] == ("train", 40, 40)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    again = train_on_phantoms(spec, steps=40, batch_size=2, lr=1e-2, seed=0, phantoms=phantoms)
    assert all(torch.equal(state[k], again[k]) for k in state)
    with pytest.raises(InputError, match="spacing"):  # phantoms must be on the spec's grid
        train_on_phantoms(spec, steps=1, phantoms=[make_phantom(0, (16, 16, 16), (1.5, 1.5, 1.5))])


@pytest.mark.parametrize("stem", ["phantom_unet", "phantom_segresnet"])
def test_shipped_sample_model_segments_held_out_phantom(stem):
    torch.set_num_threads(2)
    spec = load_spec(DATA / f"{stem}.json")
    assert spec.class_names == [c.name for c in PHANTOM_CLASSES]
    weights = spec.weights_path()
    assert weights.is_file() and weights.stat().st_size < 3.5e6
    state = torch.load(weights, weights_only=True, map_location="cpu")
    model = build_network(spec)
    model.load_state_dict(state)  # strict: every key matches the spec's network
    image, labels = make_phantom(11, spacing=spec.preprocessing.spacing)  # seed < TRAIN_SEED_BASE: held out
    with torch.inference_mode():
        prediction = segment_phantom(model, image, spec)
    result = dice_per_class(prediction, labels.array, range(1, len(PHANTOM_CLASSES)))
    assert result.excluded == [] and result.mean >= 0.9, result.per_class
