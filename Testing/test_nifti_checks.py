"""The NIfTI checks ITK does not make (cut-off or damaged files, NaN/infinite voxels): one streaming pass
over the stored bytes, run beside ITK's read, that finds every bad voxel wherever the blocks fall."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from PTQLogic.io import volumes as imageio
from PTQLogic.core.errors import InputError
from PTQLogic.io.volumes import read_volume, to_sitk_image


def _write(array: np.ndarray, path):
    sitk.WriteImage(to_sitk_image(array, np.diag([1.5, 1.5, 2.0, 1.0])), str(path), path.name.endswith(".gz"))
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("block", [1 << 22, 1001, 4])  # 1001: voxels cut across blocks; 4: one float32 a block
def test_every_bad_voxel_is_found_and_clean_floats_pass(tmp_path, monkeypatch, suffix, block):
    monkeypatch.setattr(imageio, "_CHECK_BLOCK", block)
    clean = np.random.default_rng(0).normal(size=(6, 7, 9) if block == 4 else (20, 30, 40)).astype(np.float32)
    assert np.array_equal(read_volume(_write(clean, tmp_path / f"clean{suffix}")).array, clean)
    bad = clean.copy()
    bad.flat[0], bad.flat[bad.size // 2 + 1], bad.flat[-1] = np.nan, np.inf, -np.inf  # first, middle, last voxel
    with pytest.raises(InputError, match="has 3 NaN/infinite voxels"):
        read_volume(_write(bad, tmp_path / f"bad{suffix}"))


def test_float64_and_integer_volumes(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio, "_CHECK_BLOCK", 1001)
    doubles = np.random.default_rng(1).normal(size=(10, 11, 12))
    doubles[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="has 1 NaN/infinite voxels"):
        read_volume(_write(doubles, tmp_path / "d.nii.gz"))
    ints = np.arange(10 * 11 * 12, dtype=np.int16).reshape(10, 11, 12)
    assert np.array_equal(read_volume(_write(ints, tmp_path / "i.nii.gz")).array, ints)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_cut_off_and_damaged_files_are_refused(tmp_path, suffix):
    path = _write(np.random.default_rng(2).normal(size=(20, 30, 40)).astype(np.float32), tmp_path / f"v{suffix}")
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated"):
        read_volume(cut)
    if suffix == ".nii.gz":  # one flipped byte in the compressed stream
        flipped = bytearray(data)
        flipped[-500] ^= 0x55
        (tmp_path / "flip.nii.gz").write_bytes(bytes(flipped))
        with pytest.raises(InputError, match="truncated or damaged"):  # CRC or stream error
            imageio._check_nifti(tmp_path / "flip.nii.gz")
        with pytest.raises(InputError, match="damaged"):  # by the check, or by ITK when it cannot read it at all
            read_volume(tmp_path / "flip.nii.gz")


def test_bytes_after_the_voxels_are_not_voxels(tmp_path):
    clean = np.random.default_rng(3).normal(size=(8, 9, 10)).astype(np.float32)
    path = _write(clean, tmp_path / "tail.nii")
    path.write_bytes(path.read_bytes() + np.full(4, np.nan, np.float32).tobytes())  # trailing NaN-looking bytes
    assert np.array_equal(read_volume(path).array, clean)
