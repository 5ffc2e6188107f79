"""Calibration patches: shape, determinism, foreground share, padding, volume loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PTQLogic.quantization.calibration import CalibrationSettings, load_calibration_volumes, sample_calibration_patches
from PTQLogic.core.errors import Cancelled, InputError
from PTQLogic.io.volumes import write_labelmap
from PTQLogic.core.progress import Monitor
from PTQLogic.core.spec import spec_from_dict
from PTQLogic.core.volume import Volume

from conftest import DATA_ENV, SHARED_DATA as DATA  # noqa: E402 - $PTQSEG_TEST_DATA or ../shared/data
BODY_HU, AIR_HU = 40, -1000
BODY_VALUE = (BODY_HU + 1000) / 2000  # after the default CT window [-1000, 1000]


def make_spec(patch=(8, 8, 8), intensity="ct"):
    return spec_from_dict({"name": "t", "architecture": "UNet", "classes": ["bg", "fg"], "patch_size": list(patch),
                           "preprocessing": {"orientation": "RAS", "intensity": intensity}})


def body_volume(shape=(40, 40, 40), seed=0) -> Volume:
    """Air with a small body box (about 3% of the voxels), away from the borders."""
    rng = np.random.default_rng(seed)
    array = np.full(shape, AIR_HU, dtype=np.int16)
    array[16:24, 15:26, 14:24] = BODY_HU
    array += rng.integers(0, 3, size=shape).astype(np.int16)  # a little noise, keeps patches distinct
    return Volume(array, np.diag([1.5, 1.0, 2.0, 1.0]))


def centre_is_body(patches: np.ndarray) -> np.ndarray:
    return patches[:, 0, 4, 4, 4] > BODY_VALUE - 0.01


def test_shape_dtype_and_determinism():
    volumes = [body_volume(seed=0), body_volume(shape=(30, 36, 33), seed=1)]
    settings = CalibrationSettings(num_patches=10, seed=7)
    first = sample_calibration_patches(volumes, make_spec(), settings)
    assert first.shape == (10, 1, 8, 8, 8) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(first, sample_calibration_patches(volumes, make_spec(), settings))
    other = sample_calibration_patches(volumes, make_spec(), CalibrationSettings(num_patches=10, seed=8))
    assert not np.array_equal(first, other)
    # round robin: odd patches come from the second volume, whose noise seed differs
    single = sample_calibration_patches(volumes[:1], make_spec(), CalibrationSettings(num_patches=5, seed=7))
    np.testing.assert_array_equal(single, first[0::2])


@pytest.mark.parametrize("fraction", [0.0, 0.75, 1.0])
def test_foreground_fraction_is_respected(fraction):
    patches = sample_calibration_patches([body_volume()], make_spec(), CalibrationSettings(120, 0, fraction))
    share = centre_is_body(patches).mean()
    body_share = 8 * 11 * 10 / 40**3
    expected = fraction + (1 - fraction) * body_share
    assert abs(share - expected) < 0.1, (share, expected)


def test_small_volume_is_padded_with_zeros():
    volume = Volume(np.full((5, 4, 6), BODY_HU, dtype=np.int16), np.eye(4))
    patches = sample_calibration_patches([volume], make_spec(), CalibrationSettings(num_patches=3))
    assert patches.shape == (3, 1, 8, 8, 8)
    # I: 6 -> pads 1|1, J: 4 -> 2|2, K: 5 -> 1|2 ; everything outside is 0
    inside = np.zeros((8, 8, 8), bool)
    inside[1:7, 2:6, 1:6] = True
    for patch in patches[:, 0]:
        np.testing.assert_allclose(patch[inside], BODY_VALUE, atol=1e-6)
        assert np.all(patch[~inside] == 0)


def test_mr_style_volumes_and_progress():
    array = np.zeros((30, 30, 30), np.float32)
    array[10:20, 10:20, 10:20] = np.random.default_rng(0).uniform(200, 400, size=(10, 10, 10))
    seen = []
    patches = sample_calibration_patches([Volume(array, np.eye(4))], make_spec(intensity="zscore"),
                                         CalibrationSettings(20, 1, 1.0), Monitor(lambda *a: seen.append(a)))
    assert np.all(patches[:, 0, 4, 4, 4] != 0)  # every centre inside the nonzero body
    assert seen[0] == ("calibration patches", 0, 20) and seen[-1] == ("calibration patches", 20, 20)
    monitor = Monitor()
    monitor.cancel()
    with pytest.raises(Cancelled):
        sample_calibration_patches([Volume(array, np.eye(4))], make_spec(), CalibrationSettings(4), monitor)


def test_bad_settings_and_no_volumes():
    with pytest.raises(InputError, match="at least one"):
        sample_calibration_patches([], make_spec(), CalibrationSettings())
    with pytest.raises(InputError, match="patches must be >= 1"):
        sample_calibration_patches([body_volume()], make_spec(), CalibrationSettings(num_patches=0))


def test_load_calibration_volumes(tmp_path):
    for name in ("b.nii.gz", "a.nrrd"):
        write_labelmap(Volume(np.full((3, 4, 5), 1 if name[0] == "a" else 2, np.uint8), np.eye(4)), tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    dicom = tmp_path / "c_series"
    dicom.mkdir()
    for k in range(3):
        image = sitk.GetImageFromArray(np.full((4, 5), 3, np.int16))
        for key, value in {"0020|000e": "1.2.9", "0020|0032": f"0\\0\\{k}", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0013": str(k + 1), "0008|0060": "CT"}.items():
            image.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # else each slice gets its own new series UID
        writer.SetFileName(str(dicom / f"{k}.dcm"))
        writer.Execute(image)
    volumes = load_calibration_volumes(tmp_path)
    assert [int(v.array.flat[0]) for v in volumes] == [1, 2, 3]  # sorted by name, DICOM folder = one volume
    assert len(load_calibration_volumes([tmp_path / "a.nrrd", dicom])) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="No calibration volumes"):
        load_calibration_volumes(empty)
    with pytest.raises(InputError, match="does not exist"):
        load_calibration_volumes([tmp_path / "missing.nii.gz"])


def test_real_ct_patches():
    path = DATA / "example_ct_sm.nii.gz"
    if not path.exists():
        pytest.skip(f"real data not found in {DATA}; set {DATA_ENV}=/path/to/data to run it")
    volumes = load_calibration_volumes([path])
    patches = sample_calibration_patches(volumes, make_spec((16, 16, 16)), CalibrationSettings(8, 0, 1.0))
    assert patches.shape == (8, 1, 16, 16, 16)
    assert np.all(patches[:, 0, 8, 8, 8] > 0.25)  # every centre in tissue (> -500 HU)
