"""Property-based tests (hypothesis): geometry round trips for random valid affines and shapes,
sliding-window coverage for any valid shape, and a fixed-budget fuzz of the volume and spec readers."""
from __future__ import annotations

import json
import warnings

import numpy as np
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from PTQLogic.engines.torch_engine import TorchEngine
from PTQLogic.core.errors import PTQError
from PTQLogic.io.volumes import read_volume, write_labelmap
from PTQLogic.inference.segmenter import segment_volume
from PTQLogic.inference.preprocess import labels_to_input_grid, resample_to_network
from PTQLogic.core.spec import load_spec, spec_from_dict
from PTQLogic.core.volume import Volume

from conftest import SAMPLE_UNET

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def geometries(draw, max_size=12):
    """A random valid IJK-to-RAS: any axis permutation and flips, spacing 0.3-5 mm, optional oblique
    rotation, any origin; and a random shape (K, J, I) with every axis >= 2."""
    shape = tuple(draw(st.integers(2, max_size)) for _ in range(3))
    permutation = draw(st.permutations([0, 1, 2]))
    signs = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    linear = np.zeros((3, 3))
    for column, (row, sign) in enumerate(zip(permutation, signs)):
        linear[row, column] = sign
    angle = draw(st.sampled_from([0.0, 0.0, 0.3, -0.7]))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    spacing = [draw(st.floats(0.3, 5.0)) for _ in range(3)]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ linear @ np.diag(spacing)
    affine[:3, 3] = [draw(st.floats(-300, 300)) for _ in range(3)]
    return shape, affine


def spec(patch=(8, 8, 8), orientation="RAS", overlap=0.25, blend="gaussian"):
    return spec_from_dict({"name": "t", "architecture": "UNet", "classes": ["bg", "fg"], "patch_size": list(patch),
                           "preprocessing": {"orientation": orientation, "intensity": "none"},
                           "overlap": overlap, "blend_mode": blend})


@FAST
@given(geometries(), st.sampled_from(["RAS", "LPS", "PIR"]), st.integers(0, 2**31 - 1))
def test_labels_survive_the_network_round_trip_exactly(geometry, orientation, seed):
    shape, affine = geometry
    labels = np.random.default_rng(seed).integers(0, 7, shape).astype(np.uint8)
    image, grid = resample_to_network(Volume(labels.astype(np.float32), affine), spec(orientation=orientation))
    back = labels_to_input_grid(image[0].round().to(torch.uint8).numpy(), grid)
    assert back.shape == labels.shape and np.array_equal(back, labels)


class Threshold(torch.nn.Module):
    """A real (1x1x1 convolution) two-class network: foreground exactly where the input is > 0.5."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([0.5, -0.5])

    def forward(self, x):
        return self.conv(x)


ENGINE = TorchEngine(Threshold().eval(), "fp32", device="cpu")


@FAST
@given(geometries(max_size=20), st.tuples(*[st.integers(2, 12)] * 3), st.sampled_from([0.0, 0.25, 0.5, 0.8]),
       st.sampled_from(["gaussian", "constant"]), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_sliding_window_covers_every_voxel_for_any_shape(geometry, patch, overlap, blend, batch, seed):
    shape, affine = geometry
    mask = np.random.default_rng(seed).random(shape) < 0.4
    volume = Volume(mask.astype(np.float32), affine)
    result = segment_volume(volume, spec(patch, overlap=overlap, blend=blend), ENGINE, batch_size=batch)
    assert result.labels.spatial_shape == shape and np.allclose(result.labels.ijk_to_ras, affine)
    assert np.array_equal(result.labels.array, mask.astype(np.uint8)), "a voxel was missed or mixed up"


@FAST
@given(geometries(), st.integers(0, 2**31 - 1), st.sampled_from([".nii.gz", ".nrrd", ".mha"]))
def test_label_maps_round_trip_through_files(tmp_path_factory, geometry, seed, suffix):
    shape, affine = geometry
    labels = np.random.default_rng(seed).integers(0, 300, shape).astype(np.uint16)
    path = tmp_path_factory.mktemp("rt") / f"labels{suffix}"
    write_labelmap(Volume(labels, affine), path)
    back = read_volume(path)
    assert np.array_equal(back.array, labels) and np.allclose(back.ijk_to_ras, affine, atol=1e-4)


# --- fixed-budget fuzz: damaged files give PTQError (InputError/ModelError), never a crash ---------

def _seed_files(folder):
    ct = np.random.default_rng(1).normal(0, 100, (6, 7, 8)).astype(np.float32)
    paths = []
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        sitk.WriteImage(sitk.GetImageFromArray(ct), str(folder / f"seed{suffix}"))
        paths.append(folder / f"seed{suffix}")
    return paths


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_volume_reader(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    path = data.draw(st.sampled_from(_seed_files(folder)))
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[position] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[position:]
            if not raw:
                break
        else:
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=16))
    path.write_bytes(bytes(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            volume = read_volume(path)
        except PTQError:
            return
    volume.validate()  # whatever is accepted is a usable volume


SPEC_KEYS = ["name", "architecture", "kwargs", "in_channels", "classes", "patch_size", "preprocessing", "overlap",
             "blend_mode", "weights", "weights_format", "spacing", "bogus"]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(SPEC_KEYS), json_values, max_size=8), st.booleans())
def test_fuzz_spec_reader(tmp_path_factory, changes, start_from_sample):
    base = json.loads(SAMPLE_UNET.read_text()) if start_from_sample else {}
    path = tmp_path_factory.mktemp("spec") / "spec.json"
    path.write_text(json.dumps({**base, **changes}))
    try:
        load_spec(path)
    except PTQError:
        pass
