"""nnU-Net parity: the project's FP32 path gives nnU-Net's own predictor's label maps on folders in
nnU-Net's exact on-disk format (isotropic CT, anisotropic z-scored MR-like with a zero border, 2-fold ensemble)."""
from __future__ import annotations

import contextlib
import io
import os

os.environ.setdefault("nnUNet_def_n_proc", "1")  # nnU-Net's thread count for its own steps (before it is imported)

import numpy as np
import pytest
import torch

from nnunet_factory import architecture, dataset, one_thread, plans, write_folder, write_image  # noqa: F401 (autouse fixture)
from PTQLogic.engines.torch_engine import TorchEngine
from PTQLogic.io.volumes import read_volume
from PTQLogic.inference.nnunet.predict import runner_for
from PTQLogic.models.nnunet.model_dir import open_nnunet_model
from PTQLogic.samples.phantom import make_phantom
from PTQLogic.core.volume import Volume

LABELS = ["background", "liver", "spleen", "kidney_right"]


def nnunet_reference(folder, image_file, folds, mirroring=False, step=0.5):
    """nnU-Net's own predictor, exactly as its docs use it (SimpleITKIO + predict_single_npy_array)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=mirroring,
                                    device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), folds, "checkpoint_final.pth")
        data, properties = SimpleITKIO().read_images([str(image_file)])
        return predictor.predict_single_npy_array(data, properties, None, None, True)


class _OneBuffer:
    """A real engine that, as OpenVINO's does, also offers ``forward_transient``: each result written into one
    buffer that the next call overwrites."""

    def __init__(self, engine):
        self.engine, self.device, self.buffer = engine, engine.device, None

    def __call__(self, x):
        return self.engine(x)

    def forward_transient(self, x):
        y = self.engine(x)
        if self.buffer is None or self.buffer.shape != y.shape:
            self.buffer = torch.empty_like(y)
        return self.buffer.copy_(y)


def ours(folder, image_file, mirroring=False, step=0.5, one_buffer=False):
    model = open_nnunet_model(folder)
    model.step_size = step
    engines = [TorchEngine(net, "fp32", device="cpu") for net in model.networks]
    engines = [_OneBuffer(e) for e in engines] if one_buffer else engines
    return runner_for(model).predict(read_volume(image_file), engines, mirroring=mirroring, return_probabilities=True)


def assert_same(reference, result):
    seg, probabilities = reference
    assert result.labels.shape == seg.shape
    assert np.array_equal(result.labels, seg), f"{np.mean(result.labels != seg):.2%} voxels differ from nnU-Net"
    np.testing.assert_allclose(result.probabilities, probabilities, atol=1e-5)
    assert len(np.unique(seg)) >= 3  # the comparison is not between two empty maps


def test_isotropic_ct_matches_nnunet_predictor(tmp_path):
    image, _ = make_phantom(3, (36, 40, 44), (1.2, 1.2, 1.6))
    image_file = write_image(image, tmp_path / "case_0000.nii.gz")
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(LABELS))
    result = ours(folder, image_file)
    reference = nnunet_reference(folder, image_file, (0,))
    assert_same(reference, result)
    assert_same(reference, ours(folder, image_file, one_buffer=True))  # logits read from the engine's buffer
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window((38, 32, 35), (32, 32, 32), 0.5)  # the 1.5 mm grid of this image
    assert result.patches == np.prod([len(s) for s in steps]) == 4


def test_mirroring_matches_nnunet_predictor(tmp_path):
    image, _ = make_phantom(4, (18, 20, 20), (1.5, 1.5, 1.5))
    image_file = write_image(image, tmp_path / "case_0000.nii.gz")
    arch = architecture(features=(4, 8), strides=((1, 1, 1), (2, 2, 2)), kernels=((3, 3, 3),) * 2)
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [16, 16, 16], arch=arch), dataset(LABELS), seed=7)
    result = ours(folder, image_file, mirroring=True)
    reference = nnunet_reference(folder, image_file, (0,), mirroring=True)
    assert_same(reference, result)
    # an engine offering its own output buffer: mirroring sums into the first window's logits, so they are copied
    assert_same(reference, ours(folder, image_file, mirroring=True, one_buffer=True))
    assert result.patches == 8 * 8  # 8 windows x (1 + 7 flips over the 3 allowed axes)


def test_step_size_08_matches_nnunet_predictor(tmp_path):
    """TotalSegmentator runs "total" with step size 0.8."""
    image, _ = make_phantom(8, (26, 30, 30), (1.5, 1.5, 1.5))
    image_file = write_image(image, tmp_path / "case_0000.nii.gz")
    arch = architecture(features=(4, 8), strides=((1, 1, 1), (2, 2, 2)), kernels=((3, 3, 3),) * 2)
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [16, 16, 16], arch=arch), dataset(LABELS), seed=2)
    result = ours(folder, image_file, step=0.8)
    assert_same(nnunet_reference(folder, image_file, (0,), step=0.8), result)
    assert result.patches < ours(folder, image_file).patches


def test_anisotropic_zscore_with_border_matches_nnunet_predictor(tmp_path):
    """Thick slices along I (x): transpose_forward moves it first, resampling uses separate z (order_z 0);
    z-score with use_mask_for_norm and a zero border exercises crop-to-nonzero and the mask."""
    image, _ = make_phantom(5, (36, 40, 14), (4.0, 1.1, 1.1))
    array = image.array.astype(np.float32) + 1100.0
    array[:, :3, :] = 0.0
    array[:2] = 0.0
    image = Volume(array, image.ijk_to_ras)
    image_file = write_image(image, tmp_path / "case_0000.nii.gz")
    arch = architecture(strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)))
    plan = plans([4.0, 1.3, 1.3], [16, 32, 32], transpose_forward=(2, 0, 1), norm="ZScoreNormalization",
                 use_mask_for_norm=True, arch=arch)
    assert plan["transpose_backward"] == [1, 2, 0]
    folder = write_folder(tmp_path, plan, dataset(LABELS, channel="T1"), seed=3)
    assert_same(nnunet_reference(folder, image_file, (0,)), ours(folder, image_file))


def test_isotropic_plan_with_thick_slices_and_transposed_axes_matches_nnunet_predictor(tmp_path):
    """An isotropic plan with transpose_forward (2, 0, 1) and 3.5 mm slices: the export back to the input grid
    resamples separately along the thick axis, which only the input spacing in the network's axis order names
    (transpose_backward there instead gave 64% agreement)."""
    image, _ = make_phantom(11, (12, 40, 44), (1.0, 1.1, 3.5))
    image_file = write_image(image, tmp_path / "case_0000.nii.gz")
    arch = architecture(features=(4, 8), strides=((1, 1, 1), (2, 2, 2)), kernels=((3, 3, 3),) * 2)
    plan = plans([1.5, 1.5, 1.5], [16, 16, 16], transpose_forward=(2, 0, 1), arch=arch)
    assert plan["transpose_backward"] != plan["transpose_forward"]
    folder = write_folder(tmp_path, plan, dataset(LABELS), seed=6)
    result = ours(folder, image_file)
    assert_same(nnunet_reference(folder, image_file, (0,)), result)
    assert result.labels.shape == image.array.shape


def test_two_fold_ensemble_matches_nnunet_predictor(tmp_path):
    image, _ = make_phantom(6, (32, 36, 40), (1.5, 1.5, 1.5))
    image_file = write_image(image, tmp_path / "case_0000.nii.gz")
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(LABELS), folds=(0, 1))
    result = ours(folder, image_file)
    assert len(open_nnunet_model(folder).networks) == 2
    assert_same(nnunet_reference(folder, image_file, (0, 1)), result)
    single = ours(write_folder(tmp_path / "one", plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(LABELS)), image_file)
    assert not np.array_equal(single.labels, result.labels)  # the second fold really took part


def test_residual_encoder_unet_matches_nnunet_predictor(tmp_path):
    """ResEnc presets (nnUNetResEncUNetM/L/XLPlans) use ResidualEncoderUNet."""
    image, _ = make_phantom(9, (22, 24, 24), (1.5, 1.5, 1.5))
    image_file = write_image(image, tmp_path / "case_0000.nii.gz")
    arch = architecture(features=(4, 8), strides=((1, 1, 1), (2, 2, 2)), kernels=((3, 3, 3),) * 2, residual=True)
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [16, 16, 16], arch=arch), dataset(LABELS), seed=4)
    assert_same(nnunet_reference(folder, image_file, (0,)), ours(folder, image_file))


@pytest.mark.parametrize("residual", [False, True])
def test_network_built_from_plans_is_nnunets(tmp_path, residual):
    """Same module tree and outputs as nnU-Net's get_network_from_plans (pydoc.locate) for both classes."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from PTQLogic.models.nnunet.network import build_network

    arch = architecture(residual=residual)
    ref = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                 allow_init=True, deep_supervision=False).eval()
    mine = build_network(arch, 1, 3)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(mine(x), ref(x))
    assert type(mine) is type(ref)


def test_real_ct_matches_nnunet_predictor(tmp_path, shared_data):
    """TotalSegmentator's example CT (LPS-like direction, 3 mm) through a 4.5 mm in-plane plan."""
    arch = architecture(strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)))
    folder = write_folder(tmp_path, plans([3.0, 4.5, 4.5], [16, 64, 64], arch=arch), dataset(LABELS), seed=5)
    image_file = shared_data / "example_ct_sm.nii.gz"
    result = ours(folder, image_file)
    assert_same(nnunet_reference(folder, image_file, (0,)), result)
    assert result.labels.shape == read_volume(image_file).array.shape
