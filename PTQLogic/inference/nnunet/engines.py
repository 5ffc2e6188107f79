"""The engines of an nnU-Net model: one per fold, all of one runtime and precision, cached in the user cache
folder by the fold's content (a quantized model folder is only read, so a read-only one works)."""
from __future__ import annotations

from typing import Any

from ...core.errors import InputError
from ...core.progress import Monitor
from ...models.nnunet.model_dir import NnUNetModel
from ...models.nnunet.network import build_network, load_weights


def quantization_report(model: NnUNetModel) -> dict[str, Any]:
    """The quantized folder's ``quantization.json`` ({} where there is none or it cannot be read)."""
    import json

    path = model.root / "quantization.json"
    if not model.quantized or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def int8_fallback(model: NnUNetModel) -> dict[str, Any] | None:
    """Why this quantized folder has no INT8 (``quantize --on-miss fp32``: its INT8 missed the accuracy target),
    or None."""
    return quantization_report(model).get("int8_fallback")


def fallback_note(model: NnUNetModel) -> str:
    """What ``segment`` says about a part that runs in FP32 because its INT8 missed the accuracy target."""
    report = quantization_report(model)
    fold = str((report.get("int8_fallback") or {}).get("fold"))
    guard = ((report.get("folds") or {}).get(fold) or {}).get("guard") or {}
    measured = (f" (agreement {guard['agreement']:.4f} < {guard['threshold']:.4f} on {guard['runtime']}, "
                f"{guard['isa']})" if guard.get("threshold") is not None else "")
    return (f"'{model.root}' ran in FP32, not INT8: when it was quantized, its INT8 missed the accuracy "
            f"target{measured} and quantize --on-miss fp32 kept it in FP32.")


def open_engines(model: NnUNetModel, runtime: str, precision: str, *, device: str | None = None,
                 monitor: Monitor | None = None, float_precision: str | None = None) -> tuple[list[Any], str]:
    """One engine per fold (same runtime and precision for all); INT8 asked of a folder whose INT8 missed the
    accuracy target (:func:`int8_fallback`) gives FP32 engines. ``float_precision``: OpenVINO's, see
    :func:`~PTQLogic.engines.create_engine`."""
    from ...engines.cache import model_cache_dir
    from ...engines import choose_runtime, create_engine
    from ...engines.torch_engine import TorchEngine

    reason = ""
    if not model.quantized:
        if runtime not in ("auto", "torch") or precision not in ("fp32", "fp16"):
            raise InputError(f"'{model.root}' is an original nnU-Net folder: it runs only with --runtime torch "
                             "--precision fp32 (or fp16 on an NVIDIA GPU). Quantize it first (ptqseg quantize "
                             "--model FOLDER ...) for other runtimes and INT8.")
        # FP16 on the GPU when no device is named (PyTorch's own choice; its error says so without one)
        device = device or (None if precision == "fp16" else "cpu")
        return [TorchEngine(net, precision, device=device) for net in model.networks], \
            f"PyTorch {precision.upper()}: the original nnU-Net weights"
    if runtime == "auto":
        runtime, reason = choose_runtime(precision)
    if precision == "int8" and int8_fallback(model):
        precision = "fp32"
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
            device=device, monitor=monitor or Monitor(), float_precision=float_precision))
    return engines, reason
