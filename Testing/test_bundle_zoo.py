"""Bundles in the MONAI model-zoo layout, written by the tests, and MONAI's own run of them.

The configs follow models/{spleen_ct_segmentation, swin_unetr_btcv_segmentation,
wholeBody_ct_segmentation}/configs/inference.json of Project-MONAI/model-zoo (``$`` imports, device and
datalist expressions included), at reduced width and patch size, with random weights.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

_HEAD = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
}
_TAIL = {
    "network": "$@network_def.to(@device)",
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 4},
    "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                  "val_handlers": "@handlers", "amp": True},
    "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                         "load_dict": {"model": "@network"}},
    "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
    "run": ["$@evaluator.run()"],
}


def _ct_preprocessing(pixdim, a_min, a_max, reader=None):
    load = {"_target_": "LoadImaged", "keys": "image", **({"reader": reader} if reader else {})}
    return {"_target_": "Compose", "transforms": [
        load,
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": a_min, "a_max": a_max, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]}


def _post(softmax_first=True, nearest=False):
    invert = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
              "nearest_interp": nearest, "to_tensor": True}
    argmax = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    middle = [invert, argmax] if softmax_first else [argmax, invert]
    return {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True}, *middle,
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": ".nii.gz",
         "output_dtype": "$numpy.float32", "output_postfix": "trans", "separate_folder": True},
    ]}


def spleen_config(roi=32):
    return {**_HEAD,
            "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                            "channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2], "num_res_units": 2,
                            "norm": "batch"},
            "preprocessing": _ct_preprocessing([1.5, 1.5, 2.0], -57, 164),
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [roi] * 3, "sw_batch_size": 4, "overlap": 0.5},
            "postprocessing": _post(), **_TAIL}


def btcv_config(roi=32):
    return {**_HEAD,
            "network_def": {"_target_": "SwinUNETR", "spatial_dims": 3, "img_size": roi, "in_channels": 1,
                            "out_channels": 14, "feature_size": 12, "use_checkpoint": False},
            "preprocessing": _ct_preprocessing([1.5, 1.5, 2.0], -175, 250, reader="ITKReader"),
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [roi] * 3, "sw_batch_size": 4, "overlap": 0.5},
            "postprocessing": _post(), **_TAIL}


def wholebody_config(roi=32):
    return {"displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
            **_HEAD, "image_key": "image",
            "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
            "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
            "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 105,
                            "init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
                            "dropout_prob": 0.2},
            "preprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureTyped", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
                {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
                {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0}]},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [roi] * 3,
                        "sw_batch_size": "@displayable_configs#sw_batch_size",
                        "overlap": "@displayable_configs#sw_overlap", "padding_mode": "replicate", "mode": "gaussian",
                        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"},
            "postprocessing": _post(softmax_first=False, nearest=True), **_TAIL}


def _metadata(name, names):
    return {"version": "0.5.9", "name": name, "task": "segmentation",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                     "channel_def": {"0": "image"}}},
                "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(names),
                                     "channel_def": {str(i): n for i, n in enumerate(names)}}}}}


BTCV_NAMES = ["background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
              "aorta", "IVC", "portal and splenic veins", "pancreas", "right adrenal gland", "left adrenal gland"]
BUNDLES = {
    "spleen_ct_segmentation": (spleen_config, "Spleen CT segmentation", ["background", "spleen"]),
    "swin_unetr_btcv_segmentation": (btcv_config, "Swin UNETR BTCV segmentation", BTCV_NAMES),
    "wholeBody_ct_segmentation": (wholebody_config, "Whole body CT segmentation",
                                  ["background"] + [f"structure_{i}" for i in range(1, 105)]),
}
PIXDIM = {"spleen_ct_segmentation": (1.5, 1.5, 2.0), "swin_unetr_btcv_segmentation": (1.5, 1.5, 2.0),
          "wholeBody_ct_segmentation": (1.5, 1.5, 1.5)}


def build_network(config: dict) -> torch.nn.Module:
    """The config's network, built by MONAI's ConfigParser (trusted: the test wrote it)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(_for_monai(config))
    return parser.get_parsed_content("network_def")


def _for_monai(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    # MONAI >= 1.5 removed SwinUNETR's img_size (the model-zoo config predates it); it never affected weights.
    if config["network_def"]["_target_"] == "SwinUNETR":
        config["network_def"].pop("img_size", None)
    load = config["preprocessing"]["transforms"][0]
    if load.get("reader") == "ITKReader" and importlib.util.find_spec("itk") is None:
        load.pop("reader")  # without the itk package MONAI reads the NIfTI with nibabel: same array and affine
    return config


def write_bundle(folder: Path, which: str, roi: int = 32, seed: int = 0, torchscript: bool = False,
                 yaml_config: bool = False, config: dict | None = None) -> Path:
    make_config, name, names = BUNDLES[which]
    config = config or make_config(roi)
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    if yaml_config:
        import yaml

        (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    else:
        (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    (folder / "configs" / "metadata.json").write_text(json.dumps(_metadata(name, names), indent=4))
    torch.manual_seed(seed)
    network = build_network(config).eval()
    if torchscript:
        torch.jit.script(network).save(str(folder / "models" / "model.ts"))
    else:
        torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def monai_bundle_labels(bundle: Path, image: Path) -> np.ndarray:
    """MONAI's own run of the bundle's (trusted) config: preprocessing, inferer, postprocessing; KJI labels."""
    from monai.bundle import ConfigParser

    config = json.loads((bundle / "configs" / "inference.json").read_text())
    # SaveImaged only writes the result to disk (and logs to a stream pytest has closed): left out here.
    post = config["postprocessing"]["transforms"]
    config["postprocessing"]["transforms"] = [t for t in post if t["_target_"] != "SaveImaged"]
    parser = ConfigParser(_for_monai(config))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(image)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    data = parser.get_parsed_content("postprocessing")(data)
    labels_ijk = np.asarray(data["pred"])[0]
    return np.transpose(labels_ijk, (2, 1, 0)).astype(np.int64)


@pytest.mark.parametrize("which", sorted(BUNDLES))
def test_written_bundles_are_real_monai_bundles(which, tmp_path):
    """MONAI's own ConfigParser reads what the tests write (so the parity tests compare with real bundles)."""
    bundle = write_bundle(tmp_path / which, which)
    assert isinstance(build_network(json.loads((bundle / "configs" / "inference.json").read_text())), torch.nn.Module)
