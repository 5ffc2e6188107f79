"""The stable calls behind the CLI and the Slicer module: quantize a model, segment a volume.

``quantize_model`` turns a model spec into a *model directory* (spec + weights, verified FP32 ONNX,
calibrated INT8 Q/DQ ONNX, a quantization report); ``segment`` runs any engine of a model directory
on a volume file and writes a label map on the volume's own grid.
"""
from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .core.errors import InputError, ModelError
from .core.fileio import check_output_path, check_writable_dir, publish_dir, staging_dir
from .core.progress import Monitor
from .core.spec import ModelSpec, load_spec
from .core.sysinfo import cpu_int8_note, speed_note

if TYPE_CHECKING:
    from .quantization.guard import GuardTarget

SPEC_NAME = "spec.json"
FP32_NAME = "fp32.onnx"
INT8_NAME = "int8.onnx"
REPORT_NAME = "quantization.json"


@dataclass(frozen=True)
class ModelDir:
    """A folder produced by :func:`quantize_model`."""

    root: Path

    @property
    def spec_path(self) -> Path:
        return self.root / SPEC_NAME

    @property
    def fp32_onnx(self) -> Path:
        return self.root / FP32_NAME

    @property
    def int8_onnx(self) -> Path:
        return self.root / INT8_NAME

    @property
    def report_path(self) -> Path:
        return self.root / REPORT_NAME

    @functools.cached_property
    def engine_cache(self) -> Path:
        """Engine caches of this model: in the user cache folder, keyed by the model's content, so a
        read-only or shared model folder works and is never written to."""
        from .engines.cache import model_cache_dir

        return model_cache_dir([self.spec_path, self.fp32_onnx, self.int8_onnx])

    def spec(self) -> ModelSpec:
        return load_spec(self.spec_path)

    def report(self) -> dict[str, Any]:
        return json.loads(self.report_path.read_text(encoding="utf-8")) if self.report_path.is_file() else {}


def open_model_dir(path: str | Path) -> ModelDir:
    root = Path(path)
    if (root / "nnunet_model.json").is_file():
        raise InputError(f"'{path}' is a quantized nnU-Net model folder (one ONNX per fold); this command does not take "
                         "it yet: use `ptqseg segment --model FOLDER --compare` (sizes, latency, FP32-vs-INT8 agreement).")
    if not (root / SPEC_NAME).is_file() or not (root / FP32_NAME).is_file():
        raise InputError(
            f"'{path}' is not a quantized model folder (it needs {SPEC_NAME} and {FP32_NAME}); "
            "create one with `ptqseg quantize --model SPEC --calibration VOLUMES --out FOLDER`."
        )
    return ModelDir(root)


@dataclass
class QuantizeResult:
    model_dir: Path
    fp32_bytes: int
    int8_bytes: int
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    # the Q/DQ placement used: placement, activations, subpixel, and "auto": what auto chose and why ("" if not auto)
    placement: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "fp32_onnx": str(self.model_dir / FP32_NAME),
            "int8_onnx": str(self.model_dir / INT8_NAME),
            "fp32_mb": self.fp32_bytes / 1e6,
            "int8_mb": self.int8_bytes / 1e6,
            "size_ratio": self.int8_bytes / self.fp32_bytes,
            "seconds": self.seconds,
            "qdq_ok": self.report.get("qdq", {}).get("ok"),
            "calibration_inputs": self.report.get("calibration", {}).get("inputs", []),
            "placement": dict(self.placement),
        }


def load_from_source(model: str | Path):
    """The :class:`~PTQLogic.models.sources.LoadedModel` of a folder a registered source reads (MONAI bundle, ...), else None."""
    from .models.sources import SOURCES

    path = Path(model)
    if path.is_dir() and not (path / SPEC_NAME).is_file():
        for source in SOURCES:
            if source.can_open(path):
                return source.load(path)
    return None


def load_model_spec(model: str | Path) -> ModelSpec:
    """A spec file, a model folder, a source folder (bundle, ...), or a model file with a spec beside it."""
    from .models.model_files import choose_model_source

    path = Path(model)
    if path.is_dir() and (path / SPEC_NAME).is_file():
        return load_spec(path / SPEC_NAME)
    loaded = load_from_source(path)
    if loaded is not None:
        return loaded.spec
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return load_spec(path)
    source = choose_model_source(path)
    if source.spec_path is None:
        raise ModelError(f"'{path}' needs a model spec: {source.description}.")
    spec = load_spec(source.spec_path)
    if spec.weights is None:  # the spec describes the file it sits next to
        fmt = "state_dict" if source.kind == "state_dict" else source.kind
        spec = replace(spec, weights=str(path.resolve()), weights_format=fmt)
    return spec


def _stage_weights(spec: ModelSpec, staging: Path) -> ModelSpec:
    """Copy the weights next to the staged spec so the model folder is self-contained."""
    source = spec.weights_path()
    if source is None:
        if spec.architecture in ("onnx", "torchscript"):
            raise ModelError(f"Model spec '{spec.name}' has architecture '{spec.architecture}' but no 'weights' file.")
        return replace(spec, base_dir=str(staging))
    if not source.is_file():
        raise ModelError(f"Model weights '{source}' (from spec '{spec.name}') do not exist.")
    target = staging / ("weights" + (source.suffix or ".bin"))
    shutil.copyfile(source, target)
    return replace(spec, weights=target.name, base_dir=str(staging))


def check_out_dir(out_dir: str | Path, inputs: Sequence[str | Path]) -> Path:
    """The folder ``quantize`` may (re)place: new, empty, or an earlier model folder holding no input."""
    out_dir = Path(out_dir).resolve()
    if out_dir.parent == out_dir:
        raise InputError(f"'{out_dir}' cannot be a model folder; choose a new folder such as ./my-model-int8.")
    check_writable_dir(out_dir.parent, "quantized model folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"Output '{out_dir}' is a file; give a folder for the quantized model.")
        is_model_dir = (out_dir / SPEC_NAME).is_file() and (out_dir / FP32_NAME).is_file()
        if any(out_dir.iterdir()) and not is_model_dir:
            raise InputError(
                f"Output folder '{out_dir}' already holds other files; choose a new or empty folder "
                "(only an earlier quantized model folder is replaced)."
            )
        for item in inputs:
            item = Path(item).resolve()
            if item == out_dir or out_dir in item.parents:
                raise InputError(f"Input '{item}' lies inside the output folder '{out_dir}', which would be replaced.")
    return out_dir


def quantize_model(
    model: str | Path,
    calibration: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    num_patches: int = 32,
    seed: int = 0,
    method: str = "max",
    exclude_nodes: Sequence[str] = (),
    guard: "GuardTarget | None" = None,
    monitor: Monitor | None = None,
    folds: Sequence[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    placement: str = "auto",
    activations: str = "s8",
    subpixel: bool = False,
) -> QuantizeResult:
    """Spec (+ weights) and unlabeled volumes -> model folder with verified FP32 and INT8 Q/DQ ONNX.

    ``placement``: "auto" places Q/DQ for the INT8 runtime here (``presets.resolve_placement``), or "modelopt"/"cpu".
    """
    from .models.nnunet.folder import is_nnunet_folder

    from .quantization.presets import resolve_placement

    requested = dict(placement=placement, activations=activations, subpixel=subpixel, guarded=guard is not None,
                     excludes_nodes=bool(exclude_nodes))
    if is_nnunet_folder(model):  # nnU-Net results folder: nnU-Net's preprocessing, one ONNX pair per fold
        from .inference.nnunet.model_dir import quantize_nnunet

        placement, activations, subpixel, why = resolve_placement(**requested, nnunet=True)
        if placement != "modelopt" or subpixel or activations != "s8":
            raise InputError("nnU-Net folders are quantized with ModelOpt's Q/DQ placement only; drop --placement, "
                             "--activations and --subpixel.")
        if guard is not None:
            raise InputError("The accuracy guard (--min-agreement/--max-dice-drop) does not take nnU-Net folders yet; "
                             "quantize without it and check agreement with `ptqseg segment --compare`.")

        result = quantize_nnunet(model, calibration, out_dir, num_patches=num_patches, seed=seed, method=method,
                                 exclude_nodes=exclude_nodes, folds=folds, checkpoint=checkpoint,
                                 monitor=monitor)
        return replace(result, placement={"placement": placement, "activations": activations, "subpixel": subpixel,
                                          "auto": why})
    monitor = monitor or Monitor()
    started = time.perf_counter()
    loaded = load_from_source(model)  # a MONAI bundle (or another registered source), else a spec
    spec = loaded.spec if loaded is not None else load_model_spec(model)  # a wrong path fails before heavy imports
    if method not in ("max", "entropy"):
        raise InputError(f"Calibration method must be 'max' or 'entropy', got '{method}'.")
    placement, activations, subpixel, why = resolve_placement(**requested, architecture=spec.architecture)
    chosen = {"placement": placement, "activations": activations, "subpixel": subpixel, "auto": why}
    from .quantization.calibration import (
        CalibrationSettings, calibration_inputs, load_calibration_volumes, sample_calibration_patches,
        validate_settings,
    )
    from .models.onnx_export import copy_onnx_model, export_onnx
    from .models.torch_models import load_torch_model
    from .models.networks import quantize_settings_for
    from .quantization.quantize import QuantizeSettings, quantize_onnx

    calib_settings = CalibrationSettings(num_patches=num_patches, seed=seed)
    validate_settings(calib_settings)
    QuantizeSettings(method=method, exclude_nodes=tuple(exclude_nodes), placement=placement,
                     activations=activations, subpixel=subpixel).validate()
    if guard is not None:
        guard.validate()
        if placement != "modelopt":
            raise InputError("The accuracy guard keeps layers in FP32 through ModelOpt's exclusions; use it with "
                             "--placement modelopt or auto, or drop --min-agreement/--max-dice-drop.")
    calibration_paths = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    weights = [spec.weights_path()] if spec.weights_path() else []
    out_dir = check_out_dir(out_dir, [model, *weights, *calibration_paths])
    # Validate every input before the long work.
    inputs = calibration_inputs(calibration)
    volumes = load_calibration_volumes(inputs, spec)
    is_onnx = "onnx" in (spec.architecture, spec.weights_format)
    if is_onnx and spec.weights_path() is None:
        raise ModelError(f"Model spec '{spec.name}' is an ONNX model but names no 'weights' file (the .onnx).")
    torch_model = None if is_onnx else loaded.networks[0] if loaded is not None else load_torch_model(spec)

    staging = staging_dir(out_dir)
    try:
        monitor.update("export", 0, 1)
        if is_onnx:
            copy_onnx_model(spec.weights_path(), staging / FP32_NAME)
            staged_spec = replace(spec, weights=FP32_NAME, base_dir=str(staging))
            export_info: dict[str, Any] = {"source": "onnx"}
        else:
            staged_spec = _stage_weights(spec, staging)
            exported = export_onnx(torch_model, spec, staging / FP32_NAME, monitor=monitor)
            export_info = {"source": "torch", "max_abs_error": exported.max_abs_error, "opset": exported.opset}
        staged_spec.save(staging / SPEC_NAME)
        monitor.update("export", 1, 1)
        settings = QuantizeSettings(method=method, exclude_nodes=tuple(exclude_nodes), placement=placement,
                                    activations=activations, subpixel=subpixel)
        if placement == "modelopt":  # the architecture's own high-precision parts (e.g. attention MatMuls) too
            settings = replace(quantize_settings_for(spec.architecture, method=method,
                                                     exclude_nodes=tuple(exclude_nodes)), placement=placement)
        guard_info = None
        if guard is None:
            patches = sample_calibration_patches(volumes, spec, calib_settings, monitor)
            report = quantize_onnx(staging / FP32_NAME, patches, staging / INT8_NAME, settings, monitor)
        else:
            from .quantization.guard import guarded_quantize_volumes

            report, guard_info = guarded_quantize_volumes(staging / FP32_NAME, staging / INT8_NAME, volumes, spec,
                                                          calib_settings, settings, guard, monitor)
        summary = {
            "model": spec.name,
            "export": export_info,
            "calibration": {"volumes": len(volumes), "patches": num_patches, "seed": seed, "method": method,
                            "inputs": [str(path) for path in inputs]},
            **report.to_dict(),
            **({"guard": guard_info.to_dict()} if guard_info is not None else {}),
            **({"placement_auto": why} if why else {}),
            "path": INT8_NAME,  # relative: the staging folder is renamed into place below
        }
        (staging / REPORT_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        monitor.check()
        publish_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return QuantizeResult(
        model_dir=out_dir,
        fp32_bytes=(out_dir / FP32_NAME).stat().st_size,
        int8_bytes=(out_dir / INT8_NAME).stat().st_size,
        seconds=time.perf_counter() - started,
        report=summary,
        placement=chosen,
    )


def open_engine(
    model_dir: ModelDir,
    runtime: str,
    precision: str,
    *,
    device: str | None = None,
    batch_size: int = 1,
    threads: int | None = None,
    monitor: Monitor | None = None,
    torch_compile: str | None = None,
):
    """Build or load one engine of a model folder ("auto" runtime picks the best usable one).

    ``torch_compile``: a ``torch.compile`` mode for the PyTorch runtime (see engines.torch_engine).
    """
    from .engines import choose_runtime, create_engine
    from .models.torch_models import load_torch_model

    reason = ""
    if runtime == "auto":
        runtime, reason = choose_runtime(precision)
    spec = model_dir.spec()
    torch_model = load_torch_model(spec) if runtime == "torch" else None
    engine = create_engine(
        runtime,
        precision,
        fp32_onnx=model_dir.fp32_onnx,
        int8_onnx=model_dir.int8_onnx if model_dir.int8_onnx.is_file() else None,
        torch_model=torch_model,
        weights_path=spec.weights_path(),
        cache_dir=model_dir.engine_cache,
        device=device,
        threads=threads,
        max_batch=max(4, batch_size),  # TensorRT's optimization profile must cover the batch
        monitor=monitor or Monitor(),
        torch_compile=torch_compile,
    )
    return engine, reason


@dataclass
class SegmentOutcome:
    output: Path
    labels_json: Path
    labels_csv: Path
    runtime: str
    runtime_reason: str
    precision: str
    engine_size_mb: float
    seconds: float
    network_seconds: float
    patches: int
    build_seconds: float
    agreement_dice: float | None = None
    reference_dice: float | None = None
    fp32_seconds: float | None = None  # with compare: the FP32 run of the same runtime
    fp32_network_seconds: float | None = None
    reference_per_class: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:  # with --compare: say so when low precision did not pay off in speed
        note = self.fp32_latency_ms and speed_note(self.runtime, self.precision, self.latency_ms, self.fp32_latency_ms)
        self.warnings += [note] if note else []

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.network_seconds / max(self.patches, 1)

    @property
    def fp32_latency_ms(self) -> float | None:
        return None if self.fp32_network_seconds is None else 1000.0 * self.fp32_network_seconds / max(self.patches, 1)

    def to_dict(self) -> dict[str, Any]:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        data["latency_ms"] = self.latency_ms
        data["fp32_latency_ms"] = self.fp32_latency_ms
        return data


def segment(
    model: str | Path | Sequence[str | Path],
    input_path: str | Path,
    output: str | Path,
    *,
    runtime: str = "auto",
    precision: str = "int8",
    batch_size: int | None = None,
    compare: bool = False,
    reference: str | Path | None = None,
    device: str | None = None,
    monitor: Monitor | None = None,
    mirroring: bool = False,
    step_size: float | None = None,
    label_map: str | dict[int, int] | None = None,
    torch_compile: str | None = None,
) -> SegmentOutcome:
    """Segment one volume file; optionally compare with FP32 (agreement Dice) and a reference label map
    (the same Dice as ``ptqseg evaluate``: model classes paired by ``label_map``, name, else value).

    nnU-Net models (a quantized nnU-Net folder, an original results folder, several part folders or a
    parts file) run nnU-Net's own inference (``mirroring``: its test-time mirroring; ``step_size``: its
    sliding-window step, default the model's 0.5) and merge parts.
    """
    monitor = monitor or Monitor()
    from .inference.nnunet.segment import is_nnunet_target, segment_nnunet  # light: json/numpy only

    if is_nnunet_target(model):
        if torch_compile is not None:
            raise InputError("--torch-compile is not available for nnU-Net models (they run nnU-Net's own "
                             "predictor); leave it out.")
        return segment_nnunet(model, input_path, output, runtime=runtime, precision=precision, compare=compare,
                              reference=reference, device=device, mirroring=mirroring, step_size=step_size,
                              monitor=monitor)
    if not isinstance(model, (str, Path)):
        if len(model) != 1:
            raise InputError("Several --model values are only for nnU-Net part folders (e.g. TotalSegmentator's).")
        model = model[0]
    model_dir = open_model_dir(model)  # checked before the heavy imports below: a wrong path fails at once
    output = check_output_path(output, [input_path] + ([reference] if reference else []))
    spec = model_dir.spec()
    from .quantization.calibration import warn_intensity_mismatch
    from .evaluation.metrics import (agreement_dice, check_label_map, compare_label_maps, label_table_next_to,
                           parse_label_map)
    from .io.volumes import label_table_paths, read_volume, write_label_tables, write_labelmap
    from .inference.segmenter import segment_volume

    volume = read_volume(input_path).validate(f"input volume '{input_path}'")
    warn_intensity_mismatch(volume, spec, input_path)
    from .inference.preprocess import check_memory

    check_memory(volume, spec, f"input volume '{input_path}'")  # before any engine is built
    low, high = float(volume.array.min()), float(volume.array.max())
    if low == high:
        raise InputError(f"Input volume '{input_path}' is constant (every voxel is {low:g}): there is nothing to "
                         "segment; check that the right file was exported.")
    ref_volume, warnings = None, []
    mapping = parse_label_map(label_map) if isinstance(label_map, str) or label_map is None else dict(label_map)
    if reference:
        ref_volume = read_volume(reference)
        check_label_map(ref_volume.array, f"Reference '{reference}'")
        ref_volume, note = ref_volume.aligned_to(volume, f"Reference '{reference}'")
        warnings += [note] if note else []
    started = time.perf_counter()
    engine, reason = open_engine(model_dir, runtime, precision, device=device, batch_size=batch_size or 1, monitor=monitor,
                                 torch_compile=torch_compile)
    build_seconds = time.perf_counter() - started
    if engine.info.precision == "int8" and getattr(engine.device, "type", str(engine.device)) == "cpu":
        warnings += [note for note in (cpu_int8_note(),) if note]
    result = segment_volume(volume, spec, engine, batch_size=batch_size, monitor=monitor)
    labels = list(range(1, spec.num_classes))
    agreement = fp32_result = None
    if compare and precision != "fp32":
        fp32_engine, _ = open_engine(model_dir, engine.info.runtime, "fp32", device=device, batch_size=batch_size or 1,
                                     monitor=monitor, torch_compile=torch_compile)
        fp32_result = segment_volume(volume, spec, fp32_engine, batch_size=batch_size, monitor=monitor)
        agreement = agreement_dice(result.labels.array, fp32_result.labels.array, labels)
    reference_dice = reference_per_class = None
    if ref_volume is not None:
        comparison = compare_label_maps(
            result.labels.array, ref_volume.array, pred_names={i: c.name for i, c in enumerate(spec.classes)},
            ref_names=label_table_next_to(reference), label_map=mapping, labels=labels)
        reference_dice = comparison.dice.mean
        reference_per_class = {f"{k} {comparison.names.get(k, '')}".strip(): v
                               for k, v in comparison.dice.per_class.items()}
        warnings += comparison.warnings
    write_labelmap(result.labels, output, spec.classes)
    try:
        json_path, csv_path = write_label_tables(spec.classes, output)
    except BaseException:  # a label map without its table is half an output: take it back
        for path in (output, *label_table_paths(output)):
            path.unlink(missing_ok=True)
        raise
    return SegmentOutcome(
        output=output,
        labels_json=json_path,
        labels_csv=csv_path,
        runtime=engine.info.runtime,
        runtime_reason=reason,
        precision=engine.info.precision,
        engine_size_mb=engine.info.bytes_on_disk / 1e6,
        seconds=result.seconds,
        network_seconds=result.network_seconds,
        patches=result.patches,
        build_seconds=build_seconds,
        agreement_dice=agreement,
        reference_dice=reference_dice,
        fp32_seconds=None if fp32_result is None else fp32_result.seconds,
        fp32_network_seconds=None if fp32_result is None else fp32_result.network_seconds,
        reference_per_class=reference_per_class,
        warnings=warnings,
    )
