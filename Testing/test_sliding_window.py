"""The CPU sliding window (channels-last blending) gives MONAI's labels, and OpenVINO's channels-last logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from PTQLogic.core.errors import InputError, ModelError
from PTQLogic.inference.sliding_window import count_windows, sliding_window_labels, window_slices


class _Net(torch.nn.Module):
    """A fixed random conv net: smooth, position-dependent logits, so window weights decide labels."""

    def __init__(self, classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, classes, 3, padding=1)
        self.mix = torch.nn.Conv3d(classes, classes, 1)

    def forward(self, x):
        return self.mix(torch.tanh(self.conv(x)))


@pytest.mark.parametrize("shape, roi, overlap, mode, batch", [
    ((40, 37, 30), (16, 16, 16), 0.25, "gaussian", 1),
    ((40, 37, 30), (16, 20, 12), 0.5, "constant", 3),
    ((10, 50, 7), (16, 16, 16), 0.25, "gaussian", 2),  # smaller than the window in two axes: padded
    ((60, 80, 70), (32, 48, 40), 0.5, "gaussian", 2),  # a non-cubic Gaussian: sigma and weights per axis
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_labels_match_monai_sliding_window(shape, roi, overlap, mode, batch, channels_last):
    net = _Net(5).eval()
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, *shape)).astype(np.float32))
    calls = []

    def predictor(x):
        calls.append(x.shape[0])
        out = net(x)
        # OpenVINO's transient logits: channels-last memory behind an (N, C, D, H, W) view
        return out.contiguous(memory_format=torch.channels_last_3d) if channels_last else out

    with torch.inference_mode():
        ours = sliding_window_labels(image, predictor, roi, 5, overlap=overlap, mode=mode, batch_size=batch)
        reference = sliding_window_inference(image[None], roi, batch, net, overlap=overlap, mode=mode)[0].argmax(0)
    assert ours.shape == shape
    # same windows and weights; the sum is not divided by the count map, which cannot move an argmax
    # (rounding aside): equal labels
    assert (ours == reference).float().mean().item() > 0.9999
    assert sum(calls) == count_windows(shape, roi, overlap) == len(window_slices(
        tuple(max(s, r) for s, r in zip(shape, roi)), roi, overlap))
    assert max(calls) <= batch


def test_blending_weights_matter():
    """Logits favour class 0 in each window's centre and class 1 near its border: the blend must weigh them."""
    roi = (8, 8, 8)

    def predictor(x):
        n = x.shape[0]
        centre = torch.zeros(8, 8, 8)
        centre[2:6, 2:6, 2:6] = 1.0
        return torch.stack([centre, 1.0 - centre + 0.1])[None].repeat(n, 1, 1, 1, 1)

    image = torch.zeros(1, 12, 8, 8)
    labels = {}
    for mode in ("gaussian", "constant"):
        labels[mode] = sliding_window_labels(image, predictor, roi, 2, overlap=0.5, mode=mode)
        reference = sliding_window_inference(image[None], roi, 1, predictor, overlap=0.5, mode=mode)[0].argmax(0)
        assert torch.equal(labels[mode], reference)
    # where two windows overlap, the Gaussian-weighted centre of one outvotes the border of the other
    assert (labels["gaussian"] == 0).sum() > (labels["constant"] == 0).sum() > 0


def test_fixed_batch_pads_the_last_batch_and_bad_inputs_are_refused():
    net = _Net(3).eval()
    image = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 30, 20, 20)).astype(np.float32))
    shapes = []

    def predictor(x):
        shapes.append(x.shape[0])
        return net(x)

    with torch.inference_mode():
        plain = sliding_window_labels(image, net, (16, 16, 16), 3, batch_size=1)
        padded = sliding_window_labels(image, predictor, (16, 16, 16), 3, batch_size=3, fixed_batch=True)
        assert torch.equal(plain, padded)
        assert len(shapes) > 1 and set(shapes) == {3}  # 8 windows: 3 + 3 + (2 padded to 3)
        with pytest.raises(InputError, match="Batch size"):
            sliding_window_labels(image, net, (16, 16, 16), 3, batch_size=0)
        with pytest.raises(ModelError, match="expected"):
            sliding_window_labels(image, net, (16, 16, 16), 4)  # the network has 3 classes


def test_openvino_logits_are_channels_last_views_with_the_plain_values(tmp_path):
    pytest.importorskip("openvino")
    import openvino as ov

    from PTQLogic.engines.openvino_engine import MAX_SHAPES, OpenVINOEngine

    net = _Net(4).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16, 16), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    engine = OpenVINOEngine(path, "fp32", patch_size=(16, 16, 16))
    # windows per call when left open: 4 while their logits fit in 256 MB
    assert engine.preferred_batch(4, (16, 16, 16)) == 4 and engine.preferred_batch(14, (96, 96, 96)) == 4
    assert engine.preferred_batch(105, (128, 128, 128)) == 1 and engine.preferred_batch(105, (64, 64, 64)) == 2
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 1, 16, 16, 16)).astype(np.float32))
    plain = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = plain({0: x.numpy()})[0]
    one = engine.forward_transient(x[:1])
    assert one.shape == (1, 4, 16, 16, 16) and one.stride()[1] == 1  # channels innermost: no reorder ran
    np.testing.assert_allclose(one.numpy(), expected[:1], rtol=1e-5, atol=1e-5)
    fresh = engine(x[:1])
    engine.forward_transient(x[1:2])  # overwrites the transient buffer, not the fresh copy
    np.testing.assert_allclose(fresh.numpy(), expected[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(engine(x).numpy(), expected, rtol=1e-5, atol=1e-5)  # batch 3: compiled on demand
    with pytest.raises(ModelError, match="does not fit"):
        engine(torch.zeros(1, 2, 16, 16, 16))
    # a sliding window with batch 3 over 8 windows compiles one more shape, not one per partial batch
    image = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 30, 20, 20)).astype(np.float32))
    before = set(engine._requests)
    with torch.inference_mode():
        labels = sliding_window_labels(image, engine.forward_transient, (16, 16, 16), 4, batch_size=3,
                                       fixed_batch=engine.fixed_batch)
        reference = sliding_window_labels(image, net, (16, 16, 16), 4)
    assert (labels == reference).float().mean() > 0.999
    assert set(engine._requests) == before  # (1, ...) and (3, ...) were compiled above
    # least recently used shapes go first; the one in use stays
    for n in (4, 5, 6, 3, 7):  # 3 is used again before 7 arrives: 4 is then the least recently used
        engine(x[:1].repeat(n, 1, 1, 1, 1))
    assert len(engine._requests) == MAX_SHAPES and (3, 1, 16, 16, 16) in engine._requests
    assert (4, 1, 16, 16, 16) not in engine._requests


def test_processes_sharing_an_openvino_cache_compile_one_at_a_time(tmp_path):
    """Engines built into one cache compile one at a time (OpenVINO maps cache blobs into memory: a process
    rewriting a blob another has mapped crashed it with SIGBUS, seen with three processes on one fresh cache)."""
    pytest.importorskip("openvino")
    import subprocess
    import sys
    import time

    from filelock import FileLock

    net = _Net(4).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16, 16), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    code = ("import sys; from PTQLogic.engines.openvino_engine import OpenVINOEngine as E; "
            "e = E(sys.argv[1], 'fp32', cache_dir=sys.argv[2], patch_size=(16, 16, 16)); print('built')")
    with FileLock(str(cache / ".openvino-compile.lock")):  # another process is compiling into this cache
        run = subprocess.Popen([sys.executable, "-c", code, str(path), str(cache)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        time.sleep(8)  # ample for this engine to build (about 2 s here), were it not waiting
        assert run.poll() is None, run.communicate()[0]
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0 and out.strip().endswith("built"), out


@pytest.mark.parametrize("shape, roi, overlap, batch", [
    ((53, 20, 18), (16, 16, 16), 0.25, 3),  # first-axis rows at 0, 12, 24, 36, 37: the ring wraps, last row shifted
    ((16, 30, 25), (16, 12, 12), 0.5, 2),  # a single row
    ((41, 17, 17), (8, 16, 16), 0.0, 4),  # rows that do not overlap
])
def test_ring_of_one_window_depth_gives_the_whole_volume_sum(shape, roi, overlap, batch):
    """Labels identical, voxel for voxel, to blending every window into one whole-volume sum."""
    from monai.data.utils import compute_importance_map

    net = _Net(6).eval()
    image = torch.from_numpy(np.random.default_rng(2).standard_normal((1, *shape)).astype(np.float32))
    with torch.inference_mode():
        ours = sliding_window_labels(image, net, roi, 6, overlap=overlap, batch_size=batch)
        weight = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device="cpu").reshape(*roi, 1)
        whole = torch.zeros(*shape, 6)
        for s in window_slices(shape, roi, overlap):
            whole[s].addcmul_(weight, net(image[(slice(None), *s)][None])[0].movedim(0, -1))
    assert ours.dtype == torch.uint8 and torch.equal(ours.long(), whole.argmax(-1))


def test_labels_past_256_classes_are_int32():
    image = torch.zeros(1, 10, 9, 9)
    logits = torch.zeros(1, 300, 8, 8, 8)
    logits[:, 299] = 1.0
    labels = sliding_window_labels(image, lambda x: logits.expand(x.shape[0], -1, -1, -1, -1), (8, 8, 8), 300)
    assert labels.dtype == torch.int32 and labels.shape == (10, 9, 9) and bool((labels == 299).all())


def test_memory_estimate_counts_the_ring_not_the_whole_grid(monkeypatch):
    """check_memory (run before any engine is built) sizes class scores as the sliding window holds them:
    one window's depth, so a 105-class model on a whole CT is not refused for memory it never uses."""
    from PTQLogic.core.memory import MEMORY_ENV
    from PTQLogic.inference.preprocess import check_memory
    from PTQLogic.core.spec import spec_from_dict
    from PTQLogic.core.volume import Volume

    def spec(classes):
        return spec_from_dict({"name": "m", "architecture": "UNet", "classes": [f"c{i}" for i in range(classes)],
                               "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": classes},
                               "patch_size": [96, 96, 96], "preprocessing": {"spacing": [1.5, 1.5, 1.5]}})

    volume = Volume(array=np.zeros((300, 273, 273), np.int16), ijk_to_ras=np.diag([1.5, 1.5, 1.5, 1.0]))
    voxels = 300 * 273 * 273
    needed_14, needed_105 = check_memory(volume, spec(14)), check_memory(volume, spec(105))
    whole_grid_scores = voxels * 105 * 4  # 9.4 GB: what a whole-volume sum of 105 classes would take
    assert needed_105 < 0.6 * whole_grid_scores
    # the ring (96 of 273-300 slices) still grows with the classes: 91 more classes, at least a third of a grid
    assert needed_105 - needed_14 > 91 * 4 * voxels * 96 / 300
    monkeypatch.setenv(MEMORY_ENV, str(needed_105 / 2**30 * 0.99))
    with pytest.raises(InputError, match="GiB to segment"):
        check_memory(volume, spec(105))
    monkeypatch.setenv(MEMORY_ENV, str(needed_105 / 2**30 * 1.01))
    assert check_memory(volume, spec(105)) == needed_105
