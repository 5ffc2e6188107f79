"""TensorRT helpers (testable anywhere) and TensorRT engines (only with TensorRT and a CUDA GPU)."""
from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from PTQLogic.engines.onnxruntime_engine import OnnxRuntimeEngine
from PTQLogic.engines.tensorrt_engine import dq_only_to_qdq, make_fp16_onnx
from PTQLogic.core.errors import EngineUnavailable

from test_engines import tiny_artifacts

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                               reason="needs TensorRT and a CUDA GPU")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("tensorrt"))


def ort(path, batch):
    return OnnxRuntimeEngine(path, "fp32", threads=2)(batch)


def test_module_imports_without_tensorrt():
    from PTQLogic.engines import tensorrt_engine

    if not HAS_TENSORRT:
        with pytest.raises(EngineUnavailable, match="TensorRT is not installed"):
            tensorrt_engine.import_tensorrt()


def test_make_fp16_onnx(artifacts, tmp_path):
    pytest.importorskip("onnxconverter_common", reason="onnxconverter-common makes the TensorRT FP16 graph; it comes "
                        "with the `test` and `gpu` install sets (pip install -e '.[cpu,test]')")
    dst = make_fp16_onnx(artifacts["fp32"], tmp_path / "fp16.onnx")
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    types = Counter(onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer)
    assert types["FLOAT16"] > 0 and types["FLOAT"] == 0, types
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    fp32_out, fp16_out = ort(artifacts["fp32"], artifacts["batch"]), ort(dst, artifacts["batch"])
    assert fp16_out.dtype == torch.float32
    error = (fp16_out - fp32_out).abs().max().item()
    assert 0 < error < 2e-2 * fp32_out.abs().max().item()  # FP16 arithmetic: close, not identical
    assert dst.stat().st_size < 0.7 * artifacts["fp32"].stat().st_size
    assert list(tmp_path.iterdir()) == [dst]  # atomic: no temporary left


def test_dq_only_to_qdq_keeps_the_numbers(artifacts, tmp_path):
    original = onnx.load(str(artifacts["int8"]))
    before = original.SerializeToString()
    int8_weights = {i.name for i in original.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    weight_dqs = [n for n in original.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights]
    assert weight_dqs, "the ModelOpt model should be DQ-only (INT8 weight initializers)"

    converted = dq_only_to_qdq(original)
    assert original.SerializeToString() == before  # input untouched
    onnx.checker.check_model(converted)
    inits = {i.name: i for i in converted.graph.initializer}
    ops = Counter(n.op_type for n in converted.graph.node)
    assert ops["QuantizeLinear"] == Counter(n.op_type for n in original.graph.node)["QuantizeLinear"] + len(weight_dqs)
    producers = {o: n for n in converted.graph.node for o in n.output}
    for dq in (n for n in converted.graph.node if n.op_type == "DequantizeLinear"):
        assert dq.input[0] not in inits or inits[dq.input[0]].data_type != onnx.TensorProto.INT8
        q = producers[dq.input[0]]
        assert q.op_type == "QuantizeLinear" and list(q.input[1:]) == list(dq.input[1:])
        weight = inits.get(q.input[0])
        if weight is not None:  # a weight: FP32 initializer quantized with the same scale/axis
            assert weight.data_type == onnx.TensorProto.FLOAT
            assert [a.i for a in q.attribute if a.name == "axis"] == [a.i for a in dq.attribute if a.name == "axis"]

    path = tmp_path / "qdq.onnx"
    onnx.save(converted, str(path))
    batch = artifacts["batch"]
    torch.testing.assert_close(ort(path, batch), ort(artifacts["int8"], batch), atol=1e-5, rtol=1e-5)
    assert not {dq.input[0] for dq in weight_dqs} & set(inits)  # INT8 weights replaced by their FP32 values


def test_dq_only_to_qdq_leaves_float_models_alone(artifacts):
    fp32 = onnx.load(str(artifacts["fp32"]))
    assert dq_only_to_qdq(fp32).SerializeToString() == fp32.SerializeToString()


# ---- real TensorRT (skipped without TensorRT + CUDA) ----

@needs_gpu
def test_fp32_and_int8_plans_agree(artifacts, tmp_path):
    from PTQLogic.engines.tensorrt_engine import TensorRTEngine, build_tensorrt_plan

    batch = artifacts["batch"].cuda()
    reference = ort(artifacts["fp32"], artifacts["batch"])
    fp32_plan = build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "fp32.plan", max_batch=4,
                                    timing_cache_path=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    fp32 = TensorRTEngine(fp32_plan, "fp32")
    out = fp32(batch)
    assert out.is_cuda and out.shape == reference.shape
    torch.testing.assert_close(out.cpu(), reference, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fp32(batch[1:2]).cpu()[0], out.cpu()[1], atol=1e-3, rtol=1e-3)  # dynamic batch

    from PTQLogic.engines.tensorrt_engine import _native_instancenorm_flag, import_tensorrt

    native = _native_instancenorm_flag(import_tensorrt()) is not None
    with contextlib.nullcontext() if native else pytest.warns(RuntimeWarning, match="no native InstanceNorm"):
        int8_plan = build_tensorrt_plan(artifacts["int8"], "int8", tmp_path / "int8.plan",
                                        timing_cache_path=tmp_path / "timing.cache")
    int8_out = TensorRTEngine(int8_plan, "int8")(batch).cpu()
    agreement = (int8_out.argmax(1) == reference.argmax(1)).float().mean().item()
    ort_int8 = ort(artifacts["int8"], artifacts["batch"])  # what the INT8 file itself computes
    seen = (f"TensorRT INT8 vs FP32: agreement {agreement:.4f}, max |diff| {(int8_out - reference).abs().max():.4f}; "
            f"vs ONNX Runtime INT8: agreement {(int8_out.argmax(1) == ort_int8.argmax(1)).float().mean():.4f}, "
            f"max |diff| {(int8_out - ort_int8).abs().max():.4f}; ONNX Runtime INT8 vs FP32: agreement "
            f"{(ort_int8.argmax(1) == reference.argmax(1)).float().mean():.4f}")
    # ONNX Runtime runs this INT8 file at 0.999; TensorRT 8.6.0 with the norms decomposed gave 0.929 on an H100
    # (benchmarks/results/h100-trt86/2026-12-05-run3/test_tensorrt_real.log), hence the build's warning
    assert agreement >= (0.95 if native else 0.9) and (int8_out - reference).abs().max().item() > 1e-3, seen

    again = TensorRTEngine(fp32_plan, "fp32")  # a second deserialization of the same plan
    torch.testing.assert_close(again(batch), out)


@needs_gpu
def test_create_engine_caches_plans(artifacts, tmp_path):
    from PTQLogic.engines import create_engine

    paths = dict(fp32_onnx=artifacts["fp32"], int8_onnx=artifacts["int8"], cache_dir=tmp_path / "engines")
    first = create_engine("tensorrt", "int8", **paths)
    plans = sorted((tmp_path / "engines").glob("*.plan"))
    assert len(plans) == 1 and first.info.path == str(plans[0])
    mtime = plans[0].stat().st_mtime_ns
    second = create_engine("tensorrt", "int8", **paths)
    assert second.info.path == first.info.path and plans[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    fp16 = create_engine("tensorrt", "fp16", **paths)
    reference = ort(artifacts["fp32"], artifacts["batch"])
    out = fp16(artifacts["batch"].cuda()).cpu()
    assert (out.argmax(1) == reference.argmax(1)).float().mean().item() >= 0.98
    assert len(list((tmp_path / "engines").glob("*.plan"))) == 2


@needs_gpu
def test_foreign_plan_is_unavailable(tmp_path):
    from PTQLogic.engines.tensorrt_engine import TensorRTEngine

    bad = tmp_path / "foreign.plan"
    bad.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(EngineUnavailable, match="rebuild"):
        TensorRTEngine(bad, "fp32")


# ---- builder/runner logic against a TensorRT stand-in (issue 10, items 7-12) ----
# The stand-in (Testing/trt_standin.py) copies names, enum values and signatures from the real
# tensorrt-stubs 10.13.0.35.1 package; version differences (8.6.0/8.6.1/11) follow TensorRT's sources.
# These tests check PTQLogic's logic, not TensorRT; the real builds run in the needs_gpu tests above.

import json
import shutil
import sys
import warnings

from trt_standin import make_tensorrt

from PTQLogic.engines import tensorrt_engine as te
from PTQLogic.engines import tensorrt_runner as tr
from PTQLogic.core.errors import Cancelled, InputError, ModelError
from PTQLogic.core.progress import Monitor


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """Install a stand-in ``tensorrt`` of the requested version; the user cache goes to tmp_path."""
    monkeypatch.setenv("PTQSEG_CACHE_DIR", str(tmp_path / "user-cache"))

    def install(version="10.13.0.35", device="Stand-in GPU"):
        trt = make_tensorrt(version, device)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


def _plan(path):
    return json.loads(path.read_bytes())


@pytest.mark.parametrize("version", ["8.6.0", "8.6.1", "10.13.0.35"])
def test_instancenorm_is_native_on_every_version(standin, artifacts, tmp_path, version):
    """Item 7: TensorRT 8.6.0 calls the native-InstanceNorm parser flag VERSION_COMPATIBLE."""
    standin(version)
    assert "InstanceNormalization" in {n.op_type for n in onnx.load(str(artifacts["fp32"])).graph.node}
    plan = _plan(te.build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "a.plan"))
    assert plan["instancenorm"] == "native"


def test_recipe_flags_per_version(standin, artifacts, tmp_path):
    trt = standin("8.6.1")
    plan = _plan(te.build_tensorrt_plan(artifacts["int8"], "int8", tmp_path / "int8.plan"))
    assert not plan["strongly_typed"] and {"INT8", "FP16"} <= set(plan["flags"])
    assert plan["optimization_level"] == te.DEFAULT_OPTIMIZATION_LEVEL == 2 and plan["workspace"] == 2 << 30
    assert te.build_recipe(trt, "int8")["graph"] == ["dq-only weights to Q/DQ", "no Q/DQ before linear Resize"]
    standin("10.13.0.35")
    plan = _plan(te.build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "fp32.plan", optimization_level=0))
    assert plan["strongly_typed"] and "TF32" not in plan["flags"] and plan["optimization_level"] == 0
    trt = standin("11.4.0")
    plan = _plan(te.build_tensorrt_plan(artifacts["int8"], "int8", tmp_path / "int8-11.plan"))
    assert plan["strongly_typed"] and plan["flags"] == ["TF32"]  # no precision flags exist in 11
    with pytest.raises(InputError, match="0-5"):
        te.TensorRTBuildOptions(optimization_level=7)


@pytest.mark.parametrize("error", [ValueError("progress display broke"), Cancelled("stop"), KeyboardInterrupt()])
def test_errors_in_the_progress_callback_are_raised_after_the_build(standin, artifacts, tmp_path, error):
    """Item 9: the binding swallows exceptions from step_complete; they must not become 'failed to build'."""
    standin()
    calls = []

    def on_progress(stage, done, total):
        calls.append(stage)
        if stage.startswith("TensorRT: Building") and done == 2:
            raise error

    with pytest.raises(type(error)) as raised:
        te.build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "x.plan", monitor=Monitor(on_progress=on_progress))
    if isinstance(error, Cancelled):
        assert "no engine was written" in str(raised.value)
    assert "TensorRT: Building engine" in calls and list(tmp_path.glob("*.plan")) == []


@pytest.mark.parametrize("blob", [b"\x00garbage", b"TIMING:Some other GPU:7"])
def test_bad_timing_cache_falls_back_to_a_fresh_one(standin, artifacts, tmp_path, blob):
    """Item 11: a damaged (create_timing_cache -> None) or foreign (set_timing_cache -> False) cache."""
    trt = standin()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(blob)
    with pytest.warns(RuntimeWarning, match="starting a fresh one"):
        plan = te.build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "a.plan", timing_cache_path=cache)
    assert plan.is_file() and cache.read_bytes() == b"TIMING:Stand-in GPU:1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good cache is reused silently and grows
        te.build_tensorrt_plan(artifacts["fp32"], "fp32", tmp_path / "b.plan", timing_cache_path=cache)
    assert cache.read_bytes() == b"TIMING:Stand-in GPU:2"
    assert ("create_timing_cache", b"TIMING:Stand-in GPU:1") in trt.calls


def test_cached_plan_key_holds_recipe_and_content(standin, artifacts, tmp_path):
    """Item 12 (cache): renamed identical model reuses the plan; recipe changes rebuild; build time reported."""
    standin()
    engines = tmp_path / "engines"
    plan, info = te.cached_plan(artifacts["fp32"], "fp32", engines, "Stand-in GPU", 4, Monitor())
    assert info["from_cache"] is False and info["build_seconds"] > 0 and info["optimization_level"] == 2
    assert info["timing_cache"].startswith(str(tmp_path / "user-cache" / "tensorrt"))
    renamed = tmp_path / "elsewhere" / "renamed.onnx"
    renamed.parent.mkdir()
    shutil.copyfile(artifacts["fp32"], renamed)
    again, info = te.cached_plan(renamed, "fp32", engines, "Stand-in GPU", 4, Monitor())
    assert again == plan and info["from_cache"] is True and info["build_seconds"] is None
    with te.use_build_options(te.TensorRTBuildOptions(optimization_level=1, timing_cache="off")):
        faster, info = te.cached_plan(renamed, "fp32", engines, "Stand-in GPU", 4, Monitor())
    assert faster != plan and _plan(faster)["optimization_level"] == 1 and info["timing_cache"] is None
    sidecar = json.loads(faster.with_name(faster.name.replace(".plan", ".fields.json")).read_text())
    assert {"typing", "high_precision", "optimization_level", "workspace_bytes", "tf32", "graph"} <= set(sidecar["recipe"])


def test_int8_on_strongly_typed_tensorrt_uses_fp16_high_precision(standin, artifacts, tmp_path):
    """Item 8: the INT8 graph TensorRT 10/11 builds keeps Q/DQ INT8 and runs the rest in FP16."""
    standin("10.13.0.35")
    plan, info = te.cached_plan(artifacts["int8"], "int8", tmp_path / "engines", "Stand-in GPU", 4, Monitor())
    assert info["high_precision"] == "fp16" and info["graph"][0].startswith("int8 high precision fp16 (modelopt")
    built = _plan(plan)
    assert "FLOAT16" in built["float_types"] and "FLOAT" not in built["float_types"] and "INT8" in built["float_types"]
    assert [t["dtype"] for t in built["io"]] == ["FLOAT", "FLOAT"]  # the runner still passes FP32
    derived = list((tmp_path / "engines").glob("onnx-graph-int8-*.onnx"))
    assert len(derived) == 1
    batch = artifacts["batch"]
    fp32_hp, fp16_hp = ort(artifacts["int8"], batch), ort(derived[0], batch)
    assert (fp16_hp.argmax(1) == fp32_hp.argmax(1)).float().mean().item() >= 0.98
    assert (fp16_hp - fp32_hp).abs().max().item() < 0.05 * fp32_hp.abs().max().item()
    standin("8.6.1")  # weakly typed: the INT8+FP16 flags do it, no derived graph, and another key
    plan86, info86 = te.cached_plan(artifacts["int8"], "int8", tmp_path / "engines", "Stand-in GPU", 4, Monitor())
    assert plan86 != plan and info86["typing"] == "weak" and {"INT8", "FP16"} <= set(_plan(plan86)["flags"])


def test_runner_maps_every_io_type(standin):
    """Item 12 (runner): INT8/INT32/INT64/BF16/BOOL/UINT8 I/O map to torch; others give a clear error."""
    trt = standin()
    expected = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int8: torch.int8, trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool,
                trt.uint8: torch.uint8}
    assert {k: tr.torch_dtype(trt, k) for k in expected} == expected
    with pytest.raises(ModelError, match="FP8.*float32/float16"):
        tr.torch_dtype(trt, trt.fp8)


def test_misaligned_inputs_are_copied_to_aligned_memory(standin):
    """Item 10: a batch slice can start at any address; TensorRT needs 256-byte aligned addresses."""
    trt = standin()
    base = torch.arange(4 * 1 * 8 * 8 * 8, dtype=torch.float32)
    misaligned = base[3:3 + 2 * 512].view(2, 1, 8, 8, 8)
    assert misaligned.data_ptr() % 256 != 0
    fixed = tr.aligned(misaligned)
    assert fixed.data_ptr() % 256 == 0 and torch.equal(fixed, misaligned) and fixed.is_contiguous()
    assert tr.aligned(fixed) is fixed  # no copy when not needed
    context = trt.ICudaEngine({"io": [{"name": "x", "mode": "INPUT", "dtype": "FLOAT", "shape": [1]}]}
                              ).create_execution_context()
    with pytest.raises(ModelError, match="256-byte aligned"):
        tr.bind(context, "x", misaligned)
    tr.bind(context, "x", fixed)
    assert context.addresses == {"x": fixed.data_ptr()}


class _StreamStandIn:
    """torch.cuda.Stream cannot be created without a GPU: the two attributes the runner uses."""

    def __init__(self, handle):
        self.cuda_stream, self.synchronized = handle, 0

    def synchronize(self):
        self.synchronized += 1


def test_enqueue_uses_a_dedicated_stream_and_waits(standin):
    """Item 12 (stream): never the legacy default stream (handle 0); synchronize after enqueueing."""
    trt = standin()
    context = trt.ICudaEngine({"io": [{"name": "x", "mode": "INPUT", "dtype": "FLOAT", "shape": [1]}]}
                              ).create_execution_context()
    context.set_tensor_address("x", 256 * 4)
    with pytest.raises(ModelError, match="default CUDA stream"):
        tr.enqueue(context, _StreamStandIn(0))
    stream = _StreamStandIn(0x7F00)
    tr.enqueue(context, stream)
    assert context.streams == [0x7F00] and stream.synchronized == 1


def test_cli_tensorrt_options(tmp_path, capsys):
    """`ptqseg build/segment/benchmark --trt-opt-level/--trt-timing-cache` set the options of every build."""
    from PTQLogic.app import cli

    parser = cli.build_parser()
    base = {"build": ["--model", "m"], "segment": ["--model", "m", "--input", "i", "--output", "o.nrrd"],
            "benchmark": ["--model", "m", "--input", "i", "--out", "b"]}
    for command, rest in base.items():
        args = parser.parse_args([command, *rest, "--trt-opt-level", "0", "--trt-timing-cache", "off"])
        with cli._tensorrt_options(args):
            assert te.current_build_options() == te.TensorRTBuildOptions(optimization_level=0, timing_cache="off")
        assert te.current_build_options() == te.TensorRTBuildOptions()  # restored afterwards
        args = parser.parse_args([command, *rest])
        with cli._tensorrt_options(args):
            assert te.current_build_options().optimization_level == te.DEFAULT_OPTIMIZATION_LEVEL
    from PTQLogic.app.cli_support import UsageError

    with pytest.raises(UsageError, match="--trt-opt-level"):  # main() prints it as one error line, exit 2
        parser.parse_args(["build", "--model", "m", "--trt-opt-level", "9"])
