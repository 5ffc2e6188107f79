"""Segment with a model `quantize` takes (a spec, a model file with its spec, a MONAI bundle) as it is, in FP32:
the baseline to look at before quantizing. A PyTorch network runs on PyTorch; an ONNX model on the ONNX runtimes."""
from __future__ import annotations

from pathlib import Path

from ..core.errors import InputError
from ..core.progress import Monitor
from ..core.spec import ModelSpec
from .folder_segmenter import ModelFolderSegmenter
from .interface import ModelArg, SegmentOptions


def _quantize_first(path: Path, why: str, instead: str) -> InputError:
    return InputError(f"'{path}' is not quantized, so {why}; quantize it first: ptqseg quantize --model {path} "
                      f"--calibration VOLUMES --out FOLDER (then segment --model FOLDER), or {instead}.")


class UnquantizedKind:
    """A model `quantize` takes that is not a quantized model folder (a spec, a bundle): its FP32 baseline."""

    def can_open(self, model: ModelArg) -> bool:
        from ..models.model_folder import is_unquantized_model

        items = [model] if isinstance(model, (str, Path)) else list(model)
        return len(items) == 1 and is_unquantized_model(items[0])

    def open(self, model: ModelArg, options: SegmentOptions) -> "UnquantizedSegmenter":
        return UnquantizedSegmenter.open(Path(model if isinstance(model, (str, Path)) else model[0]), options)


class UnquantizedSegmenter(ModelFolderSegmenter):
    def __init__(self, path: Path, spec: ModelSpec, network=None):
        self.path, self._spec, self._network = path, spec, network

    @classmethod
    def open(cls, path: Path, options: SegmentOptions) -> "UnquantizedSegmenter":
        """Refuse what an unquantized model cannot run before any work: INT8, and ONNX runtimes for a PyTorch
        network (they need the FP32 ONNX that `quantize` exports)."""
        from ..models.model_folder import load_from_source, load_model_spec

        if options.precision == "int8":
            raise _quantize_first(path, "it has no INT8 model", "run its FP32 baseline as it is with --precision fp32")
        loaded = load_from_source(path)  # a MONAI bundle: its spec and network
        spec = loaded.spec if loaded is not None else load_model_spec(path)
        is_onnx = "onnx" in (spec.architecture, spec.weights_format)
        if is_onnx and options.runtime == "torch":
            raise InputError(f"'{path}' is an ONNX model: PyTorch cannot run it; use --runtime auto, openvino or "
                             "onnxruntime.")
        if not is_onnx and options.runtime not in ("auto", "torch"):
            raise _quantize_first(path, f"--runtime {options.runtime} has no ONNX file of it to run",
                                  "run it as it is on PyTorch with --runtime torch")
        return cls(path, spec, None if loaded is None else loaded.networks[0])

    def spec(self) -> ModelSpec:
        return self._spec

    def int8_warning(self) -> str | None:
        return None

    def _engine(self, options: SegmentOptions, precision: str, monitor: Monitor, runtime: str | None = None):
        from ..engines import choose_runtime, create_engine
        from ..engines.cache import model_cache_dir
        from ..models.torch_models import load_torch_model

        spec, runtime = self._spec, runtime or options.runtime
        onnx_path = spec.weights_path() if "onnx" in (spec.architecture, spec.weights_format) else None
        reason = ""
        if runtime == "auto" and onnx_path is None:
            runtime, reason = "torch", "PyTorch: the model as given, not quantized (FP32 baseline)"
        elif runtime == "auto":
            runtime, reason = choose_runtime(precision)
        engine = create_engine(
            runtime, precision, fp32_onnx=onnx_path, device=options.device,
            torch_model=None if onnx_path else self._network or load_torch_model(spec),
            weights_path=spec.weights_path(), cache_dir=None if onnx_path is None else model_cache_dir([onnx_path]),
            max_batch=max(4, options.batch_size or 1), monitor=monitor, torch_compile=options.torch_compile)
        return engine, reason
