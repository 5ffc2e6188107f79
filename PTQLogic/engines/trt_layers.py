"""What a TensorRT plan runs, layer by layer: the engine inspector's JSON, summarized.

Plans built with detailed profiling verbosity (the recipe's default) name each layer's type, tactic and
the format of every input and output ("... Int8 format", "... FP16 format where channel % 8 == 0").
:func:`layer_report` counts layers by the precision they compute in, so a user can see whether an INT8
plan really runs its convolutions in INT8 and how many reformatting layers it pays for.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

_PRECISIONS = (("int8", re.compile(r"\bInt8\b", re.I)), ("fp16", re.compile(r"\b(FP16|Half)\b", re.I)),
               ("fp32", re.compile(r"\b(FP32|Float)\b", re.I)))
# the kernel's own name says what it computes in ("..._i8i8_i8i32_f32_...", "..._f16f16_f16f16_f16_...")
_TACTIC_PRECISION = (("int8", re.compile(r"_i8i8_", re.I)), ("fp16", re.compile(r"_(f16f16|h884|h1688)", re.I)),
                     ("fp32", re.compile(r"_(f32f32|tf32)", re.I)))
CONVOLUTION = re.compile(r"conv|deconv", re.I)  # layer types (CaskConvolution, CaskDeconvolutionV2, ...)
REFORMAT = re.compile(r"reformat|shuffle", re.I)


def tensor_precision(description: str) -> str:
    """"int8", "fp16", "fp32" or "other" for one inspector tensor format ("Format/Datatype" or a plain type)."""
    for name, pattern in _PRECISIONS:
        if pattern.search(description or ""):
            return name
    return "other"


def tactic_precision(tactic: str) -> str | None:
    """"int8", "fp16" or "fp32" from a kernel name (TacticName), or None where the name does not say."""
    for name, pattern in _TACTIC_PRECISION:
        if pattern.search(tactic or ""):
            return name
    return None


def _formats(tensors: Any) -> list[str]:
    if not isinstance(tensors, list):
        return []
    out = []
    for tensor in tensors:
        if isinstance(tensor, dict):
            out.append(str(tensor.get("Format/Datatype") or tensor.get("Datatype") or ""))
        else:
            out.append(str(tensor))
    return out


def summarize_layers(information: dict[str, Any]) -> dict[str, Any]:
    """Counts from the inspector's engine information (``{"Layers": [...]}`` with detailed verbosity).

    A layer computes in the lowest precision among its inputs (an INT8 convolution reads INT8 and may write
    FP16 or INT8). Where the inspector gives no formats (TensorRT 8.6 writes "N/A due to dynamic shapes" for a plan
    with a batch range), the kernel's name says it (``precision_from``: "tactic"). Layers given only by name (plans
    without detailed verbosity) are counted as "unknown".
    """
    layers = information.get("Layers", []) if isinstance(information, dict) else []
    rows = []
    for layer in layers:
        if not isinstance(layer, dict):
            rows.append({"name": str(layer), "type": "unknown", "precision": "unknown"})
            continue
        inputs = [tensor_precision(f) for f in _formats(layer.get("Inputs"))]
        outputs = [tensor_precision(f) for f in _formats(layer.get("Outputs"))]
        kind = str(layer.get("LayerType") or layer.get("ParameterType") or "unknown")
        precision = next((p for p in ("int8", "fp16", "fp32") if p in inputs), outputs[0] if outputs else "other")
        tactic = str(layer.get("TacticName", ""))
        source, from_tactic = "formats", tactic_precision(tactic)
        if precision not in ("int8", "fp16", "fp32") and from_tactic:
            precision, source = from_tactic, "tactic"
        weights = layer.get("Weights")
        rows.append({"name": str(layer.get("Name", "")), "type": kind, "precision": precision,
                     "precision_from": source, "inputs": inputs, "outputs": outputs, "tactic": tactic,
                     "weights": weights.get("Type") if isinstance(weights, dict) else None})
    convolutions = [r for r in rows if CONVOLUTION.search(r["type"])
                    or r["type"] == "unknown" and CONVOLUTION.search(r["name"])]
    return {
        "layers": len(rows),
        "by_precision": dict(Counter(r["precision"] for r in rows)),
        "convolutions": len(convolutions),
        "convolutions_by_precision": dict(Counter(r["precision"] for r in convolutions)),
        "reformats": sum(bool(REFORMAT.search(r["type"])) for r in rows),
        "detail": rows,
    }


def layer_report(trt, engine) -> dict[str, Any] | None:
    """:func:`summarize_layers` of a deserialized engine; None where this TensorRT has no engine inspector. Where its
    JSON does not parse, the layers' one-line descriptions are read instead (``json_error`` says why)."""
    if not hasattr(engine, "create_engine_inspector") or not hasattr(trt, "LayerInformationFormat"):
        return None
    inspector = engine.create_engine_inspector()
    if inspector is None:
        return {"layers": None, "error": "the engine gave no inspector"}
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        information = json.loads(text, strict=False)  # layer names may hold control characters
    except (TypeError, ValueError) as exc:
        lines = [inspector.get_layer_information(i, trt.LayerInformationFormat.ONELINE)
                 for i in range(getattr(engine, "num_layers", 0))]
        report = summarize_layers({"Layers": [parse_oneline(str(line)) for line in lines]})
        report["json_error"] = f"{type(exc).__name__}: {exc}"
        return report
    return summarize_layers(information)


def parse_oneline(line: str) -> dict[str, Any]:
    """One layer of the inspector's ONELINE format ("Name: ..., LayerType: ..., Inputs: [ { ... Format/Datatype:
    ... } ], Outputs: [ ... ], ...") as the JSON format's fields :func:`summarize_layers` reads."""
    name = re.search(r"Name:\s*([^,]*)", line)
    kind = re.search(r"LayerType:\s*([^,]*)", line)
    inputs, _, outputs = line.partition("Outputs:")
    formats = re.compile(r"Format/Datatype:\s*([^}\]]*)")
    return {"Name": name.group(1).strip() if name else line[:80], "LayerType": kind.group(1).strip() if kind else "unknown",
            "Inputs": [{"Format/Datatype": f} for f in formats.findall(inputs)],
            "Outputs": [{"Format/Datatype": f} for f in formats.findall(outputs)]}
