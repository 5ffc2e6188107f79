"""The engine of a model folder: the runtime and precision asked for, built or loaded from the engine cache."""
from __future__ import annotations

from pathlib import Path

from ..core.progress import Monitor
from ..models.model_folder import ModelDir
from ..models.torch_models import load_torch_model
from . import choose_runtime, create_engine
from .cache import model_cache_dir


def engine_cache_dir(model_dir: ModelDir) -> Path:
    """Engine caches of a model folder: in the user cache folder, keyed by the model's content, so a
    read-only or shared model folder works and is never written to."""
    return model_cache_dir([model_dir.spec_path, model_dir.fp32_onnx, model_dir.int8_onnx])


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
        cache_dir=engine_cache_dir(model_dir),
        device=device,
        threads=threads,
        max_batch=max(4, batch_size),  # TensorRT's optimization profile must cover the batch
        monitor=monitor or Monitor(),
        torch_compile=torch_compile,
    )
    return engine, reason
