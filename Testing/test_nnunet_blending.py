"""The nnU-Net sliding window's blending, with each window weighted and added in slabs, gives nnunetv2's own
half-precision logits bit for bit, for class-major and channels-last (OpenVINO's layout) windows, with and without
mirroring, and when the engine hands out one reused output buffer (OpenVINO's ``forward_transient``)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from nnunet_factory import architecture, dataset, plans
from PTQLogic.core.progress import Monitor
from PTQLogic.inference.nnunet.predict import NnUNetRunner, _EngineNetwork, add_in_slabs


class _ConvEngine:
    """A real 3-D convolution (fixed random weights) as an engine; ``channels_last`` hands its logits out with
    channels-last strides, as the OpenVINO engine does."""

    device = "cpu"

    def __init__(self, classes: int, channels_last: bool):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, classes, 3, padding=1)
        self.channels_last = channels_last

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * 3
        return y.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else y


class _TransientConvEngine(_ConvEngine):
    """As OpenVINO's engine: ``forward_transient`` writes every result into one buffer of its own (the next call
    overwrites it); ``__call__`` hands out a copy."""

    def __init__(self, classes: int):
        super().__init__(classes, channels_last=True)
        self.buffer: torch.Tensor | None = None
        self.calls = {"transient": 0, "copy": 0}

    def _into_buffer(self, x: torch.Tensor) -> torch.Tensor:
        y = super().__call__(x)
        if self.buffer is None or self.buffer.shape != y.shape:
            self.buffer = torch.empty_like(y)
        self.buffer.copy_(y)
        return self.buffer

    def forward_transient(self, x: torch.Tensor) -> torch.Tensor:
        self.calls["transient"] += 1
        return self._into_buffer(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls["copy"] += 1
        return self._into_buffer(x).clone(memory_format=torch.preserve_format)


def _predictors(mirroring: bool, step: float = 0.5):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    arch = architecture(features=(4, 8), strides=((1, 1, 1), (2, 2, 2)), kernels=((3, 3, 3),) * 2)
    runner = NnUNetRunner(plans([1.5, 1.5, 1.5], [16, 20, 24], arch=arch), dataset(["background", "a", "b", "c"]),
                          "3d_fullres", mirror_axes=(0, 1, 2), step_size=step)
    network = _EngineNetwork(Monitor(), 4)
    ours = runner._predictor(network, mirroring)
    with contextlib.redirect_stdout(io.StringIO()):
        stock = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
        stock.manual_initialization(network, runner.plans_manager, runner.config, None, runner.dataset, "stock",
                                    runner.mirror_axes)
    assert type(ours) is not nnUNetPredictor and isinstance(ours, nnUNetPredictor)
    return network, ours, stock


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mirroring", [False, True])
def test_blending_equals_nnunetv2(channels_last, mirroring):
    network, ours, stock = _predictors(mirroring)
    network.engine = _ConvEngine(4, channels_last)
    data = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 37, 29, 51)).astype(np.float32))
    expected = stock.predict_sliding_window_return_logits(data)
    got = ours.predict_sliding_window_return_logits(data)
    assert got.dtype == expected.dtype == torch.half and got.shape == expected.shape == (4, 37, 29, 51)
    assert torch.equal(got, expected)
    assert float(expected.float().abs().max()) > 1  # not a comparison of zeros


@pytest.mark.parametrize("mirroring", [False, True])
def test_blending_from_the_engines_own_buffer_equals_nnunetv2(mirroring):
    """Without mirroring the window's logits are read in place from the engine's buffer (no copy) and the result
    is still nnunetv2's; with mirroring the first window is summed into, so a copy is taken."""
    network, ours, stock = _predictors(mirroring)  # one network object: stock runs first, on a fresh engine
    data = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 37, 29, 51)).astype(np.float32))
    network.engine = _ConvEngine(4, channels_last=True)
    expected = stock.predict_sliding_window_return_logits(data)
    network.engine, network.transient = _TransientConvEngine(4), not mirroring
    got = ours.predict_sliding_window_return_logits(data)
    assert torch.equal(got, expected)
    used = network.engine.calls
    assert (used["transient"] > 0, used["copy"] > 0) == ((False, True) if mirroring else (True, False))


def test_add_in_slabs_equals_a_plain_add():
    rng = torch.Generator().manual_seed(3)
    total = (torch.randn((5, 9, 10, 11), generator=rng) * 4).half()
    window = (torch.randn((1, 7, 8, 9, 5), generator=rng) * 40).permute(0, 4, 1, 2, 3)[0]  # channels-last view
    view = (slice(None), slice(1, 8), slice(2, 10), slice(0, 9))
    expected = total.clone()
    expected[view] += window
    add_in_slabs(total[view], window)
    assert torch.equal(total, expected)


def test_weighted_add_in_slabs_equals_multiply_then_add_and_leaves_the_window_alone():
    rng = torch.Generator().manual_seed(4)
    total = (torch.randn((5, 9, 10, 11), generator=rng) * 4).half()
    window = (torch.randn((1, 7, 8, 9, 5), generator=rng) * 40).permute(0, 4, 1, 2, 3)[0]
    weight = torch.rand((7, 8, 9), generator=rng) * 10
    view = (slice(None), slice(1, 8), slice(2, 10), slice(0, 9))
    before = window.clone()
    expected = total.clone()
    expected[view] += window * weight
    add_in_slabs(total[view], window, weight)
    assert torch.equal(total, expected)
    assert torch.equal(window, before)


def test_engines_on_a_gpu_get_nnunets_on_device_sliding_window_and_cpu_engines_the_slab_blending():
    from PTQLogic.inference.nnunet.predict import _engines_device

    network, ours, _ = _predictors(False)
    assert ours.device.type == "cpu" and not ours.perform_everything_on_device
    runner = NnUNetRunner(ours.plans_manager.plans, ours.dataset_json, "3d_fullres", step_size=0.5)
    on_gpu = runner._predictor(network, False, torch.device("cuda"))
    # the same blending class: built for a GPU it hands the windows to nnunetv2's own loop
    assert type(on_gpu) is type(ours) and on_gpu.device.type == "cuda" and on_gpu.perform_everything_on_device
    assert _engines_device([_ConvEngine(4, False)]).type == "cpu"
    gpu_engine = type("GpuEngine", (), {"device": torch.device("cuda", 0)})()
    assert _engines_device([gpu_engine, gpu_engine]) == torch.device("cuda", 0)
    assert _engines_device([gpu_engine, _ConvEngine(4, False)]) is None  # mixed folds: the CPU path
    assert runner._predictor(network, False, None).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the project's GPU machine)")
@pytest.mark.parametrize("mirroring", [False, True])
def test_on_device_sliding_window_equals_nnunetv2_on_the_gpu(mirroring):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    network, ours, _ = _predictors(mirroring)
    runner = NnUNetRunner(ours.plans_manager.plans, ours.dataset_json, "3d_fullres", mirror_axes=(0, 1, 2))
    gpu = torch.device("cuda")
    ours = runner._predictor(network, mirroring, gpu)
    with contextlib.redirect_stdout(io.StringIO()):
        stock = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=gpu, verbose=False, allow_tqdm=False)
        stock.manual_initialization(network, runner.plans_manager, runner.config, None, runner.dataset, "stock",
                                    runner.mirror_axes)
    engine = _ConvEngine(4, False)
    engine.conv, engine.device = engine.conv.to(gpu), gpu
    network.engine = engine
    data = torch.from_numpy(np.random.default_rng(5).normal(size=(1, 37, 29, 51)).astype(np.float32))
    expected = stock.predict_sliding_window_return_logits(data)
    got = ours.predict_sliding_window_return_logits(data)
    assert got.device.type == "cuda" and got.dtype == torch.half and torch.equal(got, expected)
    assert float(expected.float().abs().max()) > 1
