"""PyTorch -> ONNX export, verified against PyTorch with ONNX Runtime on random patches.

The TorchScript-based exporter (``dynamo=False``) is used first: on torch 2.13 it exports MONAI's 3D
networks (UNet, SegResNet, SwinUNETR, ...) quickly and with a symbolic batch dimension; the
``torch.export`` (dynamo) exporter is the fallback when the legacy one is gone or fails.
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import AccuracyError, InputError, ModelError
from ..core.fileio import atomic_path
from ..core.progress import Monitor
from ..core.spec import ModelSpec

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
ONNX_PROTOBUF_LIMIT = 2 ** 31 - 1


@dataclass
class ExportReport:
    path: Path
    bytes: int
    max_abs_error: float
    opset: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _torch_export(model, dummy, path: Path, opset: int) -> int:
    """Export with the TorchScript exporter, else dynamo; returns the opset actually written."""
    import torch

    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **common)
        return opset
    except Exception as legacy_error:  # legacy exporter missing or op unsupported: try torch.export
        dynamo_opset = max(opset, 18)  # the dynamo exporter's native opset; down-conversion often fails
        try:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(model, (dummy,), str(path), dynamo=True, opset_version=dynamo_opset,
                              dynamic_shapes=({0: batch},), external_data=False, **common)
            return dynamo_opset
        except Exception as dynamo_error:
            raise ModelError(
                f"Could not export the network to ONNX (TorchScript exporter: {_first_line(legacy_error)}; "
                f"torch.export: {_first_line(dynamo_error)}). Check that the network runs on a "
                f"{tuple(dummy.shape)} input."
            ) from None


def _max_abs_error(model, spec: ModelSpec, onnx_file: Path, check_patches: int, monitor: Monitor,
                   stage: str, total: int) -> tuple[float, float]:
    """(max |ORT - torch|, max |torch logits|) over ``check_patches`` random patches run as one batch."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    # One batch of several patches also proves the batch dimension is really dynamic.
    batch = torch.rand((check_patches, spec.in_channels, *spec.patch_size), generator=generator) * 2 - 1
    with torch.no_grad():
        reference = model(batch.to(_model_device(model))).float().cpu().numpy()
    monitor.update(stage, 2, total)
    output = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    if output.shape != reference.shape:
        raise AccuracyError(f"ONNX output shape {output.shape} differs from PyTorch's {reference.shape}.")
    return float(np.max(np.abs(output - reference))), float(np.max(np.abs(reference)))


def _model_device(model):
    import torch

    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def export_onnx(model, spec: ModelSpec, path: str | Path, opset: int = 17, monitor: Monitor | None = None,
                tolerance: float = 1e-3, check_patches: int = 2) -> ExportReport:
    """Export ``model`` to ``path`` (input "input", output "logits", dynamic batch) and verify it.

    The check runs ONNX Runtime (CPU) and PyTorch on ``check_patches`` random patches of
    ``spec.patch_size``; it fails with :class:`AccuracyError` when the max abs difference exceeds
    ``tolerance * max(1, max |logit|)`` (relative to the logit scale, absolute for small logits).
    Nothing is written at ``path`` unless export and check both succeed.
    """
    import onnx
    import torch

    monitor = monitor or Monitor()
    if opset < MIN_OPSET:
        raise InputError(f"ONNX opset {opset} is too old; use {MIN_OPSET} or newer.")
    if check_patches < 1:
        raise InputError(f"check_patches must be >= 1, got {check_patches}.")
    stage, total = "export", 3
    monitor.update(stage, 0, total)
    model.eval()
    dummy = torch.zeros((1, spec.in_channels, *spec.patch_size), device=_model_device(model))
    path = Path(path)
    with atomic_path(path, suffix=".onnx") as tmp:
        with torch.no_grad():
            written_opset = _torch_export(model, dummy, tmp, opset)
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as exc:
            raise ModelError(f"The exported ONNX model is invalid: {_first_line(exc)}") from None
        monitor.update(stage, 1, total)
        error, scale = _max_abs_error(model, spec, tmp, check_patches, monitor, stage, total)
        allowed = tolerance * max(1.0, scale)
        if not np.isfinite(error) or error > allowed:
            raise AccuracyError(
                f"ONNX Runtime output differs from PyTorch by {error:.3g} (allowed {allowed:.3g}, "
                f"logit scale {scale:.3g}); the exported graph does not reproduce the network."
            )
        size = tmp.stat().st_size
    monitor.update(stage, total, total)
    return ExportReport(path=path, bytes=size, max_abs_error=error, opset=written_opset)


def onnx_io_names(path: str | Path) -> tuple[str, str, list[int | str | None]]:
    """(input name, output name, input shape with symbolic dims as strings) of a 1-in 1-out model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model '{path}' does not exist.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"'{path}' is not a readable ONNX model: {_first_line(exc)}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"ONNX model '{path}' has {len(inputs)} inputs and {len(outputs)} outputs; a segmentation model "
            "needs exactly one image input (N, C, D, H, W) and one logits output."
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return inputs[0].name, outputs[0].name, shape


def copy_onnx_model(src: str | Path, dst: str | Path) -> Path:
    """Validate a user-given ONNX model and copy it atomically to ``dst`` (external data is inlined)."""
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelError(f"ONNX model '{src.resolve()}' does not exist.")
    try:
        onnx.checker.check_model(str(src))
        header = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"'{src}' is not a valid ONNX model: {_first_line(exc)}") from None
    _, _, shape = onnx_io_names(src)
    if len(shape) != 5:
        raise ModelError(f"ONNX model '{src}' takes a {len(shape)}-D input; a 3D network needs (N, C, D, H, W).")
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    with atomic_path(dst, suffix=".onnx") as tmp:
        if external:
            model = onnx.load(str(src))
            if model.ByteSize() > ONNX_PROTOBUF_LIMIT:
                raise ModelError(f"ONNX model '{src}' is larger than 2 GB; it cannot be stored as one file.")
            onnx.save_model(model, str(tmp))
        else:
            shutil.copyfile(src, tmp)
    return dst
