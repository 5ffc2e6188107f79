"""The engines of an nnU-Net model: one per fold, all of one runtime and precision, cached in the user cache
folder by the fold's content (a quantized model folder is only read, so a read-only one works)."""
from __future__ import annotations

from typing import Any

from ...core.errors import InputError
from ...core.progress import Monitor
from ...models.nnunet.model_dir import NnUNetModel
from ...models.nnunet.network import build_network, load_weights


def open_engines(model: NnUNetModel, runtime: str, precision: str, *, device: str | None = None,
                 monitor: Monitor | None = None) -> tuple[list[Any], str]:
    """One engine per fold (same runtime and precision for all)."""
    from ...engines.cache import model_cache_dir
    from ...engines import choose_runtime, create_engine
    from ...engines.torch_engine import TorchEngine

    reason = ""
    if not model.quantized:
        if runtime not in ("auto", "torch") or precision != "fp32":
            raise InputError(f"'{model.root}' is an original nnU-Net folder: it runs only with --runtime torch "
                             "--precision fp32. Quantize it first (ptqseg quantize --model FOLDER ...) for other runtimes.")
        return [TorchEngine(net, "fp32", device=device or "cpu") for net in model.networks], \
            "PyTorch FP32: the original nnU-Net weights"
    if runtime == "auto":
        runtime, reason = choose_runtime(precision)
    engines = []
    for fold in model.folds:
        folder = model.fold_dir(fold)
        torch_model = None
        if runtime == "torch":
            import torch

            torch_model = build_network(model.architecture(), model.spec.in_channels, model.spec.num_classes)
            state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
            load_weights(torch_model, state, str(folder / "weights.pt"))
        engines.append(create_engine(
            runtime, precision, fp32_onnx=folder / "fp32.onnx",
            int8_onnx=(folder / "int8.onnx") if (folder / "int8.onnx").is_file() else None,
            torch_model=torch_model, weights_path=(folder / "weights.pt") if runtime == "torch" else None,
            cache_dir=model_cache_dir([p for p in (folder / "fp32.onnx", folder / "int8.onnx") if p.is_file()]),
            device=device, monitor=monitor or Monitor()))
    return engines, reason
