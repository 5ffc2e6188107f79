"""The per-axis resampling gives MONAI's Orientation + Spacing result: same grid, values to float32 rounding,
exact copies where no interpolation is needed; rotated grids still go through MONAI itself."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from PTQLogic.inference.axis_resample import resample_axis_aligned
from PTQLogic.inference.preprocess import _RAS_LABELS, resample_to_network, target_grid
from PTQLogic.core.spec import spec_from_dict
from PTQLogic.core.volume import Volume

FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def monai_reference(volume: Volume, orientation, spacing) -> tuple[torch.Tensor, np.ndarray]:
    """MONAI's transforms as the product used them before: IJK float32, bilinear Spacing in float64."""
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    ijk = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 2, 1).float().contiguous()
    image = MetaTensor(ijk, affine=torch.as_tensor(volume.ijk_to_ras, dtype=torch.float64))
    if orientation:
        image = Orientation(axcodes=orientation, labels=_RAS_LABELS)(image)
    if spacing is not None:
        image = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border", dtype=torch.float64)(image)
    return image.as_tensor().float(), np.asarray(image.affine, dtype=np.float64)


def spec(orientation, spacing, channels=1):
    return spec_from_dict({"name": "t", "architecture": "UNet", "classes": ["bg", "fg"], "patch_size": [8, 8, 8],
                           "in_channels": channels,
                           "preprocessing": {"orientation": orientation, "spacing": spacing, "intensity": "none"}})


@st.composite
def axis_aligned_volumes(draw):
    shape = tuple(draw(st.integers(2, 24)) for _ in range(3))  # K, J, I
    channels = draw(st.sampled_from([1, 2]))
    permutation = draw(st.permutations([0, 1, 2]))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for column, row in enumerate(permutation):
        affine[row, column] = draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(0.4, 4.0))
    affine[:3, 3] = [draw(st.floats(-200, 200)) for _ in range(3)]
    dtype = draw(st.sampled_from([np.int16, np.float32, np.uint8, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    values = rng.integers(0, 255, (channels, *shape)) if dtype == np.uint8 else rng.normal(0, 800, (channels, *shape))
    array = values.astype(dtype)
    return Volume(array=array if channels > 1 else array[0], ijk_to_ras=affine)


@FAST
@given(axis_aligned_volumes(), st.sampled_from(["RAS", "LPS", "PIR", None]),
       st.one_of(st.none(), st.tuples(*[st.floats(0.5, 3.0)] * 3)))
def test_matches_monai_on_axis_aligned_grids(volume, orientation, spacing):
    before = volume.array.copy()
    expected, expected_affine = monai_reference(volume, orientation, spacing)
    got, grid = resample_to_network(volume, spec(orientation, spacing, volume.channels))
    np.testing.assert_allclose(grid.affine, expected_affine, atol=1e-9)
    assert got.dtype == torch.float32 and got.is_contiguous() and tuple(got.shape) == tuple(expected.shape)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(got, expected, atol=2e-6 * scale, rtol=0)
    if spacing is None:  # orientation alone moves voxels without interpolating: an exact copy
        assert torch.equal(got, expected)
    np.testing.assert_array_equal(volume.array, before)


def test_downsampling_a_ct_sized_grid_matches_monai():
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 2000, (40, 96, 96)).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])
    affine[:3, 3] = [150.0, 120.0, -300.0]
    volume = Volume(array=array, ijk_to_ras=affine)
    expected, _ = monai_reference(volume, "RAS", (1.5, 1.5, 1.5))
    got, grid = resample_to_network(volume, spec("RAS", (1.5, 1.5, 1.5)))
    assert grid.shape == tuple(expected.shape[1:]) == (52, 52, 40)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)  # HU values: float32 rounding of ~2000


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["ras", "flipped"])
def test_slices_within_monais_tolerance_are_copied_as_monai_does(sign):
    """MONAI's Spacing leaves the oriented image alone when its own transform is within 1e-3 of the identity
    (2.5015 mm slices for a 2.5 mm target); flipped in-plane axes (DICOM's LPS) must not hide that
    (found in review: interpolated instead, up to 758 HU off)."""
    array = np.random.default_rng(0).normal(0, 1000, (200, 16, 16)).astype(np.float32)
    volume = Volume(array=array, ijk_to_ras=np.diag([sign * 1.5, sign * 1.5, 2.5015, 1.0]))
    expected, expected_affine = monai_reference(volume, "RAS", (1.5, 1.5, 2.5))
    got, grid = resample_to_network(volume, spec("RAS", (1.5, 1.5, 2.5)))
    np.testing.assert_allclose(grid.affine, expected_affine, rtol=0, atol=1e-9)
    assert torch.equal(got, expected)


def test_rotated_grid_is_left_to_monai():
    angle = 0.3
    xform = np.eye(4)
    xform[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert resample_axis_aligned(torch.zeros(1, 4, 4, 4), xform, (4, 4, 4)) is None


def test_target_grid_is_monais_without_touching_voxels():
    volume = Volume(array=np.zeros((30, 40, 50), np.int16), ijk_to_ras=np.diag([-0.7, 0.9, 2.0, 1.0]))
    affine, shape = target_grid(volume, spec("RAS", (1.0, 1.0, 1.0)).preprocessing)
    expected, expected_affine = monai_reference(volume, "RAS", (1.0, 1.0, 1.0))
    np.testing.assert_allclose(affine, expected_affine)
    assert shape == tuple(expected.shape[1:])


@pytest.mark.parametrize("writeable", [True, False])
def test_read_only_input_is_read_without_warnings_or_writes(writeable):
    array = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    array.setflags(write=writeable)
    volume = Volume(array=array, ijk_to_ras=np.diag([2.0, 2.0, 2.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = resample_to_network(volume, spec("RAS", None))
    got += 1.0  # the result is the caller's to change: never a view of the input
    np.testing.assert_array_equal(array, np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32))


@pytest.mark.parametrize("scan", ["example_ct_sm.nii.gz", "example_mr_sm.nii.gz"])
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (0.8, 1.3, 2.2)])
def test_real_scans_match_monai(shared_data, scan, spacing):
    from PTQLogic.io.volumes import read_volume

    volume = read_volume(shared_data / scan)
    expected, expected_affine = monai_reference(volume, "RAS", spacing)
    got, grid = resample_to_network(volume, spec("RAS", spacing))
    np.testing.assert_allclose(grid.affine, expected_affine, atol=1e-9)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)  # int16 HU/MR values, float32 rounding


@pytest.mark.parametrize("preprocessing", [
    {"intensity": "zscore"},
    {"intensity": "none", "steps": [{"transform": "NormalizeIntensity", "nonzero": True}]},
])
def test_zero_masking_intensity_keeps_monais_exact_zeros(shared_data, preprocessing):
    """MONAI's float64 grid writes ~1e-11 next to 0-valued voxels where the exact value is 0; a nonzero mask
    counts those, so specs with one keep MONAI's resampling and get MONAI's values bit for bit."""
    from PTQLogic.io.volumes import read_volume

    volume = read_volume(shared_data / "example_mr_sm.nii.gz")
    model = spec_from_dict({"name": "t", "architecture": "UNet", "classes": ["bg", "fg"], "patch_size": [8, 8, 8],
                            "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], **preprocessing}})
    expected, _ = monai_reference(volume, "RAS", (1.5, 1.5, 1.5))
    got, _ = resample_to_network(volume, model)
    assert torch.equal(got, expected)
    fast = resample_to_network(volume, spec("RAS", (1.5, 1.5, 1.5)))[0]  # the per-axis path on the same scan
    assert not torch.equal(fast == 0, expected == 0)  # why: its exact zeros are not MONAI's
