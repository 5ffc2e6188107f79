"""The device-resident pipeline (PTQLogic.inference.resident) against the CPU path, run on CPU tensors.

The same torch code runs on a GPU; here it must reproduce the CPU path: preprocessing exactly,
MONAI's sliding-window argmax, the nearest-neighbour way back, and whole-volume labels of the
shipped sample models (agreement >= 0.999).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from PTQLogic.samples.phantom import make_phantom
from PTQLogic.inference.preprocess import labels_to_input_grid, to_network_space
from PTQLogic.inference.resident import labels_to_input_grid_on, to_network_space_on
from PTQLogic.inference.sliding_window import sliding_window_labels
from PTQLogic.core.spec import Preprocessing, load_spec
from PTQLogic.core.volume import Volume
from conftest import ROOT, SAMPLE_UNET

# CPU tensors everywhere; the GPU machine runs every case on CUDA too (the path the product takes there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rotated(volume: Volume, degrees: float = 20.0) -> Volume:
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return Volume(volume.array, rotation @ volume.ijk_to_ras)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotate", [False, True])
def test_preprocessing_matches_cpu_path(rotate, device):
    spec = load_spec(SAMPLE_UNET)
    image, _ = make_phantom(3, shape=(30, 40, 36), spacing=(1.1, 0.9, 2.0))
    volume = _rotated(image) if rotate else image
    expected, grid = to_network_space(volume, spec)
    got, got_grid = to_network_space_on(volume, spec, device)
    assert got.device.type == device and got.shape == expected.shape and got_grid.shape == grid.shape
    np.testing.assert_allclose(got_grid.affine, grid.affine)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    assert got.std() > 0.1  # real content, not an empty image


@pytest.mark.parametrize("device", DEVICES)
def test_zscore_multichannel_preprocessing_matches(device):
    spec = load_spec(SAMPLE_UNET)
    spec = replace(spec, in_channels=2, preprocessing=Preprocessing(orientation="LPS", spacing=(1.3, 1.3, 1.3),
                                                                     intensity="zscore"))
    image, _ = make_phantom(4, shape=(24, 28, 26))
    array = np.stack([image.array, np.where(image.array > 0, image.array, 0)]).astype(np.float32)
    volume = Volume(array, image.ijk_to_ras)
    expected, _ = to_network_space(volume, spec)
    got, _ = to_network_space_on(volume, spec, device)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


class _RandomNet(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Tanh(),
                                        torch.nn.Conv3d(8, classes, 3, padding=1))

    def forward(self, x):
        return self.conv(x) * 3.0


@pytest.mark.parametrize("shape,roi,overlap,mode,batch", [
    ((70, 30, 26), (16, 16, 16), 0.5, "gaussian", 4),  # many slabs: the ring buffer wraps often
    ((40, 12, 33), (16, 16, 16), 0.25, "constant", 3),  # one axis smaller than the window: padding
    ((16, 20, 18), (16, 16, 16), 0.5, "gaussian", 1),
])
@pytest.mark.parametrize("device", DEVICES)
def test_device_layout_of_the_sliding_window_matches_monai(shape, roi, overlap, mode, batch, device):
    from monai.inferers import sliding_window_inference

    net = _RandomNet(5).eval()
    image = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = sliding_window_inference(image[None], roi, batch, net, overlap=overlap, mode=mode)[0].argmax(0)
        cpu_layout = sliding_window_labels(image, net, roi, 5, overlap=overlap, mode=mode, batch_size=batch)
        # the GPU path's ring (channels-first, optionally float16), on ``device``
        on_device, device_net = image.to(device), net.to(device)
        labels = sliding_window_labels(on_device, device_net, roi, 5, overlap=overlap, mode=mode, batch_size=batch,
                                       channels_last=False)
        half = sliding_window_labels(on_device, device_net, roi, 5, overlap=overlap, mode=mode, batch_size=batch,
                                     accumulate=torch.float16, channels_last=False)
    assert labels.device.type == device and labels.shape == shape and labels.dtype == torch.uint8
    labels, half = labels.cpu(), half.cpu()
    assert len(torch.unique(reference)) == 5
    assert (labels.long() == reference).float().mean() >= 0.999
    assert (half.long() == reference).float().mean() >= 0.99
    if device == "cpu":  # one loop, two ring layouts: the same sums in the same order
        assert torch.equal(labels, cpu_layout)
    else:
        assert (labels == cpu_layout).float().mean() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotate", [False, True])
def test_labels_back_to_input_grid_match(rotate, device):
    spec = load_spec(SAMPLE_UNET)
    image, _ = make_phantom(5, shape=(30, 40, 36), spacing=(1.1, 0.9, 2.0))
    volume = _rotated(image) if rotate else image
    _, grid = to_network_space(volume, spec)
    labels = torch.randint(0, 7, grid.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    expected = labels_to_input_grid(labels.numpy(), grid)
    got = labels_to_input_grid_on(labels.to(device), grid)
    assert got.shape == volume.spatial_shape and np.array_equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["phantom_unet", "phantom_segresnet"])
def test_sample_models_agree_with_cpu_path(name, device):
    from PTQLogic.engines.torch_engine import TorchEngine
    from PTQLogic.inference.segmenter import segment_volume
    from PTQLogic.models.torch_models import load_torch_model
    from PTQLogic.inference.resident import segment_volume_resident

    spec = load_spec(ROOT / "PTQLogic" / "samples" / "data" / f"{name}.json")
    engine = TorchEngine(load_torch_model(spec), "fp32", device="cpu")
    image, truth = make_phantom(1001, shape=(44, 60, 56), spacing=(1.3, 1.3, 1.6))
    expected = segment_volume(image, spec, engine, batch_size=2)
    device_engine = engine if device == "cpu" else TorchEngine(load_torch_model(spec), "fp32", device=device)
    # on CUDA, segment_volume takes the resident path itself
    got = (segment_volume_resident if device == "cpu" else segment_volume)(image, spec, device_engine, batch_size=2)
    assert got.labels.same_grid(expected.labels) and got.patches == expected.patches
    assert np.mean(got.labels.array == expected.labels.array) >= 0.999
    assert set(got.stages) == {"preprocess", "sliding_window", "resample_back"}
    foreground = truth.array > 0
    assert np.mean(got.labels.array[foreground] == truth.array[foreground]) > 0.5  # a real segmentation


def test_blending_precision_choice():
    from PTQLogic.inference.resident import blending_dtype

    assert blending_dtype("fp16", 10**12, torch.device("cpu")) == torch.float32  # CPUs always blend in fp32
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        assert blending_dtype("fp16", 1, gpu) == torch.float16
        assert blending_dtype("fp32", 1, gpu) == torch.float32
        assert blending_dtype("fp32", torch.cuda.get_device_properties(gpu).total_memory, gpu) == torch.float16
