"""nnU-Net v2 trained-model folders (``Trainer__Plans__configuration``; TotalSegmentator's task folders too).

Reads dataset.json and plans.json as data (allow-listed, :mod:`PTQLogic.models.nnunet.folder`), each
``fold_k/checkpoint_final.pth`` with ``torch.load(weights_only=True)`` and a small numpy allow-list,
and builds the dynamic_network_architectures network named in the plans. Inference must then go through
:mod:`PTQLogic.inference.nnunet.predict` (nnU-Net's own preprocessing and sliding window), not the spec's MONAI path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...core.errors import ModelError
from ...core.spec import DEFAULT_COLORS, ClassInfo, ModelSpec, Preprocessing
from .base import LoadedModel



def spec_for(folder) -> ModelSpec:
    """A ModelSpec describing the nnU-Net model (classes, patch, channels) for export and the UI."""
    names = folder.class_names
    classes = tuple(ClassInfo(name, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, name in enumerate(names))
    in_channels = len(folder.dataset.get("channel_names", folder.dataset.get("modality", {})))
    return ModelSpec(
        name=f"{folder.plans.get('dataset_name', folder.root.name)}-{folder.configuration}",
        architecture=f"nnunet:{folder.network_class}",
        classes=classes,
        patch_size=tuple(folder.patch_size),
        in_channels=in_channels,
        preprocessing=Preprocessing(orientation=None, spacing=None, intensity="none"),
        overlap=0.5,
        blend_mode="gaussian",
        base_dir=str(folder.root),
    )


class NnUNetSource:
    kind = "nnunet"

    def can_open(self, path: Path) -> bool:
        from ..nnunet.folder import MODEL_DIR_MARKER, is_nnunet_folder

        path = Path(path)
        return is_nnunet_folder(path) and not (path / MODEL_DIR_MARKER).is_file() and any(path.glob("fold_*"))

    def describe(self, path: Path) -> str:
        from ..nnunet.folder import open_nnunet_folder

        return open_nnunet_folder(path).describe()

    def load(self, path: Path, **options: Any) -> LoadedModel:
        """Options: ``folds`` (list of fold names, default all present), ``checkpoint`` (checkpoint_final.pth)."""
        from ..nnunet.checkpoint import load_checkpoint
        from ..nnunet.folder import open_nnunet_folder
        from ..nnunet.network import build_network, load_weights

        folder = open_nnunet_folder(path, options.get("folds"), options.get("checkpoint", "checkpoint_final.pth"))
        spec = spec_for(folder)
        networks, mirror_axes, trainer = [], None, folder.trainer_name
        for index, fold in enumerate(folder.folds):
            where = folder.checkpoint_path(fold)
            checkpoint = load_checkpoint(where)
            configuration = (checkpoint.get("init_args") or {}).get("configuration", folder.configuration)
            if configuration != folder.configuration:
                raise ModelError(f"'{where}' was trained for configuration {configuration!r}, but the folder is "
                                 f"{folder.configuration!r}; keep each configuration in its own folder.")
            if index == 0:
                axes = checkpoint.get("inference_allowed_mirroring_axes")
                mirror_axes = None if axes is None else [int(a) for a in axes]
                trainer = str(checkpoint.get("trainer_name", trainer))
            network = build_network(folder.config["architecture"], spec.in_channels, spec.num_classes)
            load_weights(network, checkpoint["network_weights"], str(where))
            networks.append(network.eval())
        details = {"configuration": folder.configuration, "folds": list(folder.folds), "trainer": trainer,
                   "checkpoint": folder.checkpoint_name, "mirror_axes": mirror_axes,
                   "network_class": folder.network_class, "dataset": folder.dataset, "plans": folder.plans}
        return LoadedModel(spec=spec, networks=networks, source=self.kind, description=folder.describe(),
                           details=details)
