"""Other model sources end to end: an ONNX file or a TorchScript file with a spec beside it."""
import json

import pytest
import torch

from PTQLogic.cli import main
from PTQLogic.evaluate import dice_per_class
from PTQLogic.export import export_onnx
from PTQLogic.imageio import read_volume
from PTQLogic.models import load_torch_model
from PTQLogic.spec import load_spec

from conftest import SAMPLE_UNET


def _sibling_spec(model_file, **changes):
    data = json.loads(SAMPLE_UNET.read_text())
    data.pop("weights")
    data.update(changes)
    model_file.with_suffix(".json").write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_quantize_and_segment_from_a_bare_model_file(kind, phantom_files, tmp_path, capsys):
    spec = load_spec(SAMPLE_UNET)
    model = load_torch_model(spec)
    if kind == "onnx":
        model_file = tmp_path / "net.onnx"
        export_onnx(model, spec, model_file)
        _sibling_spec(model_file, architecture="onnx", kwargs={})
        runtime, precision = "openvino", "int8"
    else:
        model_file = tmp_path / "net.ts"
        torch.jit.trace(model, torch.zeros(1, 1, *spec.patch_size)).save(str(model_file))
        _sibling_spec(model_file, architecture="torchscript", kwargs={})
        runtime, precision = "torch", "fp32"
    original = model_file.read_bytes()
    out = tmp_path / "quantized"
    assert main(["quantize", "--model", str(model_file), "--calibration", *map(str, phantom_files["calibration"]),
                 "--out", str(out), "--patches", "4", "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    folder = sorted(p.name for p in out.iterdir())
    assert {"spec.json", "fp32.onnx", "int8.onnx", "quantization.json"} <= set(folder)
    assert ("weights.ts" in folder) == (kind == "torchscript") and "weights.onnx" not in folder
    labels = tmp_path / "labels.nii.gz"
    assert main(["segment", "--model", str(out), "--input", str(phantom_files["image"]), "--output", str(labels),
                 "--runtime", runtime, "--precision", precision]) == 0, capsys.readouterr().err
    dice = dice_per_class(read_volume(labels).array, read_volume(phantom_files["truth"]).array, range(1, 7))
    assert dice.mean > 0.85
    assert model_file.read_bytes() == original


def test_bare_model_file_without_spec_is_refused(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 8, 8, 8]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
    lonely = tmp_path / "lonely.onnx"
    onnx.save(helper.make_model(graph), str(lonely))
    code = main(["quantize", "--model", str(lonely), "--calibration", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "spec" in err and not (tmp_path / "o").exists()
