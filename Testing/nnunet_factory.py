"""Write small trained-model folders in exactly nnU-Net v2's on-disk format (for the nnU-Net tests).

``plans.json`` has the keys nnU-Net's ExperimentPlanner writes (v2.5+ layout, ``architecture`` section);
checkpoints are nnU-Net's dict (network_weights, optimizer_state, grad_scaler_state, logging, _best_ema,
current_epoch, init_args, trainer_name, inference_allowed_mirroring_axes) saved with ``torch.save``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

FOLDER_NAME = "nnUNetTrainer__nnUNetPlans__3d_fullres"
CT_PROPERTIES = {"max": 3071.0, "mean": 60.0, "median": 55.0, "min": -1024.0,
                 "percentile_00_5": -150.0, "percentile_99_5": 400.0, "std": 90.0}


def architecture(features: Sequence[int] = (4, 8, 16), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                 kernels=((3, 3, 3),) * 3, residual: bool = False) -> dict:
    n = len(features)
    kwargs = {
        "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in kernels], "strides": [list(s) for s in strides],
        ("n_blocks_per_stage" if residual else "n_conv_per_stage"): [1] * n,
        "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    name = "ResidualEncoderUNet" if residual else "PlainConvUNet"
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
            "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def plans(spacing: Sequence[float], patch: Sequence[int], transpose_forward=(0, 1, 2), norm: str = "CTNormalization",
          use_mask_for_norm: bool = False, arch: dict | None = None) -> dict:
    """``spacing``/``patch`` are in the transposed (network) axis order, as nnU-Net stores them."""
    backward = [int(i) for i in np.argsort(transpose_forward)]
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [40, 40, 40], "spacing": list(spacing),
        "normalization_schemes": [norm], "use_mask_for_norm": [use_mask_for_norm],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": arch or architecture(), "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [40, 40, 40],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose_forward),
        "transpose_backward": backward, "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_PROPERTIES)},
    }


def dataset(labels: Sequence[str], channel: str = "CT") -> dict:
    return {"channel_names": {"0": channel}, "labels": {name: i for i, name in enumerate(labels)},
            "numTraining": 4, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO"}


def checkpoint(network: torch.nn.Module, plans_dict: dict, dataset_dict: dict, fold: int) -> dict:
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    return {
        "network_weights": network.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.1), np.float64(0.2)], "ema_fg_dice": [np.float64(0.1)],
                    "train_losses": [np.float32(0.9)], "epoch_start_timestamps": [1.7e9]},
        "_best_ema": np.float64(0.2),
        "current_epoch": 2,
        "init_args": {"plans": plans_dict, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset_dict,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def write_folder(root: Path, plans_dict: dict, dataset_dict: dict, folds: Sequence[int] = (0,), seed: int = 0,
                 name: str = FOLDER_NAME) -> Path:
    """A trained-model folder with random (He-initialized, as nnU-Net does) weights per fold."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    import torch.nn as nn

    folder = Path(root) / name
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans_dict, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset_dict, indent=4))
    arch = plans_dict["configurations"]["3d_fullres"]["architecture"]
    cls = ResidualEncoderUNet if arch["network_class_name"].endswith("ResidualEncoderUNet") else PlainConvUNet
    kwargs = dict(arch["arch_kwargs"], conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, dropout_op=None,
                  nonlin=nn.LeakyReLU)
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = cls(input_channels=len(dataset_dict["channel_names"]), num_classes=len(dataset_dict["labels"]),
                      deep_supervision=True, **kwargs)
        network.apply(network.initialize)
        with torch.no_grad():  # a little bias so classes are not all equally likely
            for p in network.parameters():
                if p.ndim == 1:
                    p.add_(0.05 * torch.randn_like(p))
        (folder / f"fold_{fold}").mkdir()
        torch.save(checkpoint(network, plans_dict, dataset_dict, fold), folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def write_image(volume, path: Path) -> Path:
    import SimpleITK as sitk

    from PTQLogic.io.volumes import to_sitk_image

    sitk.WriteImage(to_sitk_image(volume.array, volume.ijk_to_ras), str(path), True)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 3D convolutions run fastest on one thread (and do not fight other jobs on a 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
