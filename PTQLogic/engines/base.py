"""The protocol every runtime implements: a batch of patches in, logits out."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineInfo:
    runtime: str  # one of RUNTIMES
    precision: str  # one of PRECISIONS
    device: str  # "cpu", "cuda:0", "CPU (OpenVINO)", ...
    runtime_version: str
    bytes_on_disk: int  # size of the artifact this engine runs (ONNX, engine plan, weights)
    path: str | None = None  # that artifact
    build: dict | None = None  # how it was built (TensorRT: recipe, build_seconds, from_cache)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Engine(Protocol):
    """Runs (N, C, D, H, W) float32 patches and returns (N, classes, D, H, W) float32 logits.

    The logits may have any strides (OpenVINO's are channels-last in memory): do not assume contiguity.

    ``device`` is the torch device inputs should live on (TensorRT keeps them on the GPU); outputs
    come back on the same device. MONAI's ``sliding_window_inference`` can use an engine directly
    as its predictor.
    """

    info: EngineInfo
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...
