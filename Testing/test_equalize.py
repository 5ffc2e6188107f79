"""``quantize --equalize``: channel equalization of nnU-Net's PlainConvUNet before export.

It must leave the network's function unchanged in FP32 (asserted on networks built from plans, with two
convolutions per stage, and on the quantize path's exported ONNX), actually rescale
(channel ranges of the equalized tensors change), and refuse what it cannot equalize. What it buys in INT8 on a
trained network is a benchmark (``benchmarks/results/epyc-2core-avx512/whole_ct/organs_mixed_equalized_int8.md``)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

os.environ.setdefault("nnUNet_def_n_proc", "1")

import numpy as np
import pytest
import torch

from nnunet_factory import architecture, dataset, one_thread, plans, write_folder, write_image  # noqa: F401
from PTQLogic.app.cli import main
from PTQLogic.core.errors import InputError
from PTQLogic.models.nnunet.model_dir import open_nnunet_model
from PTQLogic.quantization.equalize import equalize_plain_unet, plain_unet_groups
from PTQLogic.samples.phantom import make_phantom

LABELS = ["background", "liver", "spleen", "kidney_right"]


def _network(tmp_path, **arch):
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [24, 24, 24], arch=architecture(**arch)), dataset(LABELS))
    return open_nnunet_model(folder).networks[0].eval()


def _trained_like(network):
    """He-initialized weights give every channel a similar range; trained ones do not: spread the norms' scales."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.mul_(torch.exp(2 * torch.randn(module.weight.shape, generator=generator)))
    return network


def _built(convs: int, nonlin_first: bool = False):
    """A PlainConvUNet as dynamic_network_architectures builds it, 4 stages, ``convs`` convolutions per stage."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    return PlainConvUNet(1, 4, (4, 8, 16, 16), torch.nn.Conv3d, 3, (1, 2, 2, (1, 2, 2)), convs, 3, convs,
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, nonlin_first=nonlin_first).eval()


@pytest.mark.parametrize("build", ["plans", "two-convs-per-stage"])
def test_the_equalized_network_computes_the_same_function(tmp_path, build):
    network = _trained_like(_network(tmp_path) if build == "plans" else _built(2))
    original = copy.deepcopy(network)
    windows = [torch.randn(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    report = equalize_plain_unet(network, windows)
    test = torch.randn(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        expected, got = original(test), network(test)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    norms = [(a, b) for a, b in zip(original.modules(), network.modules()) if isinstance(a, torch.nn.InstanceNorm3d)]
    assert any(not torch.allclose(a.weight, b.weight) for a, b in norms)  # it did rescale
    assert report.groups == len(plain_unet_groups(network)) and report.windows == 3
    assert report.spread_after < report.spread_before  # the equalized tensors' channels span less unequal ranges
    assert report.max_fp32_change < 1e-3 * float(expected.abs().max())


def test_a_cancel_between_windows_leaves_the_network_unchanged(tmp_path):
    from PTQLogic.core.errors import Cancelled

    network = _network(tmp_path)
    original = copy.deepcopy(network.state_dict())
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done == 2:
            raise Cancelled("cancelled")
    with pytest.raises(Cancelled):
        equalize_plain_unet(network, [torch.randn(1, 1, 24, 24, 24) for _ in range(3)], progress=progress)
    assert seen == [(1, 3), (2, 3)]
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in original.items())


def test_every_tensor_it_scales_has_its_consumers_named(tmp_path):
    network = _network(tmp_path)
    groups = plain_unet_groups(network)
    # 3 encoder stages and 2 decoder stages, one block each, and 2 transposed convolutions
    assert [g.name for g in groups] == ["encoder.0.0", "encoder.1.0", "encoder.2.0", "decoder.0.0", "decoder.1.0",
                                        "transposed.0", "transposed.1"]
    skip = groups[0]  # the first stage's output feeds the next stage and, after the skip, the last decoder stage
    assert len(skip.consumers) == 2 and skip.consumers[1][2] == network.decoder.transpconvs[1].weight.shape[1]
    assert groups[2].consumers == [(network.decoder.transpconvs[0].weight, 0, 0)]  # the bottleneck


def test_networks_it_cannot_equalize_are_refused(tmp_path):
    residual = _network(tmp_path, residual=True)
    with pytest.raises(InputError, match="PlainConvUNet"):
        equalize_plain_unet(residual, [torch.zeros(1, 1, 24, 24, 24)])
    plain = _network(tmp_path / "b")
    plain.encoder.stages[1][0].convs[0].nonlin = torch.nn.Sigmoid()
    with pytest.raises(InputError, match="affine norm"):
        equalize_plain_unet(plain, [torch.zeros(1, 1, 24, 24, 24)])
    with pytest.raises(InputError, match="affine norm"):  # nonlinearity before the norm: not a norm -> nonlin block
        equalize_plain_unet(_built(1, nonlin_first=True), [torch.zeros(1, 1, 24, 24, 24)])
    with pytest.raises(InputError, match="strength"):
        equalize_plain_unet(_network(tmp_path / "c"), [torch.zeros(1, 1, 24, 24, 24)], alpha=1.5)


def test_quantize_equalize_writes_the_equalized_network_and_records_it(tmp_path, capsys):
    import onnxruntime as ort

    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [24, 24, 24]), dataset(LABELS))
    calibration = [write_image(make_phantom(s, (30, 30, 30), (1.5, 1.5, 1.5))[0], tmp_path / f"cal_{s}.nii.gz")
                   for s in (31, 32)]
    out = tmp_path / "int8"
    code = main(["quantize", "--model", str(folder), "--calibration", *map(str, calibration), "--out", str(out),
                 "--patches", "4", "--no-guard", "--equalize", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "quantization.json").read_text())
    assert report["calibration"]["equalize"] is True
    equalized = report["folds"]["0"]["export"]["equalize"]
    assert equalized["groups"] == 7 and equalized["windows"] == 4
    from PTQLogic.app.cli import _equalize_text  # the line quantize prints without --json

    assert _equalize_text(equalized, "0").startswith("\n  fold 0: channels equalized before export (7 tensors on 4 ")
    # the exported FP32 file is the original network's function
    original = open_nnunet_model(folder).networks[0].eval()
    x = np.random.default_rng(0).standard_normal((1, 1, 24, 24, 24)).astype(np.float32)
    session = ort.InferenceSession(str(out / "fold_0" / "fp32.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.inference_mode():
        expected = original(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert main(["segment", "--model", str(out), "--input", str(calibration[0]), "--output",
                 str(tmp_path / "labels.nii.gz"), "--runtime", "openvino"]) == 0


def test_equalize_is_refused_for_models_that_are_not_nnunet_folders(quantized_unet, tmp_path, capsys):
    image = write_image(make_phantom(5, (40, 40, 40), (1.5, 1.5, 1.5))[0], tmp_path / "image.nii.gz")
    spec = str(Path(__file__).resolve().parents[1] / "PTQLogic" / "samples" / "data" / "phantom_unet.json")
    code = main(["quantize", "--model", spec, "--calibration", str(image), "--out", str(tmp_path / "q"),
                 "--equalize", "--no-guard"])
    assert code == 2
    assert "--equalize is for nnU-Net folders" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
