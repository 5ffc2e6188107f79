"""The real-CT sample model (benchmarks/training/train_ct_model.py): label mapping, and FP32 vs INT8 fidelity per runtime
on the labeled CT with few calibration patches. Skips with the reason when the CT or the weights are absent."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks" / "training"))
from train_ct_model import BTCV_FROM_TOTALSEG, SPEC, load_ct_pair, map_labels, spec_for  # noqa: E402

CT_SPEC = ROOT / "PTQLogic" / "samples" / "data" / "ct_unet.json"


def test_totalsegmentator_labels_map_to_btcv_classes():
    source = np.array([0, 1, 5, 52, 63, 64, 15, 117, 9, 8], dtype=np.int16)
    assert map_labels(source).tolist() == [0, 1, 5, 10, 11, 12, 0, 0, 9, 8]
    assert len(SPEC["classes"]) == 1 + len(BTCV_FROM_TOTALSEG) == 13
    assert SPEC["kwargs"]["out_channels"] == 13


def test_segresnet_sibling_has_the_unet_classes_and_patch(tmp_path):
    """--architecture segresnet: same classes, patch and preprocessing; a GroupNorm network of its own."""
    import torch

    from PTQLogic.models.torch_models import build_network
    from PTQLogic.core.spec import spec_from_dict

    stem, spec_dict = spec_for("segresnet")
    spec = spec_from_dict(spec_dict, base_dir=tmp_path)
    assert stem == "ct_segresnet" and spec.weights_path().name == "ct_segresnet.pt" and spec_for("unet") == ("ct_unet", SPEC)
    assert spec_dict["classes"] == SPEC["classes"] and spec_dict["preprocessing"] == SPEC["preprocessing"]
    network = build_network(spec).eval()
    assert any(isinstance(m, torch.nn.GroupNorm) for m in network.modules())
    with torch.no_grad():
        logits = network(torch.zeros(1, 1, *SPEC["patch_size"]))
    assert logits.shape == (1, len(SPEC["classes"]), *SPEC["patch_size"])


def test_missing_data_is_one_clear_error(tmp_path):
    from PTQLogic.core.errors import InputError

    with pytest.raises(InputError, match="example_ct_sm.nii.gz.*--data"):
        load_ct_pair(tmp_path)


@pytest.fixture(scope="module")
def ct_model(shared_data, tmp_path_factory):
    if not (ROOT / "PTQLogic" / "samples" / "data" / "ct_unet.pt").is_file():
        pytest.skip("ct_unet.pt not found: run python benchmarks/training/train_ct_model.py")
    from PTQLogic.io.volumes import write_labelmap
    from PTQLogic.pipeline import quantize_model

    folder = tmp_path_factory.mktemp("ct")
    _, labels = load_ct_pair(shared_data)
    reference = folder / "reference.nii.gz"
    write_labelmap(labels, reference)
    model = folder / "ct-int8"
    quantize_model(CT_SPEC, shared_data / "example_ct_sm.nii.gz", model, num_patches=4)
    return model, reference


def test_ct_model_int8_fidelity_per_runtime(ct_model, shared_data, tmp_path):
    from PTQLogic.app.benchmark import run_benchmark

    model, reference = ct_model
    summary = run_benchmark(model, shared_data / "example_ct_sm.nii.gz", tmp_path, runtimes=["onnxruntime", "openvino"],
                            precisions=["fp32", "int8"], reference=reference, repeats=2, warmup=1)
    rows = {(r["runtime"], r["precision"]): r for r in summary["rows"]}
    assert all(r["error"] is None for r in rows.values()), rows
    for runtime in ("onnxruntime", "openvino"):
        assert rows[runtime, "fp32"]["dice"] > 0.8, rows[runtime, "fp32"]
        assert rows[runtime, "int8"]["dice"] > rows[runtime, "fp32"]["dice"] - 0.03
        assert rows[runtime, "int8"]["agreement_dice"] > 0.93
    # the target: OpenVINO keeps the Q/DQ graph's meaning as well as ONNX Runtime does
    gap = abs(rows["openvino", "int8"]["agreement_dice"] - rows["onnxruntime", "int8"]["agreement_dice"])
    assert gap <= 0.01, gap
