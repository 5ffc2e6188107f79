"""Bad MONAI bundles: one clear error naming the config key or file, nothing written, no code run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from PTQLogic.app.cli import main
from PTQLogic.core.errors import ModelError
from PTQLogic.samples.phantom import write_phantom_set
from PTQLogic.models.sources import find_source
from PTQLogic.models.sources.bundle import BundleSource

from test_bundle_zoo import write_bundle

MARKER = "PWNED-by-bundle"


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    bundle = write_bundle(root / "spleen", "spleen_ct_segmentation", roi=32)
    (image, _), = write_phantom_set(root / "images", 1, 3, shape=(32, 32, 32), spacing=(1.5, 1.5, 2.0))
    return bundle, image


def _edit(bundle, tmp_path, change):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    config = json.loads((copy / "configs" / "inference.json").read_text())
    change(config)
    (copy / "configs" / "inference.json").write_text(json.dumps(config))
    return copy


def _set(path, value):
    def change(config):
        node = config
        for key in path[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[path[-1]] = value
    return change


CODE = f"$__import__('pathlib').Path('{MARKER}').touch() or [4, 8, 16, 32, 64]"
BAD_CONFIGS = {
    "network target": (_set(["network_def", "_target_"], "torch.nn.Identity"), "network_def#_target_"),
    "network class": (_set(["network_def", "_target_"], "Regressor"), "network_def#_target_"),
    "network expression": (_set(["network_def", "channels"], CODE), "network_def#channels"),
    "transform target": (_set(["preprocessing", "transforms", 2, "_target_"], "Lambdad"),
                         "preprocessing#transforms#2#_target_"),
    "foreign transform": (_set(["preprocessing", "transforms", 4, "_target_"], "mypackage.transforms.Scale"),
                          "preprocessing#transforms#4#_target_"),
    "transform expression": (_set(["preprocessing", "transforms", 3, "pixdim"], "$list(map(float, [1, 1, 1]))"),
                             "preprocessing#transforms#3#pixdim"),
    "referenced expression": (_set(["preprocessing", "transforms", 3, "pixdim"], "@pixdim_code"),
                              "pixdim_code"),
    "inferer": (_set(["inferer", "_target_"], "SimpleInferer"), "inferer#_target_"),
    "sigmoid": (_set(["postprocessing", "transforms", 0, "sigmoid"], True), "postprocessing#transforms#0"),
    "macro": (_set(["inferer", "roi_size"], "%configs/train.json#roi"), "inferer#roi_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_names_the_key_writes_nothing_runs_nothing(case, good_bundle, tmp_path, capsys, monkeypatch):
    change, key = BAD_CONFIGS[case]
    bundle, image = good_bundle
    edited = _edit(bundle, tmp_path, change)
    config = json.loads((edited / "configs" / "inference.json").read_text())
    config["pixdim_code"] = "$[float(v) for v in (1.5, 1.5, 2.0)]"
    (edited / "configs" / "inference.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    code = main(["quantize", "--model", str(edited), "--calibration", str(image), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and f"'{key}" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no output folder, no marker file


@pytest.mark.parametrize("missing, words", [
    ("models/model.pt", "models/model.pt"),
    ("configs/inference.json", "configs/inference.json"),
    ("configs/metadata.json", "configs/metadata.json"),
    ("configs", "configs/inference.json"),
])
def test_missing_bundle_file_is_one_clear_error(missing, words, good_bundle, tmp_path, capsys):
    bundle, image = good_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    code = main(["quantize", "--model", str(copy), "--calibration", str(image), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_network_def(good_bundle, tmp_path, capsys):
    bundle, image = good_bundle
    edited = _edit(bundle, tmp_path, _set(["network_def", "channels"], [8, 16, 32, 64, 128]))
    code = main(["quantize", "--model", str(edited), "--calibration", str(image), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "shape" in err and "model.pt" in err and not (tmp_path / "out").exists()


def test_class_count_must_match_metadata(good_bundle, tmp_path):
    bundle, _ = good_bundle
    edited = _edit(bundle, tmp_path, _set(["network_def", "out_channels"], 3))
    with pytest.raises(ModelError, match="channel_def"):
        BundleSource().describe(edited)


def test_yaml_config_and_torchscript_model_read_like_json_and_state_dict(tmp_path):
    """inference.yaml and models/model.ts are read too: same spec, same logits as the JSON/state-dict bundle."""
    json_bundle = write_bundle(tmp_path / "json", "spleen_ct_segmentation", roi=32, seed=5)
    other = write_bundle(tmp_path / "yaml", "spleen_ct_segmentation", roi=32, seed=5, torchscript=True,
                         yaml_config=True)
    assert find_source(other).kind == "monai_bundle"
    a, b = BundleSource().load(json_bundle), BundleSource().load(other)
    assert b.spec.weights_format == "torchscript" and a.spec.weights_format == "state_dict"
    assert (a.spec.preprocessing, a.spec.patch_size, a.spec.class_names) == \
        (b.spec.preprocessing, b.spec.patch_size, b.spec.class_names)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(a.networks[0](x).numpy(), b.networks[0](x).numpy(), atol=1e-5)
