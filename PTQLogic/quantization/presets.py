"""Which Q/DQ placement each INT8 runtime runs fastest (no heavy imports: the Slicer module reads it)."""
from __future__ import annotations

from ..errors import InputError

# The Q/DQ placement that runs fastest on each INT8 runtime: (placement, activations, subpixel)
PLACEMENT_FOR_RUNTIME = {
    "tensorrt": ("modelopt", "s8", False),  # TensorRT's explicit-quantization rules
    "openvino": ("cpu", "s8", False),  # INT8 chains; OpenVINO runs ConvTranspose itself
    # ONNX Runtime's preset: u8 fuses the convs it runs faster in int8; ConvTranspose as sub-pixel Conv
    "onnxruntime": ("cpu", "u8", True),
}


def placement_for_runtime(runtime: str) -> tuple[str, str, bool]:
    """(placement, activations, subpixel) for the runtime that will run the INT8 model."""
    if runtime not in PLACEMENT_FOR_RUNTIME:
        raise InputError(f"No INT8 Q/DQ placement for runtime {runtime!r}; "
                         f"choose one of {sorted(PLACEMENT_FOR_RUNTIME)}.")
    return PLACEMENT_FOR_RUNTIME[runtime]
