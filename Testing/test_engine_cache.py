"""EngineCache: reuse on identical fields, rebuild on any change, nothing left by failed builds."""
from __future__ import annotations

import json
import threading

import pytest

from PTQLogic.engines.cache import EngineCache, engine_fields
from PTQLogic.core.errors import Cancelled, PTQError
from PTQLogic.core.fileio import sha256_file
from PTQLogic.core.progress import Monitor

FIELDS = {
    "model_sha256": "ab" * 32,
    "precision": "int8",
    "calibration": {"method": "max", "num_patches": 32, "seed": 0},
    "shape_profile": {"min_batch": 1, "opt_batch": 1, "max_batch": 4, "patch": [96, 96, 96]},
    "runtime": "tensorrt",
    "runtime_version": "10.3.0",
    "device": "NVIDIA H100 sm_90",
}


class CountingBuild:
    def __init__(self, payload: bytes = b"engine-bytes"):
        self.calls = 0
        self.payload = payload

    def __call__(self, tmp):
        self.calls += 1
        tmp.write_bytes(self.payload + str(self.calls).encode())


def test_identical_fields_reuse_the_artifact(tmp_path):
    cache, build = EngineCache(tmp_path / "engines"), CountingBuild()
    first = cache.get_or_build(dict(FIELDS), build)
    reordered = dict(reversed(list(FIELDS.items())))  # key does not depend on field order
    second = EngineCache(tmp_path / "engines").get_or_build(reordered, build)
    assert first == second and build.calls == 1
    assert first.read_bytes() == b"engine-bytes1" and first.suffix == ".plan"
    assert first.name.startswith("tensorrt-int8-")
    sidecar = json.loads(first.with_name(first.name.replace(".plan", ".fields.json")).read_text())
    assert sidecar.pop("artifact_sha256") == sha256_file(first)  # verified before every reuse
    assert sidecar == FIELDS


@pytest.mark.parametrize("field,value", [
    ("model_sha256", "cd" * 32),
    ("precision", "fp16"),
    ("calibration", {"method": "entropy", "num_patches": 32, "seed": 0}),
    ("shape_profile", {"min_batch": 1, "opt_batch": 2, "max_batch": 4, "patch": [96, 96, 96]}),
    ("runtime_version", "10.4.0"),
    ("runtime", "tensorrt-rtx"),
    ("device", "NVIDIA H200 sm_90"),
])
def test_any_changed_field_rebuilds(tmp_path, field, value):
    cache, build = EngineCache(tmp_path), CountingBuild()
    original = cache.get_or_build(dict(FIELDS), build)
    changed = cache.get_or_build({**FIELDS, field: value}, build)
    assert build.calls == 2 and changed != original
    assert original.read_bytes() == b"engine-bytes1" and changed.read_bytes() == b"engine-bytes2"
    assert EngineCache.key(**FIELDS) != EngineCache.key(**{**FIELDS, field: value})


@pytest.mark.parametrize("error", [RuntimeError("builder crashed"), Cancelled("cancelled")])
def test_failed_or_cancelled_build_leaves_nothing(tmp_path, error):
    cache = EngineCache(tmp_path / "engines")

    def build(tmp):
        tmp.write_bytes(b"half an engine")
        raise error

    with pytest.raises(type(error)):
        cache.get_or_build(dict(FIELDS), build)
    assert list((tmp_path / "engines").iterdir()) == []
    # the next attempt builds from scratch
    good = CountingBuild()
    assert cache.get_or_build(dict(FIELDS), good).is_file() and good.calls == 1


def test_cancel_through_monitor_leaves_nothing(tmp_path):
    monitor = Monitor(cancel_event=threading.Event())

    def build(tmp):
        for step in range(3):
            tmp.write_bytes(b"x" * (step + 1))
            if step == 1:
                monitor.cancel()
            monitor.update("build", step, 3)

    with pytest.raises(Cancelled):
        EngineCache(tmp_path).get_or_build(dict(FIELDS), build)
    assert list(tmp_path.iterdir()) == []


def test_empty_build_output_is_an_error(tmp_path):
    with pytest.raises(PTQError, match="no output"):
        EngineCache(tmp_path).get_or_build(dict(FIELDS), lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


def test_engine_fields_hash_the_model_file(tmp_path):
    model = tmp_path / "int8.onnx"
    model.write_bytes(b"model v1")
    profile = {"min_batch": 1, "opt_batch": 1, "max_batch": 4}
    first = engine_fields(model, "int8", "tensorrt", "10.3", "H100", profile, {"method": "max"})
    model.write_bytes(b"model v2")
    second = engine_fields(model, "int8", "tensorrt", "10.3", "H100", profile, {"method": "max"})
    assert first["model_sha256"] != second["model_sha256"]
    assert EngineCache.key(**first) != EngineCache.key(**second)
    assert set(first) >= {"model_sha256", "precision", "calibration", "shape_profile", "runtime",
                          "runtime_version", "device"}
    # keys are stable across processes/runs: a pure function of the field values
    assert EngineCache.key(**first) == EngineCache.key(**json.loads(json.dumps(first)))


def test_engine_fields_key_on_content_not_file_name(tmp_path):
    """Issue 10 item 12: a renamed (or moved) identical model reuses its engines."""
    first, second = tmp_path / "int8.onnx", tmp_path / "copy" / "renamed-model.onnx"
    second.parent.mkdir()
    first.write_bytes(b"same model bytes")
    second.write_bytes(b"same model bytes")
    profile = {"min_batch": 1, "opt_batch": 1, "max_batch": 4}
    a = engine_fields(first, "int8", "tensorrt", "10.13", "H100", profile)
    b = engine_fields(second, "int8", "tensorrt", "10.13", "H100", profile)
    assert EngineCache.key(**a) == EngineCache.key(**b)
    assert "renamed" not in json.dumps(b) and "int8.onnx" not in json.dumps(a)


@pytest.mark.parametrize("change", [{"optimization_level": 1}, {"typing": "weak"}, {"high_precision": "fp32"},
                                    {"workspace_bytes": 1 << 30}, {"tf32": "default"}, {"recipe_version": 3},
                                    {"graph": ["dq-only weights to Q/DQ"]}])
def test_build_recipe_is_part_of_the_key(tmp_path, change):
    recipe = {"recipe_version": 2, "typing": "strong", "high_precision": "fp16", "graph": [], "tf32": "off",
              "optimization_level": 2, "workspace_bytes": 2 << 30, "instancenorm": "native"}
    cache, build = EngineCache(tmp_path), CountingBuild()
    first = cache.get_or_build({**FIELDS, "recipe": recipe}, build)
    second = cache.get_or_build({**FIELDS, "recipe": {**recipe, **change}}, build)
    assert first != second and build.calls == 2


def test_user_cache_dir(monkeypatch, tmp_path):
    from PTQLogic.engines.cache import user_cache_dir

    monkeypatch.setenv("PTQSEG_CACHE_DIR", str(tmp_path / "c"))
    assert user_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PTQSEG_CACHE_DIR")
    assert "ptqseg" in str(user_cache_dir())
