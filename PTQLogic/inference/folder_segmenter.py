"""Segment with a quantized model folder (spec + FP32/INT8 ONNX): preprocessing, our sliding window on one
engine, labels back on the input grid; optionally FP32 on the same runtime and a reference label map."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError
from ..core.fileio import check_output_path
from ..core.progress import Monitor
from ..core.spec import ModelSpec
from ..core.sysinfo import cpu_int8_note
from ..core.volume import Volume
from ..models.model_folder import ModelDir, open_model_dir
from .interface import ModelArg, SegmentOptions
from .results import SegmentationResult, SegmentOutcome


@dataclass
class _Reference:
    volume: Volume | None
    names: dict[int, str] | None = None  # label value -> name, from its label table
    dice: float | None = None
    per_class: dict[str, float] | None = None


class ModelFolderKind:
    """Any model that is not another kind's: it must be one quantized model folder (said in the error)."""

    def can_open(self, model: ModelArg) -> bool:
        return True

    def open(self, model: ModelArg, options: SegmentOptions) -> "ModelFolderSegmenter":
        if not isinstance(model, (str, Path)):
            if len(model) != 1:
                raise InputError("Several --model values are only for nnU-Net part folders (e.g. TotalSegmentator's).")
            model = model[0]
        return ModelFolderSegmenter(open_model_dir(model))  # before the heavy imports: a wrong path fails at once


class ModelFolderSegmenter:
    def __init__(self, model_dir: ModelDir):
        self.model_dir = model_dir

    def spec(self) -> ModelSpec:
        return self.model_dir.spec()

    def int8_warning(self) -> str | None:
        from .input_checks import int8_target_warning

        return int8_target_warning(self.model_dir.report(), str(self.model_dir.root))

    def segment(self, input_path: str | Path, output: str | Path, options: SegmentOptions,
                monitor: Monitor) -> SegmentOutcome:
        from ..evaluation.metrics import agreement_dice

        output = check_output_path(output, [input_path] + ([options.reference] if options.reference else []))
        spec = self.spec()
        volume = _read_input(input_path, spec)
        mapping = _label_mapping(options.label_map)
        reference, warnings = _read_reference(options, volume)
        started = time.perf_counter()
        engine, reason = self._engine(options, options.precision, monitor)
        build_seconds = time.perf_counter() - started
        if engine.info.precision == "int8" and getattr(engine.device, "type", str(engine.device)) == "cpu":
            warnings += [note for note in (self.int8_warning(), cpu_int8_note()) if note]
        result = self._run(volume, spec, engine, options, monitor)
        agreement = fp32 = None
        if options.compare and options.precision != "fp32":
            fp32_engine, _ = self._engine(options, "fp32", monitor, runtime=engine.info.runtime)
            fp32 = self._run(volume, spec, fp32_engine, options, monitor)
            agreement = agreement_dice(result.labels.array, fp32.labels.array, list(range(1, spec.num_classes)))
        if reference.volume is not None:
            warnings += _score_reference(reference, result, spec, mapping)
        json_path, csv_path = _write_outputs(result.labels, output, spec)
        return SegmentOutcome(
            output=output, labels_json=json_path, labels_csv=csv_path, runtime=engine.info.runtime,
            runtime_reason=reason, precision=engine.info.precision, engine_size_mb=engine.info.bytes_on_disk / 1e6,
            seconds=result.seconds, network_seconds=result.network_seconds, patches=result.patches,
            build_seconds=build_seconds, agreement_dice=agreement, reference_dice=reference.dice,
            fp32_seconds=None if fp32 is None else fp32.seconds,
            fp32_network_seconds=None if fp32 is None else fp32.network_seconds,
            reference_per_class=reference.per_class, warnings=warnings,
        )

    def _engine(self, options: SegmentOptions, precision: str, monitor: Monitor, runtime: str | None = None):
        from ..engines.open import open_engine

        return open_engine(self.model_dir, runtime or options.runtime, precision, device=options.device,
                           batch_size=options.batch_size or 1, monitor=monitor, torch_compile=options.torch_compile)

    @staticmethod
    def _run(volume: Volume, spec: ModelSpec, engine, options: SegmentOptions, monitor: Monitor) -> SegmentationResult:
        from .segmenter import segment_volume

        return segment_volume(volume, spec, engine, batch_size=options.batch_size, monitor=monitor)


def _read_input(input_path: str | Path, spec: ModelSpec) -> Volume:
    """The volume to segment, checked before any engine is built: readable, sane, fits in memory, not constant."""
    from ..io.volumes import read_volume
    from .input_checks import refuse_label_map, warn_intensity_mismatch
    from .preprocess import check_memory

    volume = read_volume(input_path).validate(f"input volume '{input_path}'")
    check_memory(volume, spec, f"input volume '{input_path}'")
    low, high = float(volume.array.min()), float(volume.array.max())
    if low == high:
        raise InputError(f"Input volume '{input_path}' is constant (every voxel is {low:g}): there is nothing to "
                         "segment; check that the right file was exported.")
    refuse_label_map(volume, input_path)
    warn_intensity_mismatch(volume, spec, input_path)
    return volume


def _label_mapping(label_map: str | dict[int, int] | None) -> dict[int, int] | None:
    from ..evaluation.metrics import parse_label_map

    return parse_label_map(label_map) if isinstance(label_map, str) or label_map is None else dict(label_map)


def _read_reference(options: SegmentOptions, volume: Volume) -> tuple[_Reference, list[str]]:
    """A reference label map on the input's voxels (reoriented exactly where only axis directions differ),
    with its label names (checked before any engine is built)."""
    reference = options.reference
    if not reference:
        if options.reference_labels:
            raise InputError("--reference-labels names the labels of --reference; give --reference too.")
        return _Reference(None), []
    from ..evaluation.metrics import check_label_map, reference_names
    from ..io.volumes import read_volume

    ref_volume = read_volume(reference)
    check_label_map(ref_volume.array, f"Reference '{reference}'")
    ref_volume, note = ref_volume.aligned_to(volume, f"Reference '{reference}'")
    return _Reference(ref_volume, reference_names(reference, options.reference_labels)), [note] if note else []


def _score_reference(reference: _Reference, result: SegmentationResult, spec: ModelSpec,
                     mapping: dict[int, int] | None) -> list[str]:
    """Dice against the reference, the same as ``ptqseg evaluate``; returns the pairing's warnings."""
    from ..evaluation.metrics import compare_label_maps

    comparison = compare_label_maps(
        result.labels.array, reference.volume.array, pred_names={i: c.name for i, c in enumerate(spec.classes)},
        ref_names=reference.names, label_map=mapping, labels=list(range(1, spec.num_classes)))
    reference.dice = comparison.dice.mean
    reference.per_class = {f"{k} {comparison.names.get(k, '')}".strip(): v
                           for k, v in comparison.dice.per_class.items()}
    return comparison.warnings


def _write_outputs(labels: Volume, output: Path, spec: ModelSpec) -> tuple[Path, Path]:
    """The label map and its label tables; a label map without its tables is half an output: taken back."""
    from ..io.volumes import label_table_paths, write_label_tables, write_labelmap

    write_labelmap(labels, output, spec.classes)
    try:
        return write_label_tables(spec.classes, output)
    except BaseException:
        for path in (output, *label_table_paths(output)):
            path.unlink(missing_ok=True)
        raise
