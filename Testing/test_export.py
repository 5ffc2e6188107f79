"""ONNX export of real MONAI networks, verified with ONNX Runtime; error paths leave no files."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from PTQLogic.core.errors import AccuracyError, Cancelled, InputError, ModelError
from PTQLogic.models.onnx_export import copy_onnx_model, export_onnx, onnx_io_names
from PTQLogic.core.fileio import sha256_file
from PTQLogic.models.torch_models import build_network
from PTQLogic.core.progress import Monitor
from PTQLogic.core.spec import spec_from_dict

torch.set_num_threads(2)

KWARGS = {
    "UNet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "SegResNet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
}


def make_spec(architecture: str, patch=(16, 16, 16), in_channels: int = 1):
    return spec_from_dict({"name": "t", "architecture": architecture, "kwargs": KWARGS.get(architecture, {}),
                           "classes": ["background", "a", "b"], "patch_size": list(patch),
                           "in_channels": in_channels})


@pytest.mark.parametrize("architecture", ["UNet", "SegResNet"])
def test_export_matches_torch_with_dynamic_batch(tmp_path, architecture):
    spec = make_spec(architecture, in_channels=2)
    torch.manual_seed(0)
    net = build_network(spec).eval()
    events = []
    report = export_onnx(net, spec, tmp_path / "fp32.onnx", monitor=Monitor(lambda *e: events.append(e)))
    assert report.path == tmp_path / "fp32.onnx" and report.bytes == report.path.stat().st_size
    assert report.opset >= 17 and 0 <= report.max_abs_error < 1e-4
    assert events[0] == ("export", 0, 3) and events[-1] == ("export", 3, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx"]
    assert onnx_io_names(report.path) == ("input", "logits", ["batch", 2, 16, 16, 16])
    # Independent check at a batch size never used during export.
    batch = torch.randn(3, 2, 16, 16, 16)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["logits"], {"input": batch.numpy()})[0]
    with torch.no_grad():
        torch_out = net(batch).numpy()
    assert onnx_out.shape == (3, 3, 16, 16, 16)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4)


class TracesDifferently(torch.nn.Module):
    """Scales by a Python-side call counter: the traced graph freezes it, PyTorch keeps counting."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * float(self.calls)


def test_mismatch_raises_accuracy_error_and_leaves_nothing(tmp_path):
    with pytest.raises(AccuracyError, match="differs from PyTorch by"):
        export_onnx(TracesDifferently(), make_spec("UNet"), tmp_path / "fp32.onnx")
    assert list(tmp_path.iterdir()) == []


def test_network_that_cannot_run_on_patch_is_model_error(tmp_path):
    net = build_network(make_spec("UNet", in_channels=1))
    with pytest.raises(ModelError, match=r"export the network to ONNX.*\(1, 2, 16, 16, 16\)"):
        export_onnx(net, make_spec("UNet", in_channels=2), tmp_path / "fp32.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_and_cancel(tmp_path):
    spec = make_spec("UNet")
    net = build_network(spec)
    with pytest.raises(InputError, match="opset 13"):
        export_onnx(net, spec, tmp_path / "a.onnx", opset=13)
    monitor = Monitor()
    monitor.cancel()
    with pytest.raises(Cancelled):
        export_onnx(net, spec, tmp_path / "a.onnx", monitor=monitor)
    assert list(tmp_path.iterdir()) == []


def test_copy_onnx_model_validates(tmp_path):
    spec = make_spec("UNet")
    src = export_onnx(build_network(spec), spec, tmp_path / "given.onnx").path
    before = sha256_file(src)
    dst = copy_onnx_model(src, tmp_path / "model" / "fp32.onnx")
    assert sha256_file(dst) == before == sha256_file(src)

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        copy_onnx_model(corrupt, tmp_path / "out" / "fp32.onnx")
    assert not (tmp_path / "out" / "fp32.onnx").exists()
    with pytest.raises(ModelError, match="does not exist"):
        copy_onnx_model(tmp_path / "missing.onnx", tmp_path / "out" / "fp32.onnx")


def test_two_input_onnx_is_refused(tmp_path):
    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, 4, 4, 4])

    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "two", [value("a"), value("b")],
                              [value("y")])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError, match="2 inputs and 1 outputs"):
        copy_onnx_model(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
