"""TotalSegmentator-shaped nnU-Net v2 results folders and synthetic CTs, for ``whole_ct.py``.

Where the shapes come from (TotalSegmentator v2 read at wasserth/TotalSegmentator, ``python_api.py`` and
``nnunet.py``; nnU-Net v2.8 installed here):

* ``total``: five 3d_fullres models (tasks 291-295: organs, vertebrae, cardiac, muscles, ribs with 24, 26, 18,
  23 and 26 classes, together the 117 "total" labels in label order), trainer ``nnUNetTrainerNoMirroring``, fold 0,
  on images TotalSegmentator resamples to 1.5 mm; it calls ``nnUNetPredictor`` with mirroring off
  (``tta=False``) and ``tile_step_size=0.8`` (its CPU speed-up for the sub-3 mm "total" models).
* ``fast``: one 3d_fullres model (task 297, all 117 classes) at 3 mm, trainer
  ``nnUNetTrainer_4000epochs_NoMirroring``, step 0.5, mirroring off.
* Plans: written by nnunetv2's own ``ExperimentPlanner`` on a fingerprint of this CT resampled to the model's
  spacing (TotalSegmentator trains on data resampled to 1.5 / 3 mm). At 1.5 mm it plans what the published
  part checkpoints hold: PlainConvUNet, patch 128^3, 6 stages of 32-64-128-256-320-320 features, 2 convs per
  stage (third-party code loads the released weights strictly into that layout). At 3 mm it plans
  (128, 112, 112), 5 stages; the released ``--fast`` model's plans were not available to check.
* ``tiny`` (tests only, not TotalSegmentator's shape): the same plans with feature widths divided by 8.

Random weights (He init as nnU-Net, seeded, a little bias noise) time the networks; ``--weights DIR`` copies
trained checkpoints from a TotalSegmentator-style results folder (``DIR/Dataset291_*/*__3d_fullres/fold_0``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TOTAL_LABELS = ROOT.parent / "shared" / "data" / "totalsegmentator_total_labels.json"
PLANS = "nnUNetPlans"


@dataclass(frozen=True)
class Part:
    name: str
    task_id: int
    first_label: int  # global label value of its class 1
    classes: int  # foreground classes


@dataclass(frozen=True)
class ModelSet:
    name: str
    spacing: float  # mm, isotropic
    step_size: float  # TotalSegmentator's tile_step_size
    trainer: str
    parts: tuple[Part, ...]

    @property
    def folder_name(self) -> str:
        return f"{self.trainer}__{PLANS}__3d_fullres"


_TOTAL_PARTS = (("organs", 291, 24), ("vertebrae", 292, 26), ("cardiac", 293, 18), ("muscles", 294, 23),
                ("ribs", 295, 26))
MODEL_SETS = {
    "total": ModelSet("total", 1.5, 0.8, "nnUNetTrainerNoMirroring", tuple(
        Part(name, task, 1 + sum(c for _, _, c in _TOTAL_PARTS[:i]), classes)
        for i, (name, task, classes) in enumerate(_TOTAL_PARTS))),
    "fast": ModelSet("fast", 3.0, 0.5, "nnUNetTrainer_4000epochs_NoMirroring", (Part("total_3mm", 297, 1, 117),)),
}


def label_names(labels_file: Path | None) -> dict[int, str]:
    """The 117 "total" labels: TotalSegmentator's names where its labels file is at hand, else class_001..."""
    if labels_file is not None and Path(labels_file).is_file():
        names = {int(k): str(v) for k, v in json.loads(Path(labels_file).read_text()).items()}
        if sorted(names) == list(range(1, 118)):
            return names
    return {v: f"class_{v:03d}" for v in range(1, 118)}


def _own_tmp(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process writes (device_stint.sh draws the same CT in
    several processes at once; each then replaces ``path`` with identical content)."""
    return path.with_name(f"{path.name}.{os.getpid()}.part.nii.gz")


def write_ct(path: Path, seed: int, shape_kji: Sequence[int], spacing_ijk: Sequence[float]) -> Path:
    """A synthetic abdominal CT (int16 HU, LPS-like axes) as NIfTI; kept if it is already there."""
    import SimpleITK as sitk

    from PTQLogic.io.volumes import to_sitk_image
    from PTQLogic.samples.phantom import make_phantom

    if not path.is_file():
        image, _ = make_phantom(seed, shape_kji, spacing_ijk)
        tmp = _own_tmp(path)
        sitk.WriteImage(to_sitk_image(image.array, image.ijk_to_ras), str(tmp), True)
        tmp.replace(path)
    return path


# phantom class name -> TotalSegmentator "total" label value (totalsegmentator_total_labels.json); the spine
# column is called vertebrae_L2
PHANTOM_TO_TOTAL = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "vertebra": 30, "aorta": 52}


def phantom_lut() -> np.ndarray:
    """Phantom label value -> TotalSegmentator "total" label value."""
    from PTQLogic.samples.phantom import LABELS

    lut = np.zeros(max(LABELS.values()) + 1, np.uint8)
    for name, total in PHANTOM_TO_TOTAL.items():
        lut[LABELS[name]] = total
    return lut


def write_truth(path: Path, seed: int, cts: dict[str, Any]) -> Path:
    """The test CT's phantom labels as TotalSegmentator "total" values (:data:`PHANTOM_TO_TOTAL`); kept if there."""
    import SimpleITK as sitk

    from PTQLogic.io.volumes import to_sitk_image
    from PTQLogic.samples.phantom import make_phantom

    if not path.is_file():
        _, labels = make_phantom(seed, cts["shape_kji"], tuple(reversed(cts["spacing_kji"])))
        tmp = _own_tmp(path)
        sitk.WriteImage(to_sitk_image(phantom_lut()[labels.array], labels.ijk_to_ras), str(tmp), True)
        tmp.replace(path)
    return path


def write_cts(folder: Path, shape_xyz: Sequence[int], spacing_xyz: Sequence[float], test_seed: int,
              calibration_seeds: Sequence[int]) -> dict[str, Any]:
    """The test CT and the calibration CTs (other seeds), all of one shape and spacing."""
    from concurrent.futures import ProcessPoolExecutor

    shape_kji, spacing = tuple(reversed(shape_xyz)), tuple(spacing_xyz)
    seeds = [test_seed, *calibration_seeds]
    paths = [folder / "ct.nii.gz"] + [folder / f"calibration_{s}.nii.gz" for s in calibration_seeds]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    workers = min(len(missing), len(os.sched_getaffinity(0)) // 2)  # each CT draws in its own process (~3 GB)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write_ct, [paths[i] for i in missing], [seeds[i] for i in missing],
                          [shape_kji] * len(missing), [spacing] * len(missing)))
    test, *calibration = [write_ct(path, seed, shape_kji, spacing) for path, seed in zip(paths, seeds)]
    return {"test": test, "calibration": calibration, "shape_kji": shape_kji, "spacing_kji": spacing[::-1]}


def network_grid(cts: dict[str, Any], spacing: float) -> list[int]:
    """The CT's grid after nnU-Net's resampling to ``spacing`` mm (KJI)."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    return [int(v) for v in compute_new_shape(cts["shape_kji"], cts["spacing_kji"], [spacing] * 3)]


def count_windows(grid: Sequence[int], patch: Sequence[int], step: float) -> int:
    """Windows nnunetv2's sliding window places on ``grid`` (padded to the patch where smaller)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(g, p) for g, p in zip(grid, patch)]
    steps = compute_steps_for_sliding_window(padded, list(patch), step)
    return len(steps[0]) * len(steps[1]) * len(steps[2])


def intensity_properties(ct: Path) -> dict[str, float]:
    """nnU-Net's foreground intensity statistics, over the body (> -500 HU) of a calibration CT."""
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).astype(np.float32)
    body = hu[hu > -500][::7]
    return {"max": float(body.max()), "mean": float(body.mean()), "median": float(np.median(body)),
            "min": float(body.min()), "percentile_00_5": float(np.percentile(body, 0.5)),
            "percentile_99_5": float(np.percentile(body, 99.5)), "std": float(body.std())}


def _dataset_json(names: Sequence[str]) -> dict[str, Any]:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}},
            "numTraining": 1204, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO"}


@contextlib.contextmanager
def _nnunet_paths(root: Path):
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed")}
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def plan(spacing: float, shape_kji: Sequence[int], classes: int, properties: dict[str, float]) -> dict[str, Any]:
    """nnunetv2's ExperimentPlanner on the fingerprint of a CT of ``shape_kji`` voxels at ``spacing`` mm."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    name = "Dataset990_TotalSegShape"
    with tempfile.TemporaryDirectory(prefix="nnunet-plan-") as tmp, _nnunet_paths(Path(tmp)):
        raw, pre = Path(tmp) / "raw" / name, Path(tmp) / "pre" / name
        raw.mkdir(parents=True)
        pre.mkdir(parents=True)
        dataset = _dataset_json([f"c{i}" for i in range(1, classes + 1)])
        dataset["dataset"] = {"case0": {"images": ["imagesTr/case0_0000.nii.gz"], "label": "labelsTr/case0.nii.gz"}}
        (raw / "dataset.json").write_text(json.dumps(dataset))
        fingerprint = {"spacings": [[spacing] * 3] * 3, "shapes_after_crop": [list(shape_kji)] * 3,
                       "foreground_intensity_properties_per_channel": {"0": properties},
                       "median_relative_size_after_cropping": 1.0}
        (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
        with contextlib.redirect_stdout(io.StringIO()):
            ExperimentPlanner(name).plan_experiment()
        return json.loads((pre / f"{PLANS}.json").read_text())


def shrink(plans: dict[str, Any], divisor: int = 8) -> dict[str, Any]:
    """Tests only: the same plans with every stage's feature width divided by ``divisor`` (at least 4)."""
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(4, f // divisor) for f in kwargs["features_per_stage"]]
    return plans


def _random_weights(architecture: dict[str, Any], classes: int, seed: int) -> dict[str, Any]:
    import torch

    from PTQLogic.models.nnunet.network import build_network

    torch.manual_seed(seed)
    network = build_network(architecture, 1, classes + 1)
    network.apply(network.initialize)  # nnU-Net's He initialization
    with torch.no_grad():  # a little bias so classes are not all equally likely
        for p in network.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return network.state_dict()


def trained_checkpoint(weights_dir: Path, task_id: int) -> Path:
    found = sorted(Path(weights_dir).glob(f"Dataset{task_id}_*/*__3d_fullres/fold_0/checkpoint_final.pth"))
    if not found:
        raise SystemExit(f"--weights: no Dataset{task_id}_*/*__3d_fullres/fold_0/checkpoint_final.pth in {weights_dir}")
    return found[0]


def check_trained_plans(trained: Path, plans: dict[str, Any]) -> None:
    """Refuse trained weights whose plans differ from this run's in what decides the network's answer
    (architecture, patch, spacing, normalization, intensities): they were trained for another CT or shape."""
    if not trained.is_file():
        return  # a results folder without plans.json: the strict weight load still checks the architecture
    theirs = json.loads(trained.read_text())

    def key(p: dict[str, Any]) -> Any:
        c = p["configurations"]["3d_fullres"]
        return [c["architecture"], c["patch_size"], c["spacing"], c["normalization_schemes"],
                p["foreground_intensity_properties_per_channel"]]

    if json.dumps(key(theirs), sort_keys=True) != json.dumps(key(plans), sort_keys=True):
        raise SystemExit(f"--weights: {trained} was planned for another CT, shape or spacing than this run "
                         "(architecture, patch, spacing or intensities differ); train with the same --shape, "
                         "--spacing, --parts and --tiny-networks")


def write_part(root: Path, models: ModelSet, part: Part, plans: dict[str, Any], names: dict[int, str], seed: int,
               weights_dir: Path | None) -> Path:
    """One part as an nnU-Net v2 results folder (plans.json, dataset.json, fold_0/checkpoint_final.pth); kept
    where an earlier run wrote it."""
    import torch

    folder = part_folder(root, models, part)
    target = folder / "fold_0" / "checkpoint_final.pth"
    if target.is_file():  # written by an earlier run with the same settings (the caller's work folder)
        return folder
    target.parent.mkdir(parents=True, exist_ok=True)
    plans = dict(plans, dataset_name=folder.parent.name)
    dataset = part_dataset(part, names)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    if weights_dir is not None:
        source = trained_checkpoint(weights_dir, part.task_id)
        check_trained_plans(source.parent.parent / "plans.json", plans)
        shutil.copyfile(source, target)
        return folder
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    weights = _random_weights(architecture, part.classes, seed + part.task_id)
    torch.save(checkpoint_record(models, plans, dataset, weights), target)
    return folder


def part_folder(root: Path, models: ModelSet, part: Part) -> Path:
    """Where a part's results folder lies under ``root`` (TotalSegmentator's layout)."""
    return root / f"Dataset{part.task_id}_TotalSegShape_{part.name}" / models.folder_name


def part_dataset(part: Part, names: dict[int, str]) -> dict[str, Any]:
    """The part's dataset.json: its classes' global names in label order."""
    return _dataset_json([names[part.first_label + i] for i in range(part.classes)])


def checkpoint_record(models: ModelSet, plans: dict[str, Any], dataset: dict[str, Any], weights: dict[str, Any],
                      epoch: int = 0) -> dict[str, Any]:
    """An nnU-Net v2 ``checkpoint_final.pth`` as its trainer saves one (loadable with ``weights_only=True``)."""
    import torch

    return {"network_weights": weights, "trainer_name": models.trainer, "current_epoch": epoch,
            "inference_allowed_mirroring_axes": None,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                          "device": torch.device("cpu")}}


def write_parts_file(path: Path, folders: Sequence[Path], names: dict[int, str]) -> Path:
    """The project's parts file: the part folders in TotalSegmentator's order and the global labels."""
    (path.parent / "labels.json").write_text(json.dumps({str(k): v for k, v in names.items()}, indent=1))
    parts = [os.path.relpath(f, path.parent) for f in folders]
    path.write_text(json.dumps({"parts": parts, "labels": "labels.json"}, indent=2))
    return path
