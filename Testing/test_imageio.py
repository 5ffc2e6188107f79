"""Reading/writing volumes: geometry (LPS files -> RAS matrix), round trips, DICOM series, clear errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from PTQLogic.core.errors import InputError
from PTQLogic.io.volumes import label_table_paths, read_volume, write_label_table, write_labelmap
from PTQLogic.core.spec import ClassInfo
from PTQLogic.core.volume import Volume

from dicom_series import write_dicom_series
from conftest import DATA_ENV, SHARED_DATA as DATA  # noqa: E402 - $PTQSEG_TEST_DATA or ../shared/data


def oblique_ras(spacing=(0.8, 1.2, 2.5), angle=0.3, origin=(-12.5, 30.25, 7.0)) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def test_nifti_matches_nibabel(tmp_path):
    affine = oblique_ras()
    data = np.random.default_rng(0).integers(-1000, 1000, size=(7, 6, 5)).astype(np.int16)  # (I, J, K)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    volume = read_volume(tmp_path / "a.nii.gz")
    assert volume.array.shape == (5, 6, 7)
    np.testing.assert_array_equal(volume.array, data.transpose(2, 1, 0))
    np.testing.assert_allclose(volume.ijk_to_ras, affine, atol=1e-5)


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
def test_nrrd_spaces_give_the_same_ras_matrix(tmp_path, space):
    ras = oblique_ras()
    to_space = np.diag([-1, -1, 1]) if space.startswith("left") else np.eye(3)
    header = {"space": space, "space directions": (to_space @ ras[:3, :3]).T, "space origin": to_space @ ras[:3, 3]}
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # pynrrd: (I, J, K) in Fortran order
    nrrd.write(str(tmp_path / "a.nrrd"), data, header)
    volume = read_volume(tmp_path / "a.nrrd")
    np.testing.assert_allclose(volume.ijk_to_ras, ras, atol=1e-6)
    np.testing.assert_array_equal(volume.array, data.transpose(2, 1, 0))


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.nrrd", "out.mha"])
def test_labelmap_round_trip(tmp_path, name):
    labels = np.random.default_rng(1).integers(0, 6, size=(4, 5, 6)).astype(np.uint8)
    matrix = oblique_ras()
    write_labelmap(Volume(labels, matrix), tmp_path / name)
    back = read_volume(tmp_path / name)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.ijk_to_ras, matrix, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left behind


def test_labelmap_uint16_and_rejects_bad_labels(tmp_path):
    labels = np.zeros((3, 3, 3), dtype=np.int32)
    labels[1, 1, 1] = 300
    write_labelmap(Volume(labels, np.eye(4)), tmp_path / "big.nrrd")
    assert read_volume(tmp_path / "big.nrrd").array.dtype == np.uint16
    labels[0, 0, 0] = -1
    with pytest.raises(InputError, match="0..65535"):
        write_labelmap(Volume(labels, np.eye(4)), tmp_path / "neg.nrrd")
    with pytest.raises(InputError, match="use one of"):
        write_labelmap(Volume(np.zeros((3, 3, 3), np.uint8), np.eye(4)), tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nrrd"]


def test_real_ct_round_trip(tmp_path):
    path = DATA / "example_ct_sm.nii.gz"
    if not path.exists():
        pytest.skip(f"real data not found in {DATA}; set {DATA_ENV}=/path/to/data to run it")
    volume = read_volume(path)
    reference = nib.load(path)
    np.testing.assert_allclose(volume.ijk_to_ras, reference.affine, atol=1e-5)
    assert volume.array.shape == reference.shape[::-1]
    labels = Volume((volume.array > 0).astype(np.uint8), volume.ijk_to_ras)
    write_labelmap(labels, tmp_path / "seg.nii.gz")
    back = read_volume(tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(back.array, labels.array)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-5)


def _write_dicom_series(folder: Path, uid: str, slices: int = 4) -> None:
    planes = np.stack([np.full((6, 5), 10 * k, dtype=np.int16) for k in range(slices)])
    write_dicom_series(planes, folder, uid, spacing=(0.7, 0.9, 2.5), origin=(-10, -20))


def test_dicom_series_folder(tmp_path):
    _write_dicom_series(tmp_path / "one", "1.2.3.4")
    volume = read_volume(tmp_path / "one")
    assert volume.array.shape == (4, 6, 5)
    assert [int(volume.array[k, 0, 0]) for k in range(4)] == [0, 10, 20, 30]
    np.testing.assert_allclose(volume.spacing, (0.7, 0.9, 2.5), atol=1e-4)
    np.testing.assert_allclose(volume.ijk_to_ras[:3, 3], (10, 20, 0), atol=1e-4)  # LPS (-10,-20,0) -> RAS

    _write_dicom_series(tmp_path / "one", "1.2.3.5")
    with pytest.raises(InputError, match="2 DICOM series") as error:
        read_volume(tmp_path / "one")
    assert "1.2.3.4" in str(error.value) and "1.2.3.5" in str(error.value)


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_text("not an image")
    with pytest.raises(InputError, match="Could not read"):
        read_volume(tmp_path / "junk.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path / "empty")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.uint8)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="2D"):
        read_volume(tmp_path / "flat.nrrd")
    series = np.zeros((4, 4, 4, 20), np.float32)
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "fmri.nii.gz")
    with pytest.raises(InputError, match="20 volumes"):
        read_volume(tmp_path / "fmri.nii.gz")


def test_four_d_with_few_volumes_reads_as_channels(tmp_path):
    data = np.random.default_rng(2).random((4, 5, 6, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "mm.nii.gz")
    volume = read_volume(tmp_path / "mm.nii.gz")
    assert volume.channels == 2 and volume.spatial_shape == (6, 5, 4)
    np.testing.assert_array_equal(volume.array[1], data[..., 1].transpose(2, 1, 0))
    np.testing.assert_allclose(volume.ijk_to_ras, np.diag([2.0, 2.0, 3.0, 1.0]), atol=1e-6)


def test_label_tables(tmp_path):
    classes = [ClassInfo("background", (0, 0, 0)), ClassInfo("liver", (221, 130, 101))]
    json_path, csv_path = label_table_paths(tmp_path / "case.seg.nii.gz")
    assert (json_path.name, csv_path.name) == ("case.seg.nii.gz.labels.json", "case.seg.nii.gz.labels.csv")
    assert label_table_paths("x/labels.nrrd")[0] == Path("x/labels.nrrd.labels.json")
    write_label_table(classes, json_path)
    write_label_table(classes, csv_path)
    assert json.loads(json_path.read_text())["labels"][1] == {"value": 1, "name": "liver", "color": [221, 130, 101]}
    rows = list(csv.reader(csv_path.open()))
    assert rows == [["value", "name", "r", "g", "b"], ["0", "background", "0", "0", "0"],
                    ["1", "liver", "221", "130", "101"]]
    with pytest.raises(InputError, match=".json or .csv"):
        write_label_table(classes, tmp_path / "t.txt")
