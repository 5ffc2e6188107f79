"""Every CPU runtime on one tiny exported + ModelOpt-quantized UNet: agreement, INT8 execution, info."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

from PTQLogic.engines import Engine, available_runtimes, choose_runtime, create_engine
from PTQLogic.engines.onnxruntime_engine import OnnxRuntimeEngine
from PTQLogic.engines.openvino_engine import OpenVINOEngine
from PTQLogic.engines.torch_engine import TorchEngine
from PTQLogic.core.errors import EngineUnavailable, InputError, ModelError
from PTQLogic.models.onnx_export import export_onnx
from PTQLogic.quantization.quantize import QuantizeSettings, quantize_onnx
from PTQLogic.core.spec import spec_from_dict
from qdq_graphs import convs_after_a_concat

PATCH = (16, 16, 16)


def smooth_patches(count: int, seed: int) -> np.ndarray:
    """Blob-like inputs (random noise averaged over 3^3 neighbourhoods): closer to images than white noise."""
    noise = torch.from_numpy(np.random.RandomState(seed).randn(count, 1, *PATCH).astype(np.float32))
    return (torch.nn.functional.avg_pool3d(noise, 3, stride=1, padding=1) * 3).numpy()


def tiny_artifacts(folder, train_steps: int = 12) -> dict:
    """A tiny MONAI UNet, its weights, fp32.onnx (export_onnx), int8.onnx (quantize_onnx), patches, logits."""
    torch.manual_seed(0)
    spec = spec_from_dict({
        "name": "tiny-unet", "architecture": "UNet",
        "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2]},
        "classes": ["background", "a", "b"], "patch_size": list(PATCH),
    })
    from monai.networks.nets import UNet

    model = UNet(**spec.kwargs)
    # a few training steps give confident logits: random weights leave many near-ties that flip under INT8
    optimizer = torch.optim.Adam(model.parameters(), 3e-2)
    for step in range(train_steps):
        x = torch.from_numpy(smooth_patches(2, 100 + step))
        bands = (x[:, 0] > 0.4).long() + (x[:, 0] > -0.4).long()
        loss = torch.nn.functional.cross_entropy(model(x), bands)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    fp32 = export_onnx(model, spec, folder / "fp32.onnx").path
    int8 = quantize_onnx(fp32, smooth_patches(8, 1), folder / "int8.onnx", QuantizeSettings()).path
    batch = torch.from_numpy(smooth_patches(3, 2))
    with torch.no_grad():
        reference = model(batch)
    return {"model": model, "weights": weights, "fp32": fp32, "int8": int8, "batch": batch, "reference": reference}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("engines"))


def quantized_conv_count(path) -> int:
    """Conv/ConvTranspose nodes whose weight comes from a DequantizeLinear in the ONNX graph."""
    graph = onnx.load(str(path)).graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return sum(n.op_type in ("Conv", "ConvTranspose") and n.input[1] in dq_outputs for n in graph.node)


def make(runtime: str, precision: str, art) -> Engine:
    return create_engine(runtime, precision, fp32_onnx=art["fp32"], int8_onnx=art["int8"],
                         torch_model=art["model"], weights_path=art["weights"], threads=2)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_fp32_engines_match_torch(artifacts, runtime):
    engine = make(runtime, "fp32", artifacts)
    assert isinstance(engine, Engine)
    out = engine(artifacts["batch"])
    assert out.dtype == torch.float32 and out.shape == artifacts["reference"].shape == (3, 3, *PATCH)
    torch.testing.assert_close(out, artifacts["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_engines_quantize_but_agree(artifacts, runtime):
    engine = make(runtime, "int8", artifacts)
    out = engine(artifacts["batch"])
    reference = artifacts["reference"]
    assert out.shape == reference.shape
    agreement = (out.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 0.95, f"{runtime} INT8 argmax agrees with FP32 on only {agreement:.3f} of voxels"
    # quantized arithmetic really ran: outputs differ clearly from FP32 (FP32 engines agree to 1e-4)
    assert (out - reference).abs().max().item() > 1e-3


def test_openvino_runs_quantized_convolutions_in_int8(artifacts):
    expected = quantized_conv_count(artifacts["int8"])
    assert expected >= 2  # the tiny UNet has quantized Conv and ConvTranspose layers
    engine = OpenVINOEngine(artifacts["int8"], "int8", threads=2)
    int8 = engine.int8_layer_summary()
    if engine.unsigned_concats:  # no AMX: a conv after a (uint8) concat runs in float, correctly (openvino_engine)
        expected -= convs_after_a_concat(artifacts["int8"])
    assert int8["int8"] == expected, int8
    assert int8["convolutions"] == 5 and int8["not_int8"] == 5 - expected
    fp32 = OpenVINOEngine(artifacts["fp32"], "fp32", threads=2).int8_layer_summary()
    assert fp32["convolutions"] == 5 and fp32["int8"] == 0 and fp32["precisions"] == {"f32": 5}


def test_openvino_keeps_the_rewritten_int8_graph_in_its_cache(artifacts, tmp_path):
    """INT8 on a CPU without AMX (capped here below AMX, as on most CPUs): the graph with uint8 quantizers after
    each Concat is made once and kept in the engine cache; a later process reads it from there without importing
    onnx, and computes the same logits. The model file itself is never changed."""
    import subprocess
    import sys

    torch.save(artifacts["batch"], tmp_path / "batch.pt")
    code = ("import sys, torch; from PTQLogic.engines.openvino_engine import OpenVINOEngine; "
            "e = OpenVINOEngine(sys.argv[1], 'int8', threads=2, cache_dir=sys.argv[2]); "
            "torch.save(e(torch.load(sys.argv[3])), sys.argv[4]); print(e.unsigned_concats, 'onnx' in sys.modules)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
    before = artifacts["int8"].read_bytes()
    runs = []
    for name in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", code, str(artifacts["int8"]), str(tmp_path / "cache"),
                               str(tmp_path / "batch.pt"), str(tmp_path / f"{name}.pt")],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(done.stdout.split())
    assert runs == [["True", "True"], ["True", "False"]]  # rewritten with onnx, then read from the cache
    kept = list((tmp_path / "cache").glob("unsigned-concats-v*.onnx"))
    assert len(kept) == 1 and kept[0].stat().st_size > 0
    assert torch.equal(torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt"))
    assert artifacts["int8"].read_bytes() == before


def test_engine_info_describes_the_artifact(artifacts):
    import onnxruntime
    import openvino

    cases = [
        (make("torch", "fp32", artifacts), artifacts["weights"], torch.__version__),
        (make("onnxruntime", "fp32", artifacts), artifacts["fp32"], onnxruntime.__version__),
        (make("onnxruntime", "int8", artifacts), artifacts["int8"], onnxruntime.__version__),
        (make("openvino", "fp32", artifacts), artifacts["fp32"], openvino.__version__),
        (make("openvino", "int8", artifacts), artifacts["int8"], openvino.__version__),
    ]
    for engine, path, version in cases:
        info = engine.info
        assert info.bytes_on_disk == path.stat().st_size and info.path == str(path)
        assert info.runtime_version == version and info.precision in path.name + "fp32.pt"
        assert info.to_dict()["runtime"] in ("torch", "onnxruntime", "openvino")
    assert artifacts["int8"].stat().st_size < artifacts["fp32"].stat().st_size
    # without a weights file, the torch engine reports its parameter bytes
    params = sum(p.numel() * 4 for p in artifacts["model"].parameters())
    assert TorchEngine(artifacts["model"]).info.bytes_on_disk >= params > 0


@pytest.mark.parametrize("runtime,precision", [("onnxruntime", "int8"), ("openvino", "int8"), ("openvino", "fp32")])
def test_dynamic_batch(artifacts, runtime, precision):
    engine = make(runtime, precision, artifacts)
    batch3 = engine(artifacts["batch"])
    batch1 = engine(artifacts["batch"][1:2])
    assert batch1.shape == (1, 3, *PATCH) and batch3.shape == (3, 3, *PATCH)
    torch.testing.assert_close(batch1[0], batch3[1], atol=1e-4, rtol=1e-4)
    again = engine(artifacts["batch"][1:2])  # results are not overwritten by the next call
    torch.testing.assert_close(batch1, again)


def test_engine_as_monai_predictor(artifacts):
    from monai.inferers import sliding_window_inference

    engine = make("openvino", "fp32", artifacts)
    volume = torch.from_numpy(smooth_patches(1, 3)).repeat(1, 1, 2, 1, 1)[..., :24, :20, :16]
    with torch.no_grad():
        expected = sliding_window_inference(volume, PATCH, 2, artifacts["model"], overlap=0.25)
    got = sliding_window_inference(volume, PATCH, 2, engine, overlap=0.25)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(available_runtimes()["tensorrt"] is None, reason="TensorRT is usable here")
def test_choose_runtime_without_gpu():
    runtime, reason = choose_runtime("int8")
    assert runtime == "openvino" and "OpenVINO" in reason and "GPU" in reason
    assert choose_runtime("fp32")[0] == "openvino"
    with pytest.raises(EngineUnavailable, match="GPU"):
        choose_runtime("fp16")
    with pytest.raises(InputError, match="precision"):
        choose_runtime("int4")


@pytest.mark.skipif(available_runtimes()["tensorrt"] is None, reason="TensorRT is usable here")
def test_tensorrt_unavailable_here(artifacts):
    reason = available_runtimes()["tensorrt"]
    assert reason and ("not installed" in reason or "GPU" in reason)
    with pytest.raises(EngineUnavailable, match="tensorrt"):
        make("tensorrt", "int8", artifacts)


def test_auto_runtime_and_bad_requests(artifacts):
    engine = make("auto", "int8", artifacts)
    assert engine.info.runtime == choose_runtime("int8")[0] and engine.info.precision == "int8"
    with pytest.raises(ModelError, match="INT8 ONNX.*quantize"):
        create_engine("openvino", "int8", fp32_onnx=artifacts["fp32"])
    with pytest.raises(ModelError, match="does not exist"):
        create_engine("onnxruntime", "int8", int8_onnx=artifacts["fp32"].parent / "missing.onnx")
    with pytest.raises(ModelError, match="PyTorch model"):
        create_engine("torch", "fp32", fp32_onnx=artifacts["fp32"])
    with pytest.raises(EngineUnavailable, match="int8"):
        create_engine("torch", "int8", torch_model=artifacts["model"])
    with pytest.raises(EngineUnavailable, match="does not run fp16"):
        create_engine("openvino", "fp16", fp32_onnx=artifacts["fp32"])
    with pytest.raises(InputError, match="runtime"):
        create_engine("tflite", "fp32", fp32_onnx=artifacts["fp32"])


def test_torch_fp16_needs_cuda(artifacts):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(EngineUnavailable, match="CUDA"):
        TorchEngine(artifacts["model"], "fp16")
    with pytest.raises(EngineUnavailable, match="CUDA"):
        OnnxRuntimeEngine(artifacts["fp32"], "fp32", device="cuda")


def test_an_fp32_torch_engine_stays_fp32_inside_a_callers_autocast():
    """nnunetv2's predictor runs every CUDA sliding window inside torch.autocast; an FP32 engine must not take its
    convolutions to lower precision there. Checked on the CPU, where autocast goes to bf16 the same way."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1)).eval()
    engine = TorchEngine(net, precision="fp32", device="cpu")
    x = torch.randn(1, 1, 16, 16, 16)
    plain = engine(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = engine(x)
        lowered = net(x)  # what the same network does there without the engine's guard
    assert lowered.dtype == torch.bfloat16 and not torch.equal(lowered.float(), plain)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


def test_broken_onnx_is_a_model_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        OnnxRuntimeEngine(bad, "fp32")
    with pytest.raises(ModelError, match="OpenVINO cannot read"):
        OpenVINOEngine(bad, "fp32")


def test_openvino_sliding_window_reads_logits_in_place_with_the_same_result(artifacts):
    """The sliding window takes OpenVINO's logits without a copy (forward_transient): each result is blended
    before the next call, so the labels equal those of the copying call, batch of 2 windows included."""
    from PTQLogic.inference.segmenter import segment_volume
    from PTQLogic.core.volume import Volume

    class Copying:  # the same engine seen through its copying __call__ only
        def __init__(self, engine):
            self.engine, self.device, self.info = engine, engine.device, engine.info

        def __call__(self, batch):
            return self.engine(batch)

    engine = make("openvino", "int8", artifacts)
    x = torch.randn(2, 1, *PATCH)
    first = engine.forward_transient(x).clone()
    assert torch.equal(first, engine(x))
    spec = spec_from_dict({"name": "t", "architecture": "UNet", "classes": ["background", "a", "b"],
                           "patch_size": list(PATCH), "overlap": 0.5,
                           "preprocessing": {"orientation": "RAS", "spacing": None, "intensity": "none"}})
    noise = torch.from_numpy(np.random.RandomState(5).randn(1, 1, 28, 30, 26).astype(np.float32))
    image = (torch.nn.functional.avg_pool3d(noise, 3, stride=1, padding=1)[0, 0] * 3).numpy()
    volume = Volume(image, np.diag([1.0, 1.0, 1.0, 1.0]))
    transient_calls = []
    read_in_place = engine.forward_transient
    engine.forward_transient = lambda batch: transient_calls.append(batch.shape[0]) or read_in_place(batch)
    in_place = segment_volume(volume, spec, engine, batch_size=2)
    assert transient_calls and max(transient_calls) == 2  # the window batches did go through the no-copy call
    copied = segment_volume(volume, spec, Copying(engine), batch_size=2)
    assert np.array_equal(in_place.labels.array, copied.labels.array)
    assert len(np.unique(in_place.labels.array)) == 3


def test_openvino_bf16_float_layers_on_request(artifacts, monkeypatch):
    """--cpu-float bf16 / $PTQSEG_CPU_FLOAT: the float remainder of the INT8 graph runs in bf16 where the CPU
    has it (AMX/AVX512-BF16), labels stay those of f32; f32 stays the default; a bad value is refused."""
    import openvino

    from PTQLogic.engines.openvino_engine import cpu_float_precision, native_bf16

    f32 = OpenVINOEngine(artifacts["int8"], "int8", threads=2)
    assert f32.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    monkeypatch.setenv("PTQSEG_CPU_FLOAT", "bf16")
    bf16 = OpenVINOEngine(artifacts["int8"], "int8", threads=2)
    native = native_bf16(openvino.Core())
    assert ("bf16" in bf16.info.device) == native
    expected_hint = "bf16" if native else "f32"  # no native bf16: f32, not OpenVINO's slower emulation
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == expected_hint
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a CPU without bf16, as far as oneDNN's kernels go
    assert not native_bf16(openvino.Core())
    capped = OpenVINOEngine(artifacts["int8"], "int8", threads=2)
    assert capped.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    x = artifacts["batch"]
    assert (f32(x).argmax(1) == bf16(x).argmax(1)).float().mean() > 0.98
    monkeypatch.setenv("PTQSEG_CPU_FLOAT", "fp8")
    with pytest.raises(InputError, match="PTQSEG_CPU_FLOAT"):
        cpu_float_precision()
    assert cpu_float_precision("f32") == "f32"
    monkeypatch.setenv("PTQSEG_CPU_FLOAT", "bf16")
    fp32 = OpenVINOEngine(artifacts["fp32"], "fp32", threads=2)  # FP32 stays FP32 whatever the setting says ...
    assert fp32.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    # ... unless its caller names a float precision for it (segment --fp32-windows under --cpu-float bf16)
    asked = OpenVINOEngine(artifacts["fp32"], "fp32", threads=2, float_precision="bf16")
    now = "bf16" if native_bf16(openvino.Core()) else "f32"  # the cap above was lifted again
    assert asked.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == now
    assert asked.float_precision == now and fp32.float_precision == "f32"


def test_onnxruntime_fp32_runs_transposed_convs_as_subpixel_convs(artifacts):
    """ONNX Runtime's CPU FP32 engine runs the UNet's ConvTranspose layers rewritten exactly (sub-pixel Conv +
    shuffle: its 3D ConvTranspose is slow); the logits still match PyTorch to 1e-4. INT8 files run as written."""
    engine = OnnxRuntimeEngine(artifacts["fp32"], "fp32", threads=2)
    assert engine.subpixel_layers == 2  # the tiny UNet's two up-sampling layers
    torch.testing.assert_close(engine(artifacts["batch"]), artifacts["reference"], atol=1e-4, rtol=1e-4)
    assert OnnxRuntimeEngine(artifacts["int8"], "int8", threads=2).subpixel_layers == 0
