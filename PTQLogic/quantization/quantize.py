"""INT8 post-training quantization of an FP32 ONNX model with NVIDIA ModelOpt (Q/DQ, TensorRT-ready).

ModelOpt writes intermediate models next to its input and output, and logs every step to stdout.
Here it works in a private temporary folder beside ``out_path`` (same filesystem, so the final rename
is atomic); only the quantized ONNX and its log (``<out stem>.modelopt.log``) reach the user's folder.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError, ModelError, PTQError
from ..models.onnx_export import onnx_io_names
from ..core.fileio import atomic_path, atomic_write_text
from ..core.progress import Monitor
from ..onnx_graph.qdq_check import QDQReport, check_qdq
from ..onnx_graph.weight_range import TARGET_CPUS, resolve_target_cpu
from .interface import METHODS
from .percentile import DEFAULT_PERCENTILE

HIGH_PRECISION = ("fp32",)  # fp16 makes ModelOpt rewrite the graph to FP16: not supported by the engines yet


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = "max"
    percentile: float = DEFAULT_PERCENTILE  # method "percentile": activation ranges clipped at this percentile of |x|
    high_precision: str = "fp32"
    dq_only: bool = True  # INT8 weight initializers + DequantizeLinear: ~4x smaller file
    exclude_nodes: tuple[str, ...] = ()  # node-name regular expressions kept in high precision
    exclude_op_types: tuple[str, ...] = ()
    # "modelopt": ModelOpt's TensorRT placement; "cpu": quantization.placement (INT8 chains for OpenVINO/ORT)
    placement: str = "modelopt"
    activations: str = "s8"  # "cpu" placement only: symmetric int8 or asymmetric uint8 activations
    # "cpu" placement only, exact rewrites (quantization.conv_rewrites): the identity residual of a full-resolution
    # output conv folded into it (faster on every runtime); ConvTranspose as sub-pixel Conv (for ONNX Runtime only:
    # its 3D ConvTranspose is slow and float-only; OpenVINO runs ConvTranspose well and the shuffle costs it)
    fold_residual: bool = True
    subpixel: bool = False
    # The CPU that will run the INT8 file: "auto" (this machine, core.sysinfo.cpu_int8_target), "vnni" (int8
    # dot-product instructions: AVX512-VNNI, AVX-VNNI, AMX; also TensorRT and non-x86 CPUs) keeps 8-bit weights,
    # "avx2" (x86 without them) narrows the weights to 7 bits (onnx_graph.weight_range), which such CPUs need
    # to compute what the graph says
    target_cpu: str = "auto"
    # Empirical bias correction (quantization.bias_correction) of the final Q/DQ model, weights narrowed: opt-in
    bias_correction: bool = False

    def validate(self) -> None:
        from .placement import ACTIVATIONS, PLACEMENTS

        if self.target_cpu not in TARGET_CPUS:
            resolve_target_cpu(self.target_cpu)  # raises the InputError that explains the choices
        if self.placement not in PLACEMENTS:
            raise InputError(f"Q/DQ placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if self.activations not in ACTIVATIONS:
            raise InputError(f"Activation type must be one of {ACTIVATIONS}, got {self.activations!r}.")
        if self.placement != "cpu" and self.subpixel:
            raise InputError("The sub-pixel ConvTranspose rewrite (--subpixel) is part of the 'cpu' placement.")
        if self.placement == "cpu" and (self.exclude_nodes or self.exclude_op_types):
            raise InputError("Excluding nodes or op types is supported with the 'modelopt' placement only.")
        if self.method not in METHODS:
            raise InputError(f"Calibration method must be one of {METHODS}, got {self.method!r}.")
        if not 50.0 < self.percentile < 100.0:
            raise InputError(f"--percentile must be in (50, 100), got {self.percentile} (e.g. {DEFAULT_PERCENTILE}).")
        if self.high_precision not in HIGH_PRECISION:
            raise InputError(f"high_precision must be one of {HIGH_PRECISION}, got {self.high_precision!r}.")


@dataclass
class QuantizeReport:
    path: Path
    bytes: int
    fp32_bytes: int
    ratio: float  # bytes / fp32_bytes
    seconds: float
    calibration_patches: int
    settings: QuantizeSettings
    qdq: QDQReport
    log_path: Path | None = None  # ModelOpt's full log, next to ``path``
    # {"requested", "resolved", "weight_bits", "narrowed_tensors", "why"}: see _apply_target_cpu
    target_cpu: dict[str, Any] | None = None
    bias_correction: dict[str, Any] | None = None  # BiasCorrectionReport.summary() when settings ask for it
    scales_reused: bool = False  # activation scales taken from an earlier quantization, not calibrated again

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        # File name only: the log sits next to the model, and model folders get moved (staging -> final).
        data["log_path"] = None if self.log_path is None else self.log_path.name
        data["settings"]["exclude_nodes"] = list(self.settings.exclude_nodes)
        data["settings"]["exclude_op_types"] = list(self.settings.exclude_op_types)
        if self.settings.method != "percentile":
            del data["settings"]["percentile"]  # unused by the other methods
        data["qdq"] = self.qdq.to_dict()
        return data


def validate_calibration(calibration: np.ndarray, input_shape: list) -> np.ndarray:
    """Check ``calibration`` [N, C, *patch] against the ONNX input shape; return it as float32."""
    if not isinstance(calibration, np.ndarray):
        raise InputError(f"Calibration data must be a numpy array, got {type(calibration).__name__}.")
    expected = ["N"] + [d if isinstance(d, int) and d > 0 else "any" for d in input_shape[1:]]
    if calibration.ndim != len(input_shape) or calibration.shape[0] < 1:
        raise InputError(f"Calibration array has shape {calibration.shape}; the model expects {expected} "
                         "(N >= 1 patches).")
    for axis, (got, want) in enumerate(zip(calibration.shape[1:], input_shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and got != want:
            what = "channels" if axis == 1 else "patch size"
            raise InputError(f"Calibration array has shape {calibration.shape} but the model expects {expected} "
                             f"({what} differ on axis {axis}); sample patches with the model's spec.")
    if not np.issubdtype(calibration.dtype, np.number):
        raise InputError(f"Calibration array has non-numeric dtype {calibration.dtype}.")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if not np.all(np.isfinite(calibration)):
        raise InputError("Calibration array contains NaN or infinite values.")
    return calibration


class _GpuCountFilter(logging.Filter):
    """ModelOpt logs "ERROR - Failed to get GPU count" whenever NVML finds no NVIDIA driver: normal on a CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Failed to get GPU count"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "No NVIDIA GPU visible (NVML); calibrating on the CPU.", ()
        return True


@contextlib.contextmanager
def _captured_modelopt_log(buffer: io.StringIO):
    """Send ModelOpt's stdout log handler into ``buffer``, and detach it afterwards."""
    logger = logging.getLogger("modelopt.onnx")
    gpu_filter = _GpuCountFilter()
    logger.addFilter(gpu_filter)
    with contextlib.redirect_stdout(buffer):
        try:
            yield
        finally:
            logger.removeFilter(gpu_filter)
            for handler in logger.handlers[:]:
                if getattr(handler, "stream", None) is buffer:
                    logger.removeHandler(handler)
            logger.setLevel(logging.WARNING)


# Modules whose own tqdm bars (unlabelled "0/27" bars per calibration batch with entropy) would be drawn on
# stderr, even without a terminal and between --progress-lines: silenced while we call them.
_THIRD_PARTY_BARS = (
    "modelopt.onnx.quantization.ort_patching",
    "modelopt.onnx.quantization.int4",
    "onnxruntime.quantization.calibrate",
)


@contextlib.contextmanager
def _silent_third_party_bars():
    """Disable the tqdm bars of ModelOpt/ONNX Runtime inside this call only; progress goes through our Monitor."""
    import importlib

    from tqdm import tqdm

    class SilentTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patched = []
    for name in _THIRD_PARTY_BARS:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional parts of ModelOpt (int4 needs more packages)
            continue
        if getattr(module, "tqdm", None) is tqdm:
            patched.append(module)
            module.tqdm = SilentTqdm
    try:
        yield
    finally:
        for module in patched:
            module.tqdm = tqdm


CALIBRATION_STAGE = "calibration (ModelOpt)"


def _progress_reader(src: Path, input_name: str, calibration: np.ndarray, monitor: Monitor):
    """ModelOpt's own calibration data provider, reporting each calibration batch to ``monitor``.

    ``monitor.update`` raises :class:`Cancelled` between batches, which unwinds ModelOpt cleanly.
    """
    from modelopt.onnx.quantization.calib_utils import CalibrationDataProvider

    class ProgressReader(CalibrationDataProvider):
        def get_next(self):
            item = super().get_next()
            if item is not None:
                self.done = getattr(self, "done", 0) + 1
                monitor.update(CALIBRATION_STAGE, min(self.done, self.total), self.total)
            return item

        def rewind(self):  # ModelOpt/ORT may pass over the data more than once (entropy)
            super().rewind()
            self.done = 0

    reader = ProgressReader(str(src), {input_name: calibration})
    reader.total = len(reader.calibration_data_list)
    return reader


def _run_cpu_placement(src: Path, dst: Path, calibration: np.ndarray, settings: QuantizeSettings,
                       log: io.StringIO, monitor: Monitor, target: str) -> int:
    from .placement import quantize_cpu

    def on_batch(done: int, total: int) -> None:
        monitor.update(CALIBRATION_STAGE.replace("ModelOpt", "ONNX Runtime"), done, total)

    report = quantize_cpu(src, calibration, dst, activations=settings.activations, method=settings.method,
                          fold_residual=settings.fold_residual, subpixel=settings.subpixel, on_batch=on_batch,
                          target_cpu=target, percentile=settings.percentile)
    log.write(f"CPU Q/DQ placement: {report.to_dict()}\n")
    return report.narrowed_tensors


@contextlib.contextmanager
def _modelopt_without_old_tensorrt():
    """ModelOpt checks models for custom TensorRT ops whenever TensorRT is importable, with a network created
    without flags: implicit batch on TensorRT 8.x, whose ONNX parser then rejects every model. Our models have
    no TensorRT plugins, so with a TensorRT older than 10 (no STRONGLY_TYPED flag) that check is switched off."""
    from modelopt.onnx import trt_utils

    trt = getattr(trt_utils, "trt", None)
    old = getattr(trt_utils, "TRT_PYTHON_AVAILABLE", False) and trt is not None and not hasattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if not old:
        yield
        return
    trt_utils.TRT_PYTHON_AVAILABLE = False
    try:
        yield
    finally:
        trt_utils.TRT_PYTHON_AVAILABLE = True


def _run_modelopt(src: Path, dst: Path, input_name: str, calibration: np.ndarray, settings: QuantizeSettings,
                  log: io.StringIO, monitor: Monitor, target: str,
                  scales: dict[str, float] | None = None) -> int | None:
    """Write the Q/DQ model to ``dst``; the "cpu" placement also narrows the weights for ``target`` and returns
    how many tensors it narrowed (None: ModelOpt's placement, whose weights are still 8-bit). ``scales``: activation
    scales of an earlier quantization of the same FP32 model (:mod:`.scale_reuse`), used instead of calibrating."""
    if settings.placement == "cpu":
        return _run_cpu_placement(src, dst, calibration, settings, log, monitor, target)
    cache = None
    if scales:
        from .scale_reuse import write_calibration_cache

        cache = src.with_name("calibration.cache")
        log.write(f"Activation scales: {write_calibration_cache(scales, cache)} reused from an earlier quantization "
                  "of this model (ModelOpt's calibration cache; ONNX Runtime's quantizer runs on one patch)\n")
        calibration = calibration[:1]
    with _captured_modelopt_log(log), _silent_third_party_bars(), _modelopt_without_old_tensorrt():
        from modelopt.onnx.quantization import quantize

        quantize(
            str(src),
            quantize_mode="int8",
            calibration_data_reader=_progress_reader(src, input_name, calibration, monitor),
            calibration_method="max" if settings.method == "percentile" else settings.method,
            calibration_cache_path=str(cache) if cache else None,
            calibration_eps=["cpu"],
            output_path=str(dst),
            high_precision_dtype=settings.high_precision,
            dq_only=settings.dq_only,
            op_types_to_exclude=list(settings.exclude_op_types) or None,
            nodes_to_exclude=list(settings.exclude_nodes) or None,
            log_level="INFO",
        )
    if settings.method == "percentile" and not scales:  # ModelOpt's placement, then percentile scales
        from .percentile import apply_percentile

        def on_batch(done: int, total: int) -> None:
            monitor.update(CALIBRATION_STAGE.replace("ModelOpt", "percentile"), done, total)

        count = apply_percentile(dst, src, calibration, settings.percentile, on_batch)
        log.write(f"Percentile calibration: {count} activation scales set from the {settings.percentile} "
                  "percentile of |x| (ONNX Runtime's PercentileCalibrater on the FP32 model)\n")
    return None


WEIGHT_BITS_WHY = {
    "avx2": ("Conv/ConvTranspose/MatMul/Gemm weights narrowed to 7 bits (|q| <= 64, scale x2): without VNNI/AMX, "
             "x86 INT8 kernels add pairs of u8 x s8 products in 16 bits, which saturates with 8-bit weights "
             "(2 x 255 x 127 > 32767)"),
    "vnni": "8-bit weights: int8 dot-product instructions accumulate in 32 bits",
}


def _apply_target_cpu(produced: Path, settings: QuantizeSettings, target: str, why: str, log: io.StringIO,
                      narrowed: int | None) -> dict[str, Any]:
    """7-bit weights in ``produced`` for an "avx2" target, unless the placement did it (``narrowed`` given);
    what was done, for ``QuantizeReport.target_cpu``."""
    if target == "avx2" and narrowed is None:
        from ..onnx_graph.weight_range import narrow_weights

        narrow = narrow_weights(produced)
        narrowed = narrow.narrowed_tensors
        log.write(f"Weights for target CPU {target}: {narrow.to_dict()}\n")
    return {"requested": settings.target_cpu, "resolved": target, "weight_bits": 7 if target == "avx2" else 8,
            "narrowed_tensors": narrowed or 0, "why": f"{why}; {WEIGHT_BITS_WHY[target]}"}


def _apply_bias_correction(produced: Path, src: Path, calibration: np.ndarray, settings: QuantizeSettings,
                           log: io.StringIO, monitor: Monitor) -> dict[str, Any] | None:
    """Correct the conv biases of ``produced`` (in the private work folder) against ``src`` on the calibration
    patches, after the weights took their final width: the correction is that of the file the runtime runs."""
    if not settings.bias_correction:
        return None
    from .bias_correction import correct_biases

    corrected = produced.with_name("bias-corrected.onnx")
    summary = correct_biases(produced, src, calibration, corrected, monitor).summary()
    corrected.replace(produced)
    log.write(f"Bias correction: {summary}\n")
    return summary


def _check_reused(produced: Path, scales: dict[str, float], log: io.StringIO) -> bool:
    """Whether every activation scale of ``produced`` came from ``scales``; the log says which did not."""
    from .scale_reuse import unmatched_scales

    unmatched = unmatched_scales(produced, scales)
    if unmatched:
        log.write(f"Activation scales not all reused ({len(unmatched)}: {', '.join(unmatched[:5])}); "
                  "calibrating again\n")
    return not unmatched


def quantize_onnx(fp32_onnx: str | Path, calibration: np.ndarray, out_path: str | Path,
                  settings: QuantizeSettings | None = None, monitor: Monitor | None = None,
                  reuse_scales: dict[str, float] | None = None) -> QuantizeReport:
    """Calibrate on CPU and write an INT8 Q/DQ model to ``out_path`` (atomic); see :class:`QuantizeReport`.

    ``reuse_scales``: the activation scales of an earlier quantization of ``fp32_onnx`` on the same patches and
    settings but fewer layers kept in FP32 (the accuracy guard's steps; :mod:`.scale_reuse`): calibration ranges do
    not depend on which layers are quantized, so they are taken instead of calibrating again (ModelOpt placement).
    """
    settings = settings or QuantizeSettings()
    monitor = monitor or Monitor()
    settings.validate()
    target, why = resolve_target_cpu(settings.target_cpu)
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    input_name, _, input_shape = onnx_io_names(fp32_onnx)
    calibration = validate_calibration(calibration, input_shape)
    if fp32_onnx.resolve() == out_path.resolve():
        raise InputError(f"The quantized model would overwrite its FP32 source '{fp32_onnx}'; choose another path.")
    monitor.update("quantize", 0, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    log_path = out_path.with_name(out_path.name.split(".")[0] + ".modelopt.log")
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out_path.parent))
    try:
        src = workdir / "fp32.onnx"
        shutil.copyfile(fp32_onnx, src)  # ModelOpt writes intermediates next to its input
        produced = workdir / "out" / "int8.onnx"
        produced.parent.mkdir()
        reused = False
        try:
            narrowed = _run_modelopt(src, produced, input_name, calibration, settings, log, monitor, target,
                                     reuse_scales)
            if reuse_scales and settings.placement != "cpu":
                reused = _check_reused(produced, reuse_scales, log)
                if not reused:  # a tensor the earlier model did not quantize: calibrate after all
                    narrowed = _run_modelopt(src, produced, input_name, calibration, settings, log, monitor, target)
        except PTQError:  # cancelled between calibration batches
            raise
        except Exception as exc:
            tail = " | ".join(line for line in log.getvalue().splitlines()[-3:])
            raise ModelError(f"ModelOpt INT8 quantization failed: {type(exc).__name__}: {exc} "
                             f"(last log lines: {tail or 'none'})") from None
        if not produced.is_file():
            raise ModelError(f"ModelOpt finished without writing a model; log: {log.getvalue()[-300:]}")
        target_cpu = _apply_target_cpu(produced, settings, target, why, log, narrowed)
        bias = _apply_bias_correction(produced, src, calibration, settings, log, monitor)
        qdq = check_qdq(produced)
        monitor.check()  # a cancel that arrived after the last calibration batch
        with atomic_path(out_path, suffix=".onnx") as tmp:
            shutil.move(str(produced), tmp)
        atomic_write_text(log_path, log.getvalue())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - start
    size, fp32_size = out_path.stat().st_size, fp32_onnx.stat().st_size
    monitor.update("quantize", 1, 1)
    return QuantizeReport(path=out_path, bytes=size, fp32_bytes=fp32_size, ratio=size / fp32_size,
                          seconds=seconds, calibration_patches=int(calibration.shape[0]), settings=settings,
                          qdq=qdq, log_path=log_path, target_cpu=target_cpu, bias_correction=bias,
                          scales_reused=reused)


def quantize_settings_for(architecture: str, method: str = "max", exclude_nodes=(), exclude_op_types=()):
    """QuantizeSettings with ``architecture``'s exclusions added to the caller's."""
    from ..models.networks import high_precision

    rule = high_precision(architecture)
    return QuantizeSettings(method=method,
                            exclude_nodes=tuple(dict.fromkeys((*rule.exclude_nodes, *exclude_nodes))),
                            exclude_op_types=tuple(dict.fromkeys((*rule.exclude_op_types, *exclude_op_types))))
