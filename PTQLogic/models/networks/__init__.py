"""Networks that no installable package provides, nnU-Net's built from JSON, and per-architecture
INT8 needs: which parts stay in high precision (FP32) and why (``quantization.quantize.quantize_settings_for`` applies them).

Every module here is imported lazily through :data:`PTQLogic.models.torch_models.ARCHITECTURES`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HighPrecision:
    """ONNX node-name regexes and op types ModelOpt must leave unquantized, with the reason."""

    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    why: str = "nothing: every Conv/ConvTranspose runs in INT8"


# ModelOpt matches node names with re.match (anchored at the start); names are the ONNX exporter's
# module paths, e.g. "/swinViT/layers1.0/blocks.0/attn/MatMul_1".
_ATTENTION_BMM = ".*/attn/MatMul(_1)?$"  # q @ k^T and softmax(.) @ v; not the qkv/proj/MLP Linear MatMuls
_ATTENTION_WHY = ("the two attention batched MatMuls (q @ k^T and softmax @ v) stay FP32: both inputs are "
                  "activations, and softmax probabilities span orders of magnitude below their max of 1, so a "
                  "per-tensor INT8 scale of 1/127 zeroes most of them; the qkv, projection and MLP Linear layers, "
                  "and every convolution, run in INT8. LayerNorm, GELU and softmax are never quantized by "
                  "ModelOpt's INT8 mode (they run in FP32 between Q/DQ pairs)")
HIGH_PRECISION: dict[str, HighPrecision] = {
    "SwinUNETR": HighPrecision(exclude_nodes=(_ATTENTION_BMM,), why=_ATTENTION_WHY + "; the relative position "
                               "bias and shifted-window mask are FP32 Adds"),
    "UNesT": HighPrecision(exclude_nodes=(_ATTENTION_BMM,), why=_ATTENTION_WHY),
    "TransUNet3D": HighPrecision(exclude_nodes=(_ATTENTION_BMM,), why=_ATTENTION_WHY),
    "VISTA3DAuto": HighPrecision(
        exclude_nodes=("/class_head/.*",),
        why="the class head (two residual conv blocks, the class-embedding MLP and the embedding-times-feature "
            "MatMul) stays FP32: its output is compared with 0 (sigmoid 0.5) per class, so INT8 error shifts "
            "every organ boundary; it is ~5% of the compute. The SegResNetDS2 image encoder runs in INT8; the "
            "point (prompt) head is not exported in automatic mode"),
}


def high_precision(architecture: str) -> HighPrecision:
    return HIGH_PRECISION.get(architecture, HighPrecision())
