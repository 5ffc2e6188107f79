"""Other model sources end to end: an ONNX file or a TorchScript file with a spec beside it."""
import json

import pytest
import torch

from PTQLogic.app.cli import main
from PTQLogic.evaluation.metrics import dice_per_class
from PTQLogic.models.onnx_export import export_onnx
from PTQLogic.io.volumes import read_volume
from PTQLogic.models.torch_models import load_torch_model
from PTQLogic.core.spec import load_spec

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


# ---------------------------------------------------------------- MONAI bundles: reading configs as data

def _config(data, tmp_path):
    from PTQLogic.models.sources.bundle_config import BundleConfig

    return BundleConfig(data, tmp_path / "inference.json")


def test_bundle_resolver_evaluates_data_expressions_only(tmp_path):
    from PTQLogic.core.errors import ModelError

    config = _config({
        "flags": {"highres": True, "overlap": 0.25},
        "pixdim": "$[1.5, 1.5, 1.5] if @flags#highres else [3.0, 3.0, 3.0]",
        "name": "$'model.pt' if not @flags#highres else 'model_lowres.pt'",
        "root": ".", "out": "$@root + '/eval'",
        "steps": ["a", "b"], "more": "$@steps + ['c'] * 2",
        "net": {"channels": [4, 8], "first": "@#channels", "double": "$@net#channels[1] * 2 - 1"},
        "imports": ["$import os"], "device": "$torch.device('cpu')",
        "loop_a": "@loop_b", "loop_b": "@loop_a",
        "code": {"attr": "$@root.upper()", "call": "$len(@steps)", "lambda": "$lambda x: x",
                 "dunder": "$__import__('os').getcwd()", "comp": "$[v for v in @steps]", "pow": "$2 ** 10"},
    }, tmp_path)
    assert config.get("pixdim") == [1.5, 1.5, 1.5] and config.get("name") == "model_lowres.pt"
    assert config.get("out") == "./eval" and config.get("more") == ["a", "b", "c", "c"]
    assert config.get("net") == {"channels": [4, 8], "first": [4, 8], "double": 15}
    for key in ("attr", "call", "lambda", "dunder", "comp", "pow"):
        with pytest.raises(ModelError, match=f"'code#{key}'.*does not run"):
            config.get(f"code#{key}")
    with pytest.raises(ModelError, match="circular"):
        config.get("loop_a")
    with pytest.raises(ModelError, match="has no 'flags#lowres'"):
        _config({"flags": {}, "x": "@flags#lowres"}, tmp_path).get("x")


def test_bundle_preprocessing_maps_onto_spec_and_monai(tmp_path):
    """spleen's ScaleIntensityRanged is the 'ct' mode; wholeBody's chain becomes MONAI steps, computed by MONAI."""
    import numpy as np
    from monai.transforms import NormalizeIntensity, ScaleIntensity

    from PTQLogic.inference.preprocess import normalize_intensity
    from PTQLogic.models.sources.bundle_transforms import map_preprocessing

    from test_bundle_zoo import spleen_config, wholebody_config

    spleen, notes = map_preprocessing(_config(spleen_config(), tmp_path))
    assert (spleen.orientation, spleen.spacing, spleen.intensity, spleen.ct_window, spleen.steps, notes) == \
        ("RAS", (1.5, 1.5, 2.0), "ct", (-57.0, 164.0), (), [])
    body, _ = map_preprocessing(_config(wholebody_config(), tmp_path))
    assert body.spacing == (1.5, 1.5, 1.5) and body.intensity == "none"
    assert body.steps == ({"transform": "NormalizeIntensity", "nonzero": True},
                          {"transform": "ScaleIntensity", "minv": -1.0, "maxv": 1.0})
    image = torch.from_numpy(np.random.default_rng(0).normal(0, 300, (1, 9, 8, 7)).astype(np.float32))
    image[:, :3] = 0
    expected = ScaleIntensity(minv=-1.0, maxv=1.0)(NormalizeIntensity(nonzero=True)(image))
    torch.testing.assert_close(normalize_intensity(image, body), torch.as_tensor(expected))


def test_spec_with_intensity_steps_round_trips_and_refuses_unknown_steps(tmp_path):
    from dataclasses import replace

    from PTQLogic.core.errors import ModelError
    from PTQLogic.core.spec import Preprocessing, spec_from_dict

    spec = load_spec(SAMPLE_UNET)
    steps = ({"transform": "ScaleIntensityRange", "a_min": -100, "a_max": 200, "b_min": -1.0, "b_max": 1.0,
              "clip": False},)
    changed = replace(spec, preprocessing=Preprocessing(intensity="none", steps=steps))
    changed.save(tmp_path / "spec.json")
    assert load_spec(tmp_path / "spec.json").preprocessing.steps == steps
    data = changed.to_dict()
    for bad in ({"transform": "Lambda", "func": "x"}, {"transform": "ScaleIntensity", "minv": "0"},
                {"transform": "ScaleIntensity", "factor": 1, "extra": 2}):
        data["preprocessing"]["steps"] = [bad]
        with pytest.raises(ModelError, match="preprocessing.steps"):
            spec_from_dict(data)


def test_bundle_folder_is_described_and_quantizable_in_slicer(tmp_path):
    from PTQLogic.models.model_folder import load_model_spec
    from PTQLogic.models.model_files import choose_model_source

    from test_bundle_zoo import write_bundle

    bundle = write_bundle(tmp_path / "wholeBody_ct_segmentation", "wholeBody_ct_segmentation")
    found = choose_model_source(bundle)
    assert (found.kind, found.quantizable, found.segmentable, found.spec_path) == \
        ("monai_bundle", True, False, str(bundle))
    for words in ("MONAI bundle 'Whole body CT segmentation'", "SegResNet", "104 classes (structure_1",
                  "patch 32x32x32", "gaussian blend", "padding_mode 'replicate'"):
        assert words in found.description
    spec = load_model_spec(bundle)
    assert spec.num_classes == 105 and spec.overlap == 0.25 and spec.weights_path() == bundle / "models" / "model.pt"


def test_model_catalog_lists_sources_and_architectures():
    """Every registered source and every network a spec or bundle can name is in Resources/model_catalog.json."""
    from PTQLogic.models.torch_models import ARCHITECTURES
    from PTQLogic.models.sources import SOURCES

    from conftest import ROOT

    catalog = json.loads((ROOT / "Resources" / "model_catalog.json").read_text())
    kinds = {s["kind"] for s in catalog["sources"]}
    assert {s.kind for s in SOURCES} | {"spec", "onnx", "torchscript"} <= kinds
    listed = {a["name"]: a for a in catalog["architectures"]}
    assert set(ARCHITECTURES) <= set(listed)
    assert all(set(a["sources"]) <= kinds for a in listed.values())
    for name in ARCHITECTURES:
        assert "monai_bundle" in listed[name]["sources"]


def test_bundle_expressions_agree_with_python_on_data(tmp_path):
    """Property: on data-only expressions the resolver's interpreter gives exactly what Python's eval gives."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from PTQLogic.core.errors import ModelError
    from PTQLogic.models.sources.bundle_config import BundleConfig

    numbers = st.integers(-50, 50).map(str) | st.sampled_from(["1.5", "2.0", "@flags#n", "True", "False"])
    lists = st.lists(numbers, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")

    def combine(children):
        return (st.tuples(children, st.sampled_from(["+", "-", "*", "==", "<", "and", "or"]), children)
                .map(lambda t: f"({t[0]} {t[1]} {t[2]})")
                | st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})")
                | children.map(lambda c: f"(not {c})"))

    expressions = st.recursive(numbers, combine, max_leaves=6) | st.tuples(lists, lists).map(lambda t: f"{t[0]} + {t[1]}")

    @settings(max_examples=150, deadline=None)
    @given(expressions)
    def check(text):
        python_text = text.replace("@flags#n", "7")
        try:
            expected = eval(python_text, {"__builtins__": {}})  # noqa: S307 -- test oracle on generated literals
        except Exception:
            return
        config = BundleConfig({"flags": {"n": 7}, "x": "$" + text}, tmp_path / "inference.json")
        try:
            got = config.get("x")
        except ModelError:  # refusing (e.g. arithmetic on booleans) is allowed; giving another value is not
            return
        assert got == (list(expected) if isinstance(expected, tuple) else expected)

    check()
