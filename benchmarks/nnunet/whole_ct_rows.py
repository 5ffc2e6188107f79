"""One row of ``whole_ct.py`` in a process of its own (its peak RSS is the row's), or the per-window probe.

    python benchmarks/nnunet/whole_ct_rows.py row SPEC.json RESULT.json
    python benchmarks/nnunet/whole_ct_rows.py windows SPEC.json RESULT.json

SPEC (written by ``whole_ct.py``): ``row`` (nnunetv2, totalseg, fp32, int8, int8-bf16, int8-fp32w, int8-bf16-fp32w,
fp32-torch; on a GPU nnunetv2-cuda, totalseg-cuda, fp16-torch-cuda, fp16-tensorrt, int8-tensorrt), ``ct``, ``output``,
``folders`` (the nnU-Net results folders, nnunetv2's row), ``parts_file`` (the quantized parts, this project's
OpenVINO rows), ``torch_parts_file`` (the original folders, the project's pipeline on PyTorch),
``labels`` (global value -> name), ``step_size``, ``threads``, ``cpus``, ``fp32_windows`` (the share
of ``segment --fp32-windows`` for the rows ending in -fp32w). The caller sets the environment
(``nnUNet_def_n_proc``, ``PTQSEG_CACHE_DIR``, ``PTQSEG_CPU_FLOAT``) before this process starts.

Stages, in seconds: ``build`` (load checkpoints / compile engines), ``preprocess`` (nnU-Net's crop, normalize,
resample to the network grid), ``network`` (the sliding window, blending included), ``export`` (logits back to
the input grid, argmax), ``other`` (read the NIfTI, merge the parts, write the label map).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import PTQLogic  # noqa: E402,F401 - first: no library telemetry, no caches in ~ (PTQLogic/core/offline.py)
from whole_ct_totalseg import TOTALSEG_ROWS, run_totalseg  # noqa: E402

PRECISION = {"fp32": "fp32", "int8": "int8", "int8-bf16": "int8", "int8-fp32w": "int8", "int8-bf16-fp32w": "int8",
             "fp32-torch": "fp32", "fp32-torch-cuda": "fp32",
             "fp16-torch-cuda": "fp16", "fp16-tensorrt": "fp16", "int8-tensorrt": "int8"}
RUNTIME = {"fp32": "openvino", "int8": "openvino", "int8-bf16": "openvino", "int8-fp32w": "openvino",
           "int8-bf16-fp32w": "openvino",
           "fp32-torch": "torch", "fp32-torch-cuda": "torch",
           "fp16-torch-cuda": "torch", "fp16-tensorrt": "tensorrt", "int8-tensorrt": "tensorrt"}
# the rest: the CPU, or TensorRT's own GPU
DEVICE = {"nnunetv2-cuda": "cuda", "fp32-torch-cuda": "cuda", "fp16-torch-cuda": "cuda", "totalseg-cuda": "cuda"}
NNUNET_ROWS = ("nnunetv2", "nnunetv2-cuda")
BASELINE_ROWS = NNUNET_ROWS + TOTALSEG_ROWS  # nnunetv2's predictor, on the CT's grid or TotalSegmentator's way
# the project's pipeline on the original folders, no ONNX needed
TORCH_ROWS = ("fp32-torch", "fp32-torch-cuda", "fp16-torch-cuda")
BF16_ROWS = ("int8-bf16", "int8-bf16-fp32w")  # OpenVINO's float layers in bf16 (PTQSEG_CPU_FLOAT=bf16)


class StageClock:
    """Seconds per named stage, summed over the parts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started


class ProgressClock:
    """Preprocessing and export seconds of the project's run, from the progress events of its nnU-Net path
    (``... preprocessing`` and ``... export`` stages report 0 at their start and done == total at their end)."""

    KINDS = (("preprocessing", "preprocess"), ("export", "export"))

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.started: dict[str, float] = {}

    def record(self, stage: str, done: int, total: int) -> None:
        kind = next((name for suffix, name in self.KINDS if stage.endswith(suffix)), None)
        if kind is None:
            return
        if done == 0:
            self.started[stage] = time.perf_counter()
        elif done >= total and stage in self.started:
            self.seconds[kind] += time.perf_counter() - self.started.pop(stage)


def _name_trainers() -> None:
    """nnunetv2 finds a checkpoint's trainer class by importing every trainer module; one imports timm, whose
    torchvision fails to load beside torch 2.13 on the development machine. TotalSegmentator's two trainers are
    therefore named directly (any other name still goes through nnunetv2's search)."""
    import nnunetv2.inference.predict_from_raw_data as predict
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
        nnUNetTrainerNoMirroring)
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring import (
        nnUNetTrainer_4000epochs_NoMirroring)

    table = {c.__name__: c for c in (nnUNetTrainerNoMirroring, nnUNetTrainer_4000epochs_NoMirroring)}
    search = predict.recursive_find_trainer_class_by_name
    if not getattr(search, "named_directly", False):
        def find(name: str):
            return table.get(name) or search(name)

        find.named_directly = True
        predict.recursive_find_trainer_class_by_name = find


def _predictor(folder: str, step_size: float, device: str = "cpu"):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _name_trainers()
    # TotalSegmentator's call (nnunet.py, nnUNetv2_predict): gaussian, no mirroring, everything on the device
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=True, device=torch.device(device), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    return predictor


def _lookup(dataset: dict[str, Any], labels: dict[str, str]):
    """Part label -> global label, by class name (the project's merge rule, ``segment.merged_classes``)."""
    import numpy as np

    value_of = {name: int(value) for value, name in labels.items()}
    by_value = sorted((v, n) for n, v in dataset["labels"].items())
    return np.array([0] + [value_of[n] for v, n in by_value if v > 0], dtype=np.uint8)


def run_nnunetv2(spec: dict[str, Any]) -> dict[str, Any]:
    """nnunetv2's predictor (CPU, or CUDA for ``nnunetv2-cuda``), stage by stage through its own API, the parts
    merged as the project merges them."""
    import numpy as np
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    clock, windows, started = StageClock(), 0, time.perf_counter()
    with clock("other"):
        image, properties = SimpleITKIO().read_images([spec["ct"]])
    merged = np.zeros(image.shape[1:], dtype=np.uint8)
    for folder in spec["folders"]:
        with clock("build"):
            predictor = _predictor(folder, spec["step_size"], DEVICE.get(spec["row"], "cpu"))
        counter = _WindowCounter(predictor.network)
        with clock("preprocess"):
            preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
            data, _, props = preprocessor.run_case_npy(image, None, copy.deepcopy(properties), predictor.plans_manager,
                                                       predictor.configuration_manager, predictor.dataset_json)
        with clock("network"):
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        with clock("export"):
            labels = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, props)
        del logits, data
        with clock("other"):
            mapped = _lookup(predictor.dataset_json, spec["labels"])[labels]
            merged[labels > 0] = mapped[labels > 0]
        windows += counter.calls
    with clock("other"):
        SimpleITKIO().write_seg(merged, spec["output"], properties)
    return {"seconds": time.perf_counter() - started, "stages": dict(clock.seconds), "windows": windows}


def run_totalsegmentator(spec: dict[str, Any]) -> dict[str, Any]:
    """The CT as TotalSegmentator segments it (``whole_ct_totalseg.py``), nnunetv2's predictor on the CPU or CUDA."""
    clock = StageClock()
    device = DEVICE.get(spec["row"], "cpu")
    result = run_totalseg(spec, lambda folder: _predictor(folder, spec["step_size"], device), _lookup, clock,
                          _WindowCounter)
    return dict(result, stages=dict(clock.seconds))


class _WindowCounter:
    def __init__(self, network) -> None:
        self.calls = 0
        network.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


def run_project(spec: dict[str, Any]) -> dict[str, Any]:
    """``PTQLogic.pipeline.segment`` on the parts file, as ``ptqseg segment`` runs it: OpenVINO (or, on a GPU,
    TensorRT) on the quantized parts, or (``fp32-torch``, ``fp32-torch-cuda``, ``fp16-torch-cuda``) PyTorch on the
    original folders, nnunetv2's arithmetic in the project's pipeline."""
    from PTQLogic.core.progress import Monitor
    from PTQLogic.pipeline import segment

    row = spec["row"]
    strict_fp32(row)
    # the PyTorch rows run the original nnU-Net folders (as a user's FP32 / FP16 baseline before quantizing);
    # every other row the quantized parts
    parts_file = spec["torch_parts_file"] if row in TORCH_ROWS else spec["parts_file"]
    clock, started = ProgressClock(), time.perf_counter()
    outcome = segment(parts_file, spec["ct"], spec["output"], runtime=RUNTIME[row], precision=PRECISION[row],
                      device=DEVICE.get(row), step_size=spec["step_size"], mirroring=False,
                      monitor=Monitor(on_progress=clock.record),
                      fp32_windows=spec.get("fp32_windows") if row.endswith("-fp32w") else None)
    seconds = time.perf_counter() - started
    stages = {"build": outcome.build_seconds, **clock.seconds}
    # outcome.seconds: every part's preprocessing, sliding window and export (engine builds left out), where an
    # export that ran beside the next part's sliding window counts only for the time the run waited for it
    stages["export"] = max(stages.get("export", 0.0) - outcome.overlapped_seconds, 0.0)
    stages["network"] = outcome.seconds - stages.get("preprocess", 0.0) - stages["export"]
    stages["other"] = seconds - sum(stages.values())  # read, memory check, speed probe, merge, write
    return {"seconds": seconds, "stages": stages, "export_beside_network": outcome.overlapped_seconds,
            "windows": outcome.patches,
            "engine_seconds": outcome.network_seconds, "engine": outcome.runtime_reason or outcome.runtime,
            "warnings": outcome.warnings, "fp32_windows": outcome.fp32_windows}


def strict_fp32(row: str) -> None:
    """``fp32-torch-cuda`` is the FP32 reference on a GPU: CUDA's convolutions and matmuls without TF32 (torch's
    default lets cuDNN use it), so its labels are FP32's, as on the CPU, up to the order of summation."""
    if row == "fp32-torch-cuda":
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def _time_window(call, patch, device: str = "cpu") -> float:
    """Seconds of one window (batch 1), the second of two calls (the first allocates)."""
    import torch

    x = torch.randn(1, 1, *patch, device=device)
    with torch.inference_mode():
        call(x)
        _synchronize(device)
        started = time.perf_counter()
        call(x)
        _synchronize(device)
    return time.perf_counter() - started


def _synchronize(device: str) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_windows(spec: dict[str, Any]) -> dict[str, float]:
    """Per-window network seconds of every row on the first part (the run's estimate is built from them)."""
    from PTQLogic.inference.nnunet.engines import open_engines
    from PTQLogic.models.nnunet.model_dir import open_nnunet_model

    seconds = {}
    for row in spec["rows"]:
        device = DEVICE.get(row, "cpu")
        if row in BASELINE_ROWS or row == "fp32-torch":
            predictor = _predictor(spec["folders"][0], spec["step_size"], device)
            patch = predictor.configuration_manager.patch_size
            seconds[row] = _time_window(predictor.network, patch, device)
            continue
        os.environ["PTQSEG_CPU_FLOAT"] = "bf16" if row in BF16_ROWS else "f32"
        strict_fp32(row)
        model = open_nnunet_model(spec["folders"][0] if row in TORCH_ROWS else spec["quantized"][0])
        engines, _ = open_engines(model, RUNTIME[row], PRECISION[row], device=DEVICE.get(row))
        seconds[row] = _time_window(engines[0], model.spec.patch_size, "cpu" if RUNTIME[row] == "openvino" else "cuda")
    return seconds


NNUNET_MODULES = ("SimpleITK", "nnunetv2.inference.export_prediction", "nnunetv2.inference.predict_from_raw_data",
                  "nnunetv2.imageio.simpleitk_reader_writer")
TOTALSEG_MODULES = ("nibabel", "totalsegmentator.resampling")
PROJECT_MODULES = ("SimpleITK", "openvino", "nnunetv2.inference.export_prediction",
                   "nnunetv2.inference.predict_from_raw_data", "PTQLogic.engines.openvino_engine",
                   "PTQLogic.inference.nnunet.engines", "PTQLogic.inference.nnunet.predict",
                   "PTQLogic.inference.nnunet.segment", "PTQLogic.io.volumes", "PTQLogic.pipeline")


def _import_modules(row: str) -> None:
    """Every heavy module the row will use, imported before its clock starts (import time is no stage)."""
    import importlib

    names = PROJECT_MODULES if row not in BASELINE_ROWS else NNUNET_MODULES
    if row in TOTALSEG_ROWS:
        names += TOTALSEG_MODULES
    for name in names:
        importlib.import_module(name)
    if row in BASELINE_ROWS:
        _name_trainers()


def _pin(spec: dict[str, Any]) -> None:
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cpus"])
    import torch

    torch.set_num_threads(int(spec["threads"]))


def peak_rss_bytes() -> int:
    """This process's own peak resident memory: VmHWM, which starts afresh at exec. (ru_maxrss would not: Linux
    carries the parent's peak at fork into it, and the parent holds GBs after quantizing.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # not Linux: the best there is


def started_mark(result_path: str | Path) -> Path:
    """The file a row touches when its clock starts (after its imports)."""
    return Path(f"{result_path}.started")


def main(argv: list[str]) -> int:
    mode, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    _pin(spec)
    if mode == "windows":
        result: dict[str, Any] = {"window_seconds": measure_windows(spec)}
    else:
        _import_modules(spec["row"])
        started_mark(result_path).touch()  # the row's clock starts now: a parent that stops it reads this time
        result = (run_nnunetv2 if spec["row"] in NNUNET_ROWS else
                  run_totalsegmentator if spec["row"] in TOTALSEG_ROWS else run_project)(spec)
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(result_path).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
