"""The two public calls behind the CLI and the Slicer module: quantize a model, segment a volume.

``quantize_model`` turns a model (spec, TorchScript/ONNX file, MONAI bundle, nnU-Net results folder) into a
*model folder* (spec + weights, verified FP32 ONNX, calibrated INT8 Q/DQ ONNX, a quantization report);
``segment`` runs any engine of a model folder on a volume file and writes a label map on the volume's own
grid. The model's kind decides how each is done (``quantization.quantizers``, ``inference.segmenters``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .core.progress import Monitor
from .inference.interface import SegmentOptions
from .inference.results import SegmentOutcome
from .quantization.interface import DEFAULT_GUARD, DEFAULT_METHOD, GuardTarget, QuantizeOptions
from .quantization.result import QuantizeResult

__all__ = ["quantize_model", "segment", "QuantizeResult", "SegmentOutcome"]


def quantize_model(
    model: str | Path,
    calibration: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    num_patches: int = 32,
    seed: int = 0,
    method: str = DEFAULT_METHOD,
    exclude_nodes: Sequence[str] = (),
    guard: GuardTarget | None = DEFAULT_GUARD,
    monitor: Monitor | None = None,
    folds: Sequence[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    placement: str = "auto",
    activations: str = "s8",
    subpixel: bool = False,
    target_cpu: str = "auto",
    percentile: float | None = None,
    bias_correction: bool = False,
    on_miss: str = "fail",
    equalize: bool = False,
) -> QuantizeResult:
    """Model and unlabeled volumes -> model folder with verified FP32 and INT8 Q/DQ ONNX.

    ``method``: "entropy" (default), "max" or "percentile" (activation ranges clipped at ``percentile``, default
    99.99).
    ``guard``: the accuracy guard's target (default: agreement >= 0.98 with FP32 on held-out data, on the runtime
    that will run INT8; the most sensitive layers stay FP32 until it holds, else ``AccuracyError``); ``None``
    measures and records the agreement without enforcing it.
    ``placement``: "auto" (ModelOpt's, the fidelity default, ``presets.resolve_placement``), "modelopt" or "cpu"
    (the opt-in CPU speed preset).
    ``target_cpu``: the CPU that will run the INT8 file: "auto" (this one), "vnni" (int8 dot-product instructions:
    AVX512-VNNI, AVX-VNNI, AMX; also for GPUs) or "avx2" (x86 without them: 7-bit convolution weights).
    ``bias_correction``: empirical bias correction of the INT8 model on the calibration patches (opt-in:
    ``quantization.bias_correction``, benchmarks/results/fidelity/bias_correction_epyc2_avx2.md).
    ``on_miss``: "fail" (default: ``AccuracyError`` when the guard's target is missed) or, for nnU-Net folders,
    "fp32": the folder is written without INT8 and ``segment`` runs it (a part of a set) in FP32, saying why.
    ``equalize`` (nnU-Net PlainConvUNet folders): channel equalization before export, exact in FP32
    (``quantization.equalize``).
    """
    from .quantization.quantizers import quantizer_for

    options = QuantizeOptions(num_patches=num_patches, seed=seed, method=method, exclude_nodes=tuple(exclude_nodes),
                              guard=guard, folds=None if folds is None else tuple(folds), checkpoint=checkpoint,
                              placement=placement, activations=activations, subpixel=subpixel, target_cpu=target_cpu,
                              percentile=percentile, bias_correction=bias_correction, on_miss=on_miss,
                              equalize=equalize)
    return quantizer_for(model).quantize(model, calibration, out_dir, options, monitor or Monitor())


def segment(
    model: str | Path | Sequence[str | Path],
    input_path: str | Path,
    output: str | Path,
    *,
    runtime: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    compare: bool = False,
    reference: str | Path | None = None,
    device: str | None = None,
    monitor: Monitor | None = None,
    mirroring: bool = False,
    step_size: float | None = None,
    label_map: str | dict[int, int] | None = None,
    torch_compile: str | None = None,
    reference_labels: str | Path | None = None,
    fp32_windows: float | None = None,
) -> SegmentOutcome:
    """Segment one volume file; optionally compare with FP32 (agreement Dice) and a reference label map
    (the same Dice as ``ptqseg evaluate``: model classes paired by ``label_map``, else by name through the
    reference's label table ``reference_labels`` or the one beside it, else by value).

    Several models (part folders or a parts file) are nnU-Net parts merged into one map (TotalSegmentator's
    tasks); nnU-Net models run nnU-Net's own inference (``mirroring``: its test-time mirroring;
    ``step_size``: its sliding-window step, default the model's 0.5; ``fp32_windows``: INT8 on the CPU takes at
    most this share of each part's windows, those where INT8 is least sure, from FP32).
    """
    from .inference.segmenters import open_segmenter

    if precision == "auto":  # FP16 on TensorRT (FP32 where it decomposes the model's norms), INT8 on CPUs
        from .engines import choose_precision
        from .inference.segmenters import model_onnx_files

        precision, _ = choose_precision(runtime, model_onnx_files(model))
    options = SegmentOptions(runtime=runtime, precision=precision, batch_size=batch_size, compare=compare,
                             reference=reference, device=device, mirroring=mirroring, step_size=step_size,
                             label_map=label_map, torch_compile=torch_compile, reference_labels=reference_labels,
                             fp32_windows=fp32_windows)
    return open_segmenter(model, options).segment(input_path, output, options, monitor or Monitor())
