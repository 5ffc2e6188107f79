"""Q/DQ placements: the fidelity default ("auto" = ModelOpt's) and the opt-in speed preset of each INT8 runtime
(no heavy imports: the Slicer module reads it)."""
from __future__ import annotations

from ..core.errors import InputError

# The Q/DQ placement that runs fastest on each INT8 runtime (opt-in where it is not ModelOpt's: it costs
# agreement): (placement, activations, subpixel)
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


def resolve_placement(placement: str, activations: str = "s8", subpixel: bool = False, *,
                      excludes_nodes: bool = False, nnunet: bool = False,
                      architecture: str | None = None) -> tuple[str, str, bool, str]:
    """``"auto"``: ModelOpt's placement (TensorRT's rules), the fidelity default for every runtime; the accuracy
    guard keeps layers in FP32 through it. The 'cpu' placement (``PLACEMENT_FOR_RUNTIME``) is a speed preset for
    OpenVINO and ONNX Runtime that costs agreement on trained networks, so it is opt-in (``--placement cpu``).
    Returns (placement, activations, subpixel, a line saying what auto chose and why, or "")."""
    if placement == "modelopt" and (activations != "s8" or subpixel):
        raise InputError("--activations and --subpixel belong to the 'cpu' placement; ModelOpt's places symmetric "
                         "int8 only. Drop them, or give --placement cpu.")
    if placement != "auto":
        return placement, activations, subpixel, ""
    if activations != "s8" or subpixel:
        raise InputError("--placement auto chooses --activations and --subpixel itself; drop them, or give "
                         "--placement cpu with them.")
    from ..models.networks import high_precision

    rule = high_precision(architecture) if architecture else None
    for reason, applies in (("--exclude-nodes needs it", excludes_nodes),
                            ("nnU-Net folders are quantized with it", nnunet),
                            ("this architecture keeps parts in high precision through it",
                             bool(rule and (rule.exclude_nodes or rule.exclude_op_types)))):
        if applies:
            return "modelopt", "s8", False, f"Q/DQ placement: modelopt (auto; {reason})"
    return "modelopt", "s8", False, ("Q/DQ placement: modelopt (auto: keeps FP32's answer best on trained networks; "
                                     "--placement cpu is the faster, less exact CPU preset)")
