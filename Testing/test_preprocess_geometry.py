"""Network space <-> input grid: objects defined in RAS land where they belong, and come back exactly."""
from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

from PTQLogic.core.errors import InputError
from PTQLogic.io.volumes import read_volume
from PTQLogic.inference.preprocess import NetworkGrid, labels_to_input_grid, to_network_space
from PTQLogic.core.spec import spec_from_dict
from PTQLogic.core.volume import Volume

torch.set_num_threads(1)
CENTRE = np.array([3.0, -4.0, 5.0])  # RAS mm
RADIUS = 9.0


def make_spec(spacing=None, orientation="RAS", intensity="ct", in_channels=1):
    return spec_from_dict({
        "name": "t", "architecture": "UNet", "classes": ["bg", "fg"], "patch_size": [16, 16, 16],
        "in_channels": in_channels,
        "preprocessing": {"orientation": orientation, "spacing": spacing, "intensity": intensity},
    })


def rotation(angle_z=0.4, angle_x=-0.25) -> np.ndarray:
    cz, sz, cx, sx = np.cos(angle_z), np.sin(angle_z), np.cos(angle_x), np.sin(angle_x)
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


def grid_matrix(linear: np.ndarray, shape_kji) -> np.ndarray:
    """IJK-to-RAS with the given 3x3 whose grid centre sits at CENTRE (so the sphere is inside)."""
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    middle = (np.array(shape_kji[::-1]) - 1) / 2
    matrix[:3, 3] = CENTRE + np.array([0.7, -0.3, 0.4]) - linear @ middle
    return matrix


def ras_of_voxels(matrix: np.ndarray, shape_kji) -> np.ndarray:
    """(K, J, I, 3) RAS coordinates of every voxel centre of a KJI grid."""
    k, j, i = np.meshgrid(*[np.arange(s) for s in shape_kji], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]


def sphere_truth(matrix, shape_kji) -> np.ndarray:
    return np.linalg.norm(ras_of_voxels(matrix, shape_kji) - CENTRE, axis=-1) <= RADIUS


def sphere_volume(matrix, shape_kji) -> Volume:
    truth = sphere_truth(matrix, shape_kji)
    return Volume(np.where(truth, 1000, -1000).astype(np.int16), matrix)


def push_and_back(volume: Volume, spec):
    image, grid = to_network_space(volume, spec)
    labels = (image[0] > 0.5).numpy().astype(np.uint8)
    return labels, grid, labels_to_input_grid(labels, grid)


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


SHAPE = (10, 26, 22)  # K, J, I
CASES = {
    "anisotropic_lps": np.diag([-0.9, -1.1, 2.5]),
    "oblique": rotation() @ np.diag([0.9, 1.1, 2.5]),
    "permuted_axes": np.array([[0, 0, -2.5], [1.1, 0, 0], [0, -0.9, 0]]),  # I along S, J along R, K along -A
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_spacing_round_trip_is_exact(case):
    volume = sphere_volume(grid_matrix(CASES[case], SHAPE), SHAPE)
    original = volume.array.copy()
    labels, grid, back = push_and_back(volume, make_spec())
    assert back.shape == SHAPE and back.dtype == np.uint8
    np.testing.assert_array_equal(back, volume.array > 0)
    np.testing.assert_array_equal(volume.array, original)
    # the network grid is RAS-ordered: its columns point mostly along +R, +A, +S
    assert np.all(np.argmax(np.abs(grid.affine[:3, :3]), axis=0) == [0, 1, 2])
    assert np.all(np.diag(grid.affine[:3, :3]) > 0)
    # and the object sits at the right physical place in network space
    net_truth = np.linalg.norm(ras_of_voxels(grid.affine, labels.shape[::-1]) - CENTRE, axis=-1) <= RADIUS
    np.testing.assert_array_equal(labels.transpose(2, 1, 0), net_truth)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resampled_round_trip_matches_physical_truth(case):
    volume = sphere_volume(grid_matrix(CASES[case], SHAPE), SHAPE)
    labels, grid, back = push_and_back(volume, make_spec(spacing=(1.5, 1.5, 1.5)))
    np.testing.assert_allclose(np.linalg.norm(grid.affine[:3, :3], axis=0), 1.5, atol=1e-6)
    net_truth = np.linalg.norm(ras_of_voxels(grid.affine, labels.shape[::-1]) - CENTRE, axis=-1) <= RADIUS
    assert dice(labels.transpose(2, 1, 0), net_truth) > 0.93
    assert back.shape == SHAPE
    truth = volume.array > 0
    assert dice(back > 0, truth) > 0.93
    centroid = ras_of_voxels(volume.ijk_to_ras, SHAPE)[back > 0].mean(axis=0)
    assert np.linalg.norm(centroid - CENTRE) < 0.5


def test_files_stored_in_lps_and_ras_round_trip(tmp_path):
    matrix = grid_matrix(rotation(0.2, 0.1) @ np.diag([1.0, 1.3, 2.0]), SHAPE)
    volume = sphere_volume(matrix, SHAPE)
    data_ijk = volume.array.transpose(2, 1, 0)
    lps = np.diag([-1.0, -1.0, 1.0])
    nrrd.write(str(tmp_path / "lps.nrrd"), data_ijk, {"space": "left-posterior-superior",
               "space directions": (lps @ matrix[:3, :3]).T, "space origin": lps @ matrix[:3, 3]})
    nrrd.write(str(tmp_path / "ras.nrrd"), data_ijk, {"space": "right-anterior-superior",
               "space directions": matrix[:3, :3].T, "space origin": matrix[:3, 3]})
    nib.save(nib.Nifti1Image(data_ijk, matrix), tmp_path / "ras.nii.gz")
    for name in ("lps.nrrd", "ras.nrrd", "ras.nii.gz"):
        loaded = read_volume(tmp_path / name)
        np.testing.assert_allclose(loaded.ijk_to_ras, matrix, atol=1e-4)
        _, _, back = push_and_back(loaded, make_spec())
        np.testing.assert_array_equal(back, volume.array > 0)
        _, _, back = push_and_back(loaded, make_spec(spacing=(2.0, 2.0, 2.0)))
        assert back.shape == SHAPE and dice(back > 0, volume.array > 0) > 0.9


def test_marker_lands_at_its_ras_point():
    # axis-aligned LPS grid (as ITK/DICOM store it): I runs towards Left, J towards Posterior
    matrix = np.array([[-0.8, 0, 0, 40.0], [0, -1.2, 0, 30.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
    array = np.full((5, 7, 9), -1000, dtype=np.int16)
    array[3, 2, 1] = 500  # K=3, J=2, I=1
    point = matrix @ [1, 2, 3, 1]
    image, grid = to_network_space(Volume(array, matrix), make_spec())
    assert tuple(image.shape) == (1, 9, 7, 5)
    np.testing.assert_allclose(np.diag(grid.affine)[:3], [0.8, 1.2, 2.0])
    index = np.unravel_index(int(torch.argmax(image[0])), image.shape[1:])
    assert index == (9 - 1 - 1, 7 - 1 - 2, 3)  # I and J flipped to run towards R and A
    np.testing.assert_allclose(grid.affine @ [*index, 1], point, atol=1e-9)
    assert float(image[0][index]) == pytest.approx(0.75)  # (500 + 1000) / 2000


def test_pure_permutation_is_bit_exact_for_random_labels():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, size=(6, 8, 5)).astype(np.uint8)
    matrix = grid_matrix(np.array([[0, -1.5, 0], [0, 0, 2.0], [-0.7, 0, 0]]), labels.shape)
    for orientation in ("RAS", "LPI", "SAR", None):
        image, grid = to_network_space(Volume(labels, matrix), make_spec(orientation=orientation, intensity="none"))
        back = labels_to_input_grid(image[0].numpy().astype(np.uint8), grid)
        np.testing.assert_array_equal(back, labels)


def test_intensity_modes_and_channel_check():
    array = np.zeros((2, 4, 4, 4), dtype=np.float32)
    array[0, 1:3, 1:3, 1:3] = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    array[1] = 50.0
    image, _ = to_network_space(Volume(array, np.eye(4)), make_spec(intensity="zscore", in_channels=2))
    nonzero = image[0][image[0] != 0]
    assert nonzero.numel() == 8 and abs(float(nonzero.mean())) < 1e-6
    assert float(nonzero.std(unbiased=False)) == pytest.approx(1, abs=1e-5)
    assert torch.all(image[1] == 0)  # constant channel -> 0 after centring
    ct = Volume(np.array([[[-2000, -1000], [0, 3000]]] * 2, dtype=np.int16), np.eye(4))
    image, _ = to_network_space(ct, make_spec())
    assert sorted(set(image.flatten().tolist())) == [0.0, 0.5, 1.0]
    with pytest.raises(InputError, match="2 channel.*expects 1"):
        to_network_space(Volume(array, np.eye(4)), make_spec())


@pytest.mark.parametrize("tilt", [0.0, 1e-3])  # axis-aligned path and general (oblique) path
def test_labels_outside_the_network_grid_become_background(tilt):
    labels = np.random.default_rng(4).integers(1, 9, size=(6, 5, 4)).astype(np.uint8)  # network I, J, K
    network = np.eye(4)
    network[0, 3] = 2.0  # network voxel 0 sits at input i = 2
    c, s = np.cos(tilt), np.sin(tilt)
    input_matrix = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    grid = NetworkGrid(network, (6, 5, 4), input_matrix, (4, 5, 10))
    back = labels_to_input_grid(labels, grid)
    expected = np.zeros((4, 5, 10), np.uint8)
    expected[:, :, 2:8] = labels.transpose(2, 1, 0)
    np.testing.assert_array_equal(back, expected)
    with pytest.raises(InputError, match="network grid"):
        labels_to_input_grid(labels[:5], grid)
