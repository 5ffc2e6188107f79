"""Speed options of the PyTorch engine and the GPU pipeline give the same labels as the plain path.

Run on CPU tensors (the same torch code runs on the GPU): channels-last layout, a padded fixed-size
last batch, the queued predictor's progress/errors, and (where a C++ compiler is present, which
inductor needs on CPU) a compiled engine. Timings of these options are in benchmarks/gpu/gpu_pipeline.py.
"""
from __future__ import annotations

import locale
import shutil

import numpy as np
import pytest
import torch

from PTQLogic.engines.torch_engine import TorchEngine
from PTQLogic.core.errors import Cancelled, InputError, ModelError
from PTQLogic.models.torch_models import load_torch_model
from PTQLogic.samples.phantom import make_phantom
from PTQLogic.core.progress import Monitor
from PTQLogic.inference.predictors import QueuedPredictor
from PTQLogic.inference.resident import segment_volume_resident
from PTQLogic.inference.sliding_window import sliding_window_labels
from PTQLogic.core.spec import load_spec
from conftest import ROOT


def _sample(name: str = "phantom_segresnet"):
    spec = load_spec(ROOT / "PTQLogic" / "samples" / "data" / f"{name}.json")
    return spec, load_torch_model(spec)


def test_channels_last_engine_gives_the_same_labels():
    spec, model = _sample()
    image, truth = make_phantom(7, shape=(40, 52, 48), spacing=(1.3, 1.3, 1.6))
    plain = segment_volume_resident(image, spec, TorchEngine(model, "fp32", device="cpu"), batch_size=3)
    fast_engine = TorchEngine(model, "fp32", device="cpu", channels_last=True)
    assert any(p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
               for p in fast_engine.model.parameters())  # the layout really changed
    fast = segment_volume_resident(image, spec, fast_engine, batch_size=3)
    assert np.mean(fast.labels.array == plain.labels.array) >= 0.9999
    foreground = truth.array > 0
    assert np.mean(fast.labels.array[foreground] == truth.array[foreground]) > 0.5  # a real segmentation
    logits = fast_engine(torch.randn(2, spec.in_channels, *spec.patch_size))
    assert logits.is_contiguous()  # callers get the plain layout back


@pytest.mark.parametrize("batch", [5, 7])
def test_fixed_batch_pads_only_the_last_batch(batch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
                              torch.nn.Conv3d(8, 4, 3, padding=1)).eval()
    image = torch.randn(1, 37, 29, 21)
    shapes = []

    def predictor(x):
        shapes.append(x.shape[0])
        return net(x)

    kwargs = dict(overlap=0.5, mode="gaussian", batch_size=batch, channels_last=False)
    with torch.inference_mode():
        plain = sliding_window_labels(image, net, (16, 16, 16), 4, **kwargs)
        padded = sliding_window_labels(image, predictor, (16, 16, 16), 4, fixed_batch=True, **kwargs)
    assert torch.equal(plain, padded) and plain.shape == image.shape[1:]
    windows = 4 * 3 * 2  # 37 -> 4, 29 -> 3, 21 -> 2 windows of 16 at overlap 0.5
    assert windows % batch and set(shapes) == {batch} and len(shapes) == -(-windows // batch)


def test_queued_predictor_progress_and_errors():
    spec, model = _sample("phantom_unet")
    engine = TorchEngine(model, "fp32", device="cpu")
    seen = []
    monitor = Monitor(on_progress=lambda stage, done, total: seen.append((done, total)))
    predictor = QueuedPredictor(engine, spec, total=5, monitor=monitor)
    batch = torch.randn(2, spec.in_channels, *spec.patch_size)
    for _ in range(3):  # 6 windows run, the last one padding
        assert predictor(batch).shape == (2, spec.num_classes, *spec.patch_size)
    assert [done for done, _ in seen] == [2, 4, 5] and predictor.patches == 6
    assert predictor.finish() > 0

    wrong = QueuedPredictor(lambda_engine(lambda x: x[:, :1]), spec, total=1, monitor=Monitor())
    with pytest.raises(ModelError, match="classes in the spec"):
        wrong(batch)
    monitor.cancel()
    with pytest.raises(Cancelled):
        predictor(batch)


class lambda_engine:  # noqa: N801 - a real callable engine (no forward_native): the float32 path
    def __init__(self, fn):
        self.fn, self.device = fn, torch.device("cpu")

    def __call__(self, batch):
        return self.fn(batch)


def test_engine_option_errors():
    _, model = _sample("phantom_unet")
    with pytest.raises(InputError, match="compile mode"):
        TorchEngine(model, "fp32", device="cpu", compile="fastest")
    engine = TorchEngine(model, "fp32", device="cpu")
    assert not engine.fixed_batch and engine.compile_seconds is None
    assert engine.options() == {"channels_last": False, "compile": None, "cudnn_benchmark": False}


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_engine_gives_the_same_labels():
    torch.manual_seed(0)
    spec, _ = _sample("phantom_unet")
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
                              torch.nn.Conv3d(8, spec.num_classes, 1)).eval()
    image, _ = make_phantom(3, shape=(30, 36, 34), spacing=(1.5, 1.5, 1.5))
    plain = segment_volume_resident(image, spec, TorchEngine(net, "fp32", device="cpu"), batch_size=3)
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # as ITK's DICOM reader leaves it: compiling must still work
    try:
        engine = TorchEngine(net, "fp32", device="cpu", compile="default")
        assert engine.fixed_batch
        compiled = segment_volume_resident(image, spec, engine, batch_size=3)
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    assert engine.compile_seconds is not None and engine.compile_seconds > 0
    assert np.mean(compiled.labels.array == plain.labels.array) >= 0.9999
    assert compiled.patches % 3 == 0 and compiled.patches >= plain.patches  # one batch shape throughout


def test_cli_compile_modes_match_the_engine():
    from PTQLogic.app.cli import TORCH_COMPILE_MODES
    from PTQLogic.engines.torch_engine import COMPILE_MODES

    assert TORCH_COMPILE_MODES == COMPILE_MODES


def test_create_engine_passes_torch_compile():
    from PTQLogic.engines import create_engine

    spec, model = _sample("phantom_unet")
    engine = create_engine("torch", "fp32", torch_model=model, device="cpu", torch_compile="reduce-overhead")
    assert isinstance(engine, TorchEngine) and engine.compile_mode == "reduce-overhead" and engine.fixed_batch
    with pytest.raises(InputError, match="--runtime torch"):
        create_engine("onnxruntime", "fp32", fp32_onnx="unused.onnx", torch_compile="default")


def test_segment_cli_refuses_torch_compile_on_another_runtime(quantized_unet, phantom_files, tmp_path):
    import subprocess
    import sys

    output = tmp_path / "labels.nii.gz"
    run = subprocess.run(
        [sys.executable, "-m", "PTQLogic.app.cli", "segment", "--model", str(quantized_unet), "--input",
         str(phantom_files["image"]), "--output", str(output), "--runtime", "onnxruntime", "--precision", "fp32",
         "--torch-compile", "default"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--runtime torch" in run.stderr, run.stderr
    assert not output.exists()


def test_a_failing_compile_is_one_clear_error():
    class Bad(torch.nn.Module):  # fails while dynamo traces it
        def forward(self, x):
            return x.not_an_attribute

    from PTQLogic.core.errors import EngineUnavailable

    engine = TorchEngine(Bad(), "fp32", device="cpu", compile="default")
    with pytest.raises(EngineUnavailable, match="leave --torch-compile out"):
        engine(torch.zeros(1, 1, 4, 4, 4))
