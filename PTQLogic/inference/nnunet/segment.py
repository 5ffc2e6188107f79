"""Segment with one or several nnU-Net models and merge the parts into one named label map.

Several models are TotalSegmentator's multi-part tasks ("total" = five part folders, each with its
own labels): each part runs on the whole image and its labels are written into one map, later parts
overwriting earlier ones where they find foreground (TotalSegmentator's own merge rule). Global label
values follow a labels file (``{"1": "spleen", ...}``, e.g. TotalSegmentator's class map) when one is
given, else the parts' classes in order. A *parts file* is a JSON ``{"parts": [folders...],
"labels": {...} or "labels.json"}`` (paths relative to the file).
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...core.errors import InputError
from ...core.progress import Monitor
from ...core.spec import DEFAULT_COLORS, ClassInfo
from ...core.volume import Volume
from ...models.nnunet.folder import is_nnunet_folder
from ...models.nnunet.model_dir import NnUNetModel, is_nnunet_model_dir, open_nnunet_model
from ..interface import ModelArg, SegmentOptions
from ..results import SegmentOutcome
from .engines import fallback_note, open_engines
from .fp32_windows import Fp32WindowPolicy, Fp32Windows, summary


def is_parts_file(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "parts" in data


def is_nnunet_target(models: str | Path | Sequence[str | Path]) -> bool:
    """True when ``segment`` should take the nnU-Net path (any nnU-Net folder, several models, a parts file)."""
    items = [models] if isinstance(models, (str, Path)) else list(models)
    return any(is_nnunet_model_dir(m) or is_nnunet_folder(m) or is_parts_file(m) for m in items)


def read_parts_file(path: str | Path) -> tuple[list[Path], dict[int, str] | None]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"Parts file '{path}' is not readable JSON: {exc}") from None
    parts = data.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise InputError(f"Parts file '{path}': 'parts' must be a non-empty list of model folders.")
    labels = data.get("labels")
    if isinstance(labels, str):  # a JSON file {"1": "spleen", ...} next to the parts file
        where = path.parent / labels
        try:
            labels = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"Labels file '{where}' (from parts file '{path}') is not readable JSON: {exc}") from None
    return [(path.parent / p) for p in parts], (None if labels is None else parse_label_map(labels, str(path)))


def parse_label_map(labels: Any, where: str) -> dict[int, str]:
    if not isinstance(labels, dict):
        raise InputError(f"{where}: 'labels' must map label values to class names.")
    try:
        result = {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise InputError(f"{where}: label values must be integers, got {list(labels)[:3]}.") from None
    if any(v <= 0 or v > 65535 for v in result) or len(set(result.values())) != len(result):
        raise InputError(f"{where}: label values must be 1..65535 and class names unique.")
    return result


def expand_models(models: str | Path | Sequence[str | Path]) -> tuple[list[Path], dict[int, str] | None]:
    items = [models] if isinstance(models, (str, Path)) else list(models)
    paths: list[Path] = []
    labels = None
    for item in items:
        if is_parts_file(item):
            more, labels_here = read_parts_file(item)
            paths += more
            labels = labels_here or labels
        else:
            paths.append(Path(item))
    for path in paths:
        if not (is_nnunet_model_dir(path) or is_nnunet_folder(path)):
            raise InputError(f"'{path}' is not an nnU-Net model folder (quantized, or dataset.json + plans.json + "
                             "fold_*); several --model values must all be nnU-Net parts.")
    return paths, labels


def merged_classes(models: Sequence[NnUNetModel], labels: dict[int, str] | None) -> tuple[list[ClassInfo], list[np.ndarray]]:
    """Classes of the merged map (position == value) and, per model, a lookup part label -> merged label."""
    if labels is None:
        names: list[str] = ["background"]
        for model in models:
            names += [n for n in model.spec.class_names[1:] if n not in names]
        value_of = {name: i for i, name in enumerate(names)}
    else:
        value_of = {name: value for value, name in labels.items()}
        names = ["background"] + [f"unused_{v}" for v in range(1, max(labels) + 1)]
        for value, name in labels.items():
            names[value] = name
    lookups = []
    for model in models:
        missing = [n for n in model.spec.class_names[1:] if n not in value_of]
        if missing:
            raise InputError(f"Classes {missing[:5]} of '{model.root}' are not in the labels map; add them or leave "
                             "the labels map out.")
        lookups.append(np.array([0] + [value_of[n] for n in model.spec.class_names[1:]], dtype=np.int64))
    own = {c.name: c.color for m in models for c in m.spec.classes}
    classes = [ClassInfo(n, own.get(n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])) for i, n in enumerate(names)]
    return classes, lookups


@dataclass
class _Run:
    """Every part run once with one runtime and precision; ``seconds`` leaves the engine builds out."""

    parts: list[np.ndarray] = field(default_factory=list)  # each part's labels
    info: Any = None  # the engines' EngineInfo
    reason: str = ""
    engine_bytes: int = 0
    seconds: float = 0.0
    network_seconds: float = 0.0
    patches: int = 0
    build_seconds: float = 0.0
    beside_seconds: float = 0.0  # export work that ran beside the next part's sliding window (not in ``seconds``)
    fallbacks: list[str] = field(default_factory=list)  # notes on parts run in FP32 for INT8 (engines.fallback_note)
    fp32_windows: list[Fp32Windows] = field(default_factory=list)  # --fp32-windows: per part, what ran in FP32


class _SharedPreprocessing:
    """The volume preprocessed once per distinct preprocessing (``preprocess_key``) for all parts; each array is
    dropped once no later part needs it."""

    def __init__(self, runners: Sequence, volume: Volume, monitor: Monitor):
        self.remaining = Counter(r.preprocess_key() for r in runners)
        self.arrays: dict[str, Any] = {}
        self.volume, self.monitor = volume, monitor
        self.seconds = 0.0

    def get(self, runner, stage: str):
        key = runner.preprocess_key()
        found = self.arrays.get(key)
        if found is None:
            started = time.perf_counter()
            self.monitor.update(stage, 0, 1)
            found = runner.preprocess(self.volume)
            self.monitor.update(stage, 1, 1)
            self.seconds += time.perf_counter() - started
        self.remaining[key] -= 1
        if self.remaining[key] > 0:
            self.arrays[key] = found
        else:
            self.arrays.pop(key, None)
        return found


def _part_label(models: Sequence[NnUNetModel], index: int) -> str | None:
    """``part 2/5 (vertebrae)`` in progress stage names; None for a single model (stages stay "nnU-Net ...")."""
    from .estimate import part_name

    return None if len(models) == 1 else f"part {index + 1}/{len(models)} ({part_name(models[index])})"


def _show_estimate(estimate, index: int, engine, runner, monitor: Monitor) -> None:
    """Once part ``index``'s engines are open: time one window where its speed is still unknown, and report the
    estimate if it was not reported yet or has just been completed."""
    from .estimate import set_timed_speed, time_one_window

    if estimate.parts[index].seconds_per_window is None:
        set_timed_speed(estimate, index, time_one_window(engine, runner.in_channels, runner.config.patch_size))
        estimate.shown = False
    if not estimate.shown:
        monitor.estimate(estimate.to_dict())
        estimate.shown = True


def _fp32_windows(policy: Fp32WindowPolicy | None, engines, model, device, monitor) -> Fp32Windows | None:
    """The part's FP32 windows where asked and its engines run INT8 (FP32 engines opened on first use). On
    OpenVINO they run the FP32 graph with the float precision of INT8's remainder (``--cpu-float``): bf16 when a
    user chose it (much faster on AMX CPUs), else f32."""
    if policy is None or engines[0].info.precision != "int8":
        return None
    runtime = engines[0].info.runtime
    floats = getattr(engines[0], "float_precision", None) if runtime == "openvino" else None
    return Fp32Windows(policy, lambda: open_engines(model, runtime, "fp32", device=device, monitor=monitor,
                                                    float_precision=floats)[0])


def _run_all(models, runners, volume, runtime, precision, device, mirroring, monitor, estimate=None,
             overlap: bool = False, fp32_windows: Fp32WindowPolicy | None = None) -> _Run:
    """Every part in turn (engines opened per part); parts with the same preprocessing share it. ``overlap``: each
    part's export runs in a second thread while the next part's sliding window runs (the export is mostly
    single-threaded, the engines use every core), so at most two parts' logits are held. ``seconds``: the time
    spent preprocessing, in sliding windows and waiting for exports: overlapped work counts once."""
    from .predict import stages_for

    run = _Run()
    monitor, exports = _two_threads(monitor) if overlap else (monitor, None)
    shared = _SharedPreprocessing(runners, volume, monitor)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nnunet-export") as pool:
        exporting: Future | None = None
        try:
            for index, (model, runner) in enumerate(zip(models, runners)):
                monitor.check()  # a cancel between parts stops before the next part's engines are built
                stages = stages_for(_part_label(models, index))
                started = time.perf_counter()
                engines, why = open_engines(model, runtime, precision, device=device, monitor=monitor)
                run.build_seconds += time.perf_counter() - started
                if engines[0].info.precision != precision:  # INT8 that missed its accuracy target: FP32
                    run.fallbacks.append(fallback_note(model))
                if run.info is None or run.info.precision != precision:  # the asked precision where any part ran it
                    run.info = engines[0].info
                run.reason = why or run.reason
                run.engine_bytes += sum(e.info.bytes_on_disk for e in engines)
                if estimate is not None:
                    _show_estimate(estimate, index, engines[0], runner, monitor)
                windows = _fp32_windows(fp32_windows, engines, model, device, monitor)
                predicted = runner.predict_logits(volume, engines, mirroring=mirroring, monitor=monitor,
                                                  preprocessed=shared.get(runner, stages.preprocessing), stages=stages,
                                                  fp32_windows=windows)
                del engines, windows  # before the next part's are built
                if predicted.fp32_windows is not None:
                    run.fp32_windows.append(predicted.fp32_windows)
                    run.build_seconds += predicted.fp32_windows.build_seconds
                run.seconds += predicted.seconds
                run.network_seconds += predicted.network_seconds
                run.patches += predicted.patches
                run.seconds += _collect(exporting, run)  # the previous part's export, before this one's starts
                if exports is None:
                    labels, seconds = runner.export(predicted, monitor, stages.export)
                    run.parts.append(labels)
                    run.seconds += seconds
                else:
                    exporting = pool.submit(runner.export, predicted, exports, stages.export)
                del predicted
            run.seconds += _collect(exporting, run)
        except BaseException:
            if exports is not None:
                exports.cancel()  # a running export stops at its next check, before the pool is shut down
            raise
    run.seconds += shared.seconds
    return run


def _collect(exporting: Future | None, run: _Run) -> float:
    """Wait for an export (its exceptions, Cancelled included, raise here) and keep its labels; the seconds
    waited (the rest of its seconds ran beside the sliding window)."""
    if exporting is None:
        return 0.0
    started = time.perf_counter()
    while True:  # in short waits: Ctrl-C reaches the main thread between bytecodes (core/interrupts.py)
        try:
            labels, seconds = exporting.result(timeout=0.1)
            break
        except FutureTimeout:
            continue
    waited = time.perf_counter() - started
    run.parts.append(labels)
    run.beside_seconds += max(seconds - waited, 0.0)
    return waited


class _EitherEvent:
    """Set when the user cancels (``parent``) or when this one is set (the main thread stopping its helper)."""

    def __init__(self, parent: threading.Event):
        self.parent, self.own = parent, threading.Event()

    def is_set(self) -> bool:
        return self.own.is_set() or self.parent.is_set()

    def set(self) -> None:
        self.own.set()


def _two_threads(monitor: Monitor) -> tuple[Monitor, Monitor]:
    """Monitors for the main thread and the export thread: callbacks run one at a time; the user's cancel
    reaches both, and the export thread's can also be stopped on its own."""
    monitor.end_loading()  # the copies do not know about an open "loading" stage
    lock = threading.Lock()

    def locked(callback):
        if callback is None:
            return None

        def call(*args):
            with lock:
                callback(*args)
        return call

    progress, estimate = locked(monitor.on_progress), locked(monitor.on_estimate)
    return (Monitor(on_progress=progress, cancel_event=monitor.cancel_event, on_estimate=estimate),
            Monitor(on_progress=progress, cancel_event=_EitherEvent(monitor.cancel_event), on_estimate=estimate))


def _merge(parts: Sequence[np.ndarray], lookups: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Each part's labels mapped to the merged classes; a later part's foreground wins over what is there."""
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    merged = None
    for labels, lookup in zip(parts, lookups):
        mapped = np.asarray(lookup, dtype=dtype)[labels]
        if merged is None and int(lookup[0]) == 0:
            merged = mapped  # the first part: background stays 0, so its mapped labels are the merge so far
            continue
        merged = np.zeros(labels.shape, dtype) if merged is None else merged
        np.copyto(merged, mapped, where=labels > 0)
    return merged


def _int8_warnings(models: Sequence[NnUNetModel]) -> list[str]:
    """Quantized parts made for CPUs with int8 dot-product instructions, run on one without them."""
    from ..input_checks import int8_target_warning

    found = []
    for model in models:
        report_path = model.root / "quantization.json"
        report = json.loads(report_path.read_text(encoding="utf-8")) if model.quantized and report_path.is_file() else {}
        if report.get("int8_fallback"):  # runs in FP32 (quantize --on-miss fp32): its own note says so
            continue
        found += [note for note in (int8_target_warning(report, str(model.root)),) if note]
    return found


def segment_nnunet(models, input_path, output, *, runtime: str = "auto", precision: str = "int8",
                   compare: bool = False, reference=None, device: str | None = None, mirroring: bool = False,
                   step_size: float | None = None, monitor: Monitor | None = None,
                   label_map: str | dict[int, int] | None = None, reference_labels=None,
                   fp32_windows: float | None = None):
    """``pipeline.segment`` for nnU-Net models (one, several parts, or a parts file); Dice against ``reference``
    pairs classes as ``ptqseg evaluate`` does (``label_map``, else names, else values). ``fp32_windows``: INT8
    on the CPU, at most this share of each part's windows, those INT8 is least sure of, are taken from FP32."""
    from ...evaluation.metrics import agreement_dice, check_label_map, compare_label_maps, reference_names
    from ...evaluation.metrics import parse_label_map as parse_pairs
    from ..input_checks import refuse_label_map
    from ...io.volumes import read_volume, write_label_tables, write_labelmap
    from ...core.fileio import check_output_path
    from .estimate import estimate_run
    from .memory import check_nnunet_memory, overlap_fits
    from .predict import runner_for

    monitor = monitor or Monitor()
    policy = Fp32WindowPolicy(fp32_windows) if fp32_windows else None
    if policy is not None and precision != "int8":
        raise InputError(f"--fp32-windows takes some INT8 windows from FP32; it needs --precision int8, "
                         f"not {precision}.")
    paths, labels = expand_models(models)
    output = check_output_path(output, [input_path] + ([reference] if reference else []))
    if step_size is not None and not 0 < step_size <= 1:
        raise InputError(f"--step-size must be in (0, 1], got {step_size}.")
    opened = [open_nnunet_model(p) for p in paths]
    for model in opened:
        model.step_size = model.step_size if step_size is None else float(step_size)
    classes, lookups = merged_classes(opened, labels)
    volume = read_volume(input_path).validate(f"input volume '{input_path}'")
    refuse_label_map(volume, input_path)
    if (label_map or reference_labels) and not reference:
        raise InputError("--label-map and --reference-labels pair the model's classes with --reference; give "
                         "--reference too.")
    mapping = parse_pairs(label_map) if isinstance(label_map, str) else label_map
    ref_volume = read_volume(reference) if reference else None
    if ref_volume is not None:
        volume.require_same_grid(ref_volume, f"Reference '{reference}'")
        check_label_map(ref_volume.array, f"Reference '{reference}'")
        ref_names = reference_names(reference, reference_labels)
    runners = [runner_for(m) for m in opened]
    folds = [len(m.folds) for m in opened]
    # before any engine is built
    check_nnunet_memory(runners, volume, folds, f"input volume '{input_path}'", fp32_windows=policy is not None)
    overlap = overlap_fits(runners, volume, folds, fp32_windows=policy is not None)
    estimate = estimate_run(opened, runners, volume, runtime, precision, mirroring, compare and precision != "fp32",
                            overlap, fp32_windows=policy is not None)
    estimate.fp32_windows = sum(policy.most(p.windows) for p in estimate.parts) if policy else 0
    if estimate.seconds is not None:  # measured by the accuracy guard here: said before any engine is built
        monitor.estimate(estimate.to_dict())
        estimate.shown = True
    run = _run_all(opened, runners, volume, runtime, precision, device, mirroring, monitor, estimate, overlap, policy)
    merged = _merge(run.parts, lookups, len(classes))
    present = list(range(1, len(classes)))
    agreement = fp32 = None
    if compare and precision != "fp32":
        fp32 = _run_all(opened, runners, volume, run.info.runtime, "fp32", device, mirroring, monitor,
                        overlap=overlap)
        agreement = agreement_dice(merged, _merge(fp32.parts, lookups, len(classes)), present)
    on_cpu = str(run.info.device).lower().startswith("cpu")
    warnings = (_int8_warnings(opened) if run.info.precision == "int8" and on_cpu else []) + run.fallbacks
    reference_dice = per_class = None
    if ref_volume is not None:
        comparison = compare_label_maps(merged, ref_volume.array, pred_names={i: c.name for i, c in enumerate(classes)},
                                        ref_names=ref_names, label_map=mapping, labels=present)
        reference_dice, warnings = comparison.dice.mean, warnings + comparison.warnings
        per_class = {f"{k} {comparison.names.get(k, '')}".strip(): v for k, v in comparison.dice.per_class.items()}
    monitor.check()
    write_labelmap(Volume(array=merged, ijk_to_ras=volume.ijk_to_ras.copy()), output, classes)
    json_path, csv_path = write_label_tables(classes, output)
    return SegmentOutcome(output=output, labels_json=json_path, labels_csv=csv_path, runtime=run.info.runtime,
                          runtime_reason=run.reason, precision=run.info.precision,
                          engine_size_mb=run.engine_bytes / 1e6, seconds=run.seconds,
                          network_seconds=run.network_seconds, patches=run.patches, build_seconds=run.build_seconds,
                          overlapped_seconds=run.beside_seconds,
                          agreement_dice=agreement, reference_dice=reference_dice, reference_per_class=per_class,
                          fp32_seconds=None if fp32 is None else fp32.seconds,
                          fp32_network_seconds=None if fp32 is None else fp32.network_seconds, warnings=warnings,
                          estimate=estimate.to_dict(),
                          fp32_windows=summary(run.fp32_windows, policy) if run.fp32_windows else None)


class NnUNetKind:
    """nnU-Net models: a quantized nnU-Net folder, an original results folder, several parts, or a parts file."""

    def can_open(self, model: ModelArg) -> bool:
        return is_nnunet_target(model)

    def open(self, model: ModelArg, options: SegmentOptions) -> "NnUNetSegmenter":
        if options.torch_compile is not None:
            raise InputError("--torch-compile is not available for nnU-Net models (they run nnU-Net's own "
                             "predictor); leave it out.")
        return NnUNetSegmenter(model)


class NnUNetSegmenter:
    def __init__(self, models: ModelArg):
        self.models = models

    def segment(self, input_path, output, options: SegmentOptions, monitor: Monitor) -> SegmentOutcome:
        return segment_nnunet(self.models, input_path, output, runtime=options.runtime, precision=options.precision,
                              compare=options.compare, reference=options.reference, device=options.device,
                              mirroring=options.mirroring, step_size=options.step_size, monitor=monitor,
                              label_map=options.label_map, reference_labels=options.reference_labels,
                              fp32_windows=options.fp32_windows)
