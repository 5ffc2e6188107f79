"""Which Q/DQ placement each INT8 runtime runs fastest (no heavy imports: the Slicer module reads it)."""
from __future__ import annotations

from ..core.errors import InputError

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


def resolve_placement(placement: str, activations: str = "s8", subpixel: bool = False, *, guarded: bool = False,
                      excludes_nodes: bool = False, nnunet: bool = False,
                      architecture: str | None = None) -> tuple[str, str, bool, str]:
    """``"auto"``: the placement for the runtime ``segment --runtime auto`` picks for INT8 on this computer, or
    ModelOpt's where the accuracy guard, node exclusions, an nnU-Net folder or the architecture's own
    high-precision rules (attention MatMuls, ``networks.HIGH_PRECISION``) need it. Other placements pass
    through. Returns (placement, activations, subpixel, a line saying what auto chose and why, or "")."""
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
    architecture_rules = bool(rule and (rule.exclude_nodes or rule.exclude_op_types))
    for reason, applies in (("the accuracy guard keeps layers through it", guarded),
                            ("--exclude-nodes needs it", excludes_nodes),
                            ("nnU-Net folders are quantized with it", nnunet),
                            ("this architecture keeps parts in high precision through it", architecture_rules)):
        if applies:
            return "modelopt", "s8", False, f"Q/DQ placement: modelopt (auto; {reason})"
    from ..engines import choose_runtime
    from ..core.errors import EngineUnavailable

    try:
        runtime, _ = choose_runtime("int8")
    except EngineUnavailable:
        runtime = "tensorrt"
    placement, activations, subpixel = placement_for_runtime(runtime)
    flags = placement + (" --activations u8 --subpixel" if subpixel else "")
    return placement, activations, subpixel, f"Q/DQ placement: {flags} (auto: INT8 runs on {runtime} here)"
