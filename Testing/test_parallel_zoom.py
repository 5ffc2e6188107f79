"""nnU-Net preprocessing with the cubic prefilter and the interpolation on every core gives SciPy's and nnunetv2's
arrays bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.ndimage import _interpolation
from skimage.transform import resize

from nnunet_factory import dataset, plans
from PTQLogic.core.volume import Volume
from PTQLogic.inference.nnunet import parallel_zoom as pp
from PTQLogic.inference.nnunet.predict import NnUNetRunner


@pytest.fixture(scope="module")
def big():
    """Larger than the threshold below which the stock functions run (4M voxels), odd sizes on every axis."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(37, 263, 451)) * 300).astype(np.float64)


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("shape", [(19, 120, 233), (41, 160, 300)])  # 0.5M output voxels (not split), 2.0M (split)
def test_zoom_and_resize_are_bit_identical(big, threads, shape):
    stock_zoom = ndimage.zoom(big, np.divide(shape, big.shape), order=3, mode="nearest", grid_mode=True)
    stock_resize = resize(big, shape, order=3, mode="edge", anti_aliasing=False)
    stock_mirror = ndimage.zoom(big, 0.6, order=3, mode="mirror")  # no prepadding: the filter alone is parallel
    with pp.parallel_zoom(threads):
        assert _interpolation.spline_filter is not ndimage.spline_filter  # swapped inside zoom's module only
        assert isinstance(_interpolation._nd_image, pp._SplitInterpolation)
        np.testing.assert_array_equal(
            ndimage.zoom(big, np.divide(shape, big.shape), order=3, mode="nearest", grid_mode=True), stock_zoom)
        np.testing.assert_array_equal(resize(big, shape, order=3, mode="edge", anti_aliasing=False), stock_resize)
        np.testing.assert_array_equal(ndimage.zoom(big, 0.6, order=3, mode="mirror"), stock_mirror)


def test_pieces_equal_scipys(big):
    stock_pad, stock_filter = _interpolation._prepad_for_spline_filter, _interpolation.spline_filter
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        padded, npad = pp.prepad(pool, 4, stock_pad, big, "nearest", 0.0)
        expected, expected_npad = stock_pad(big, "nearest", 0.0)
        assert npad == expected_npad and padded.dtype == expected.dtype
        np.testing.assert_array_equal(padded, expected)
        for order in (2, 3, 5):
            np.testing.assert_array_equal(pp.spline_filter(pool, 4, stock_filter, big, order, np.float64, "nearest"),
                                          stock_filter(big, order, np.float64, "nearest"))
        small = big[:4, :10, :10]  # under the threshold, and other modes: SciPy's own functions
        assert pp.prepad(pool, 4, lambda *a: "stock", small, "nearest", 0.0) == "stock"
        assert pp.prepad(pool, 4, lambda *a: "stock", big, "grid-constant", 0.0) == "stock"


@pytest.mark.parametrize("order, mode, grid_mode", [(0, "reflect", True), (1, "constant", False),
                                                   (3, "mirror", False), (3, "nearest", True),
                                                   (5, "grid-constant", True), (2, "wrap", False)])
def test_interpolation_in_slabs_is_bit_identical(order, mode, grid_mode):
    """Every order, and boundary modes whose edge handling depends on the coordinate: the slabs' coordinates are
    the whole call's. Zooms up and down, odd sizes, float32 and int16 input."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(order)
    volumes = [(rng.normal(size=(23, 41, 37)) * 100).astype(np.float32),
               rng.integers(-900, 900, (31, 17, 29), np.int16)]
    outputs = [(57, 36, 71), (64, 71, 33)]  # 146k and 150k voxels: the threshold set to 0 below
    with ThreadPoolExecutor(3) as pool:
        split = pp._SplitInterpolation(pool, 3, _interpolation._nd_image)
        for volume, shape in zip(volumes, outputs):
            zoom = np.ascontiguousarray(np.divide(volume.shape, shape) if grid_mode
                                        else np.divide(np.subtract(volume.shape, 1), np.subtract(shape, 1)))
            filtered = ndimage.spline_filter(volume, order, np.float64, mode) if order > 1 else volume
            expected, got = np.empty(shape, np.float32), np.full(shape, np.nan, np.float32)
            code = ndimage._ni_support._extend_mode_to_code(mode)
            _interpolation._nd_image.zoom_shift(filtered, zoom, None, expected, order, code, 0.0, 0, grid_mode)
            threshold, pp.MIN_VOXELS = pp.MIN_VOXELS, 0
            try:
                split.zoom_shift(filtered, zoom, None, got, order, code, 0.0, 0, grid_mode)
            finally:
                pp.MIN_VOXELS = threshold
            np.testing.assert_array_equal(got, expected)
            assert np.ptp(expected) > 10  # not a comparison of constants


def test_the_swap_is_undone_even_after_an_error(big):
    stock = (_interpolation.spline_filter, _interpolation._prepad_for_spline_filter, _interpolation._nd_image)
    with pytest.raises(ZeroDivisionError):
        with pp.parallel_zoom(2):
            1 / 0
    assert (_interpolation.spline_filter, _interpolation._prepad_for_spline_filter, _interpolation._nd_image) == stock
    with pp.parallel_zoom(1):  # one thread: nothing swapped
        assert _interpolation.spline_filter is stock[0]


def test_float64_copy_and_ct_normalization_in_slabs_are_bit_identical(big):
    """The image's float64 copy and CT normalization (clip, minus mean, over std: fixed numbers, element by
    element) computed in slabs on several threads give NumPy's and nnunetv2's single-threaded values."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    image = big.astype(np.float32)
    np.testing.assert_array_equal(pp.as_float64(image), image.astype(np.float64))
    assert pp.as_float64(image).dtype == np.float64
    channels_first = image[None, :, ::-1]  # nnU-Net's (1, z, y, x), a strided view: split along its longest axis
    np.testing.assert_array_equal(pp.as_float64(channels_first), channels_first.astype(np.float64))
    seen = []
    pp.in_slabs(lambda slab: seen.append(slab.shape), (channels_first,), threads=3)
    assert len(seen) == 6 and {s[:3] for s in seen} == {(1, 37, 263)} and sum(s[3] for s in seen) == 451
    properties = {"mean": 41.3, "std": 173.9, "percentile_00_5": -702.5, "percentile_99_5": 611.25}
    expected = CTNormalization(intensityproperties=properties).run(image.copy())
    got = image.copy()
    pp.in_slabs(lambda slab: CTNormalization(intensityproperties=properties).run(slab), (got,), threads=3)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, image)  # it did normalize, in place


def test_nnunet_preprocessing_equals_nnunetv2s_own():
    """A CT-like volume of 5M voxels at 0.8x0.8x1.5 mm to the 3 mm grid: PTQLogic's preprocessing (normalization
    and the float64 copy in slabs, parallel prefilter and interpolation, the unused nonzero mask not resampled)
    gives nnunetv2's DefaultPreprocessor's array and properties."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plan = plans([3.0, 3.0, 3.0], [32, 32, 32])
    runner = NnUNetRunner(plan, dataset(["background", "a"]), "3d_fullres")
    rng = np.random.default_rng(1)
    array = np.clip(rng.normal(40, 300, size=(90, 170, 330)), -1024, 3000).astype(np.int16)
    array[:, :20] = 0  # a zero border: cropped, and a mask with two labels that nnunetv2 resamples
    volume = Volume(array=array, ijk_to_ras=np.diag([0.8, 0.8, 1.5, 1.0]))
    data, properties = runner.preprocess(volume)
    manager = PlansManager(plan)
    expected, _, expected_properties = DefaultPreprocessor(verbose=False).run_case_npy(
        array[None].astype(np.float32), None, {"spacing": [1.5, 0.8, 0.8]}, manager,
        manager.get_configuration("3d_fullres"), dataset(["background", "a"]))
    assert data.dtype == expected.dtype and data.shape == expected.shape
    np.testing.assert_array_equal(data, expected)
    assert set(properties) == set(expected_properties)
    for key in properties:
        np.testing.assert_array_equal(np.asarray(properties[key], dtype=object),
                                      np.asarray(expected_properties[key], dtype=object))


def test_preprocess_stage_benchmark_runs_and_compares(tmp_path):
    """benchmarks/nnunet/preprocess_stage.py on a small nnU-Net folder and CT: both rows, identical arrays."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from nnunet_factory import write_folder, write_image

    folder = write_folder(tmp_path / "model", plans([3.0, 3.0, 3.0], [32, 32, 32]), dataset(["background", "a"]))
    array = np.clip(np.random.default_rng(2).normal(40, 300, size=(30, 60, 70)), -1024, 3000).astype(np.int16)
    ct = write_image(Volume(array=array, ijk_to_ras=np.diag([0.8, 0.8, 1.5, 1.0])), tmp_path / "ct.nii.gz")
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nnunet" / "preprocess_stage.py"), "--model",
                          str(folder), "--ct", str(ct), "--repeats", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["identical"] is True and len(result["seconds"]["nnunetv2"]) == len(result["seconds"]["ptqseg"]) == 2
    assert result["network_grid"] == [1, 15, 16, 19] and result["machine"]["cores"] >= 1
