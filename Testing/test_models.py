"""Building MONAI networks from specs and loading weights safely (weights_only, TorchScript)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from PTQLogic.core.errors import ModelError
from PTQLogic.core.fileio import sha256_file
from PTQLogic.models.torch_models import ARCHITECTURES, build_network, load_torch_model
from PTQLogic.core.spec import spec_from_dict

torch.set_num_threads(2)

# Tiny but valid kwargs per architecture (and the patch each one needs).
TINY = {
    "UNet": ({"channels": [4, 8, 16], "strides": [2, 2]}, 16),
    "BasicUNet": ({"features": [4, 4, 8, 8, 16, 4]}, 32),  # 4 poolings
    "SegResNet": ({"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}, 16),
    # 32 voxels: patch embedding 2 x 4 merges; BatchNorm because the bottleneck is 1 voxel.
    "SwinUNETR": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4,
                   "norm_name": "batch"}, 32),
    "UNETR": ({"feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2}, 32),  # img_size from patch
    "DynUNet": ({"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2],
                 "filters": [4, 8, 16]}, 16),
}


def make_spec(architecture="UNet", kwargs=None, patch=16, classes=3, base_dir=".", **extra):
    data = {"name": "t", "architecture": architecture, "classes": [f"c{i}" for i in range(classes)],
            "kwargs": TINY[architecture][0] if kwargs is None else kwargs, "patch_size": [patch] * 3}
    data.update(extra)
    return spec_from_dict(data, base_dir=base_dir)


# Built, exported and quantized in test_architectures.py (the paper's architectures).
PAPER_ARCHITECTURES = {"PlainConvUNet", "ResidualEncoderUNet", "STUNet", "UNesT", "TransUNet3D", "VISTA3DAuto"}


def test_table_is_fixed():
    assert sorted(ARCHITECTURES) == sorted(set(TINY) | PAPER_ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_every_architecture_builds_and_runs(architecture):
    if architecture in ("SwinUNETR", "UNETR"):
        pytest.importorskip("einops")
    kwargs, patch = TINY[architecture]
    net = build_network(make_spec(architecture, kwargs, patch)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, patch, patch, patch))
    assert tuple(out.shape) == (1, 3, patch, patch, patch)


def test_spec_mismatch_and_bad_kwargs():
    with pytest.raises(ModelError, match="out_channels=4 .* 3 classes"):
        build_network(make_spec(kwargs={**TINY["UNet"][0], "out_channels": 4}))
    with pytest.raises(ModelError, match="in_channels=2 .* in_channels=1"):
        build_network(make_spec(kwargs={**TINY["UNet"][0], "in_channels": 2}))
    with pytest.raises(ModelError, match=r"Cannot build UNet: unknown argument\(s\) \['chanels'\]"):
        build_network(make_spec(kwargs={"chanels": [4, 8], "strides": [2]}))
    with pytest.raises(ModelError, match="Cannot build SegResNet.*divisible"):
        build_network(make_spec("SegResNet", {"init_filters": 4}))
    with pytest.raises(ModelError, match=r"Unknown architecture 'VNet'.*'SegResNet'"):
        build_network(spec_from_dict({"name": "t", "architecture": "VNet", "classes": ["a", "b"],
                                      "patch_size": [16] * 3}))


def reference_output(net, spec):
    torch.manual_seed(1)
    x = torch.rand(1, 1, *spec.patch_size)
    with torch.no_grad():
        return net.eval()(x), x


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "network_weights"])
def test_state_dict_round_trip(tmp_path, wrap):
    spec = make_spec(weights="w.pt", base_dir=str(tmp_path))
    torch.manual_seed(0)
    trained = build_network(spec)
    state = trained.state_dict()
    if wrap != "plain":  # common checkpoint layouts, saved from DataParallel
        state = {wrap: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, tmp_path / "w.pt")
    before = sha256_file(tmp_path / "w.pt")
    loaded = load_torch_model(spec)
    assert not loaded.training
    expected, x = reference_output(trained, spec)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert sha256_file(tmp_path / "w.pt") == before


def test_key_and_shape_mismatch_are_explained(tmp_path):
    spec = make_spec(weights="w.pt", base_dir=str(tmp_path))
    residual = make_spec(kwargs={**TINY["UNet"][0], "num_res_units": 1})
    torch.save(build_network(residual).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"missing keys \d+: \[.*unexpected keys \d+: \[.*residual"):
        load_torch_model(spec)
    wider = make_spec(kwargs={"channels": [8, 8, 16], "strides": [2, 2]})
    torch.save(build_network(wider).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"tensor 'model.0.conv.weight' has shape \(8, 1, 3, 3, 3\).*\(4, 1, 3, 3, 3\)"):
        load_torch_model(spec)


class NotATensor:
    def __reduce__(self):  # what a malicious checkpoint does: call something on load
        return (print, ("code ran while loading",))


def test_unsafe_corrupt_and_missing_files_are_refused(tmp_path, capsys):
    spec = make_spec(weights="w.pt", base_dir=str(tmp_path))
    path = tmp_path / "w.pt"
    torch.save({"state_dict": build_network(spec).state_dict(), "extra": NotATensor()}, path)
    before = sha256_file(path)
    with pytest.raises(ModelError, match="weights_only=True"):
        load_torch_model(spec)
    assert "code ran" not in capsys.readouterr().out
    assert sha256_file(path) == before

    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ModelError, match="could not be read as a PyTorch checkpoint"):
        load_torch_model(spec)
    with open(path, "wb") as handle:
        pickle.dump({"weights": [1, 2, 3]}, handle)
    with pytest.raises(ModelError, match="could not be read|is not a state dict"):
        load_torch_model(spec)
    torch.save({"epoch": torch.tensor(3.0)}, path)  # valid file, wrong content
    with pytest.raises(ModelError, match="missing keys"):
        load_torch_model(spec)

    with pytest.raises(ModelError, match=str(tmp_path / "nope.pt")):
        load_torch_model(make_spec(weights="nope.pt", base_dir=str(tmp_path)))
    with pytest.raises(ModelError, match="no PyTorch model"):
        load_torch_model(make_spec(weights="m.onnx", weights_format="onnx", base_dir=str(tmp_path)))
    with pytest.raises(ModelError, match="no PyTorch model"):
        load_torch_model(spec_from_dict({"name": "o", "architecture": "onnx", "weights": "m.onnx",
                                         "classes": ["a", "b"], "patch_size": [16] * 3}, base_dir=tmp_path))


def test_torchscript_load(tmp_path):
    spec = make_spec(weights="net.ts", weights_format="torchscript", base_dir=str(tmp_path))
    net = build_network(make_spec()).eval()
    expected, x = reference_output(net, spec)
    torch.jit.trace(net, x).save(str(tmp_path / "net.ts"))
    by_architecture = spec_from_dict({"name": "ts", "architecture": "torchscript", "weights": "net.ts",
                                      "classes": ["a", "b", "c"], "patch_size": [16] * 3}, base_dir=tmp_path)
    for loaded in (load_torch_model(spec), load_torch_model(by_architecture)):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)
    (tmp_path / "net.ts").write_bytes(b"not a zip archive")
    with pytest.raises(ModelError, match="not a loadable TorchScript archive"):
        load_torch_model(spec)
