"""Per-layer evidence from a ``tensorrt_bench.py`` result: where the time of each plan goes, and each convolution's
time in FP16 and in INT8 side by side.

    python benchmarks/gpu/trt_layer_compare.py results/tensorrt_bench.json --network unet14 [--out layers.md]
        [--inspector DIR]  # the plans' raw inspector JSON (``<plan key with _ for spaces>.json``), re-summarized

Layers are TensorRT's fused layers (IProfiler times at batch 4, ``layer_ms_batch4``); a convolution is paired across
plans by the ONNX Conv/ConvTranspose node names inside the fused layer's name. Every number printed comes from the
JSON given.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from PTQLogic.engines.trt_layers import CONVOLUTION, REFORMAT, summarize_layers  # noqa: E402

_CONV_NODE = re.compile(r"(/[^ +\]\[]*?/(?:Conv|ConvTranspose)(?:_\d+)?)(?=$|[ +\]\[,)])")


def conv_nodes(layer_name: str) -> list[str]:
    """The ONNX convolution node names a fused TensorRT layer was made of."""
    return sorted(set(_CONV_NODE.findall(layer_name)))


def layer_kind(row: dict) -> str:
    """"convolution", "reformat" or "other" for one row of ``layers[plan]["detail"]``."""
    kind, name = str(row.get("type", "")), str(row.get("name", ""))
    if REFORMAT.search(kind) or name.startswith("Reformatting"):  # its name holds the layer it feeds
        return "reformat"
    return "convolution" if conv_nodes(name) or CONVOLUTION.search(kind) else "other"


def time_by_kind(detail: list[dict]) -> dict[str, dict[str, float]]:
    """ms at batch 4 summed by layer kind and, for convolutions, by the precision they read."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in detail:
        ms = row.get("ms_batch4")
        if ms is None:
            continue
        kind = layer_kind(row)
        out[kind][row.get("precision", "unknown") if kind == "convolution" else "all"] += ms
        out[kind]["count"] += 1
    return {k: dict(v) for k, v in out.items()}


def conv_table(plans: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """{conv node: {plan: {"ms": ..., "precision": ..., "fused_with": n}}}: a fused layer's time goes to its first
    convolution; the others it fused are counted in ``fused_with``."""
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    for plan, detail in plans.items():
        for row in detail:
            nodes = conv_nodes(row.get("name", ""))
            if layer_kind(row) != "convolution" or not nodes or row.get("ms_batch4") is None:
                continue
            table[nodes[0]][plan] = {"ms": row["ms_batch4"], "precision": row.get("precision"),
                                     "fused_with": len(nodes) - 1, "tactic": row.get("tactic", "")}
    return dict(table)


def with_inspector(result: dict, folder: Path) -> dict:
    """``result`` with each plan's layers summarized again from its raw inspector JSON in ``folder`` (precision from
    the kernel names where the JSON of the run had no formats) and the run's IProfiler times attached."""
    layers = {}
    for key, times in result.get("layer_ms_batch4", {}).items():
        path = folder / f"{key.replace(' ', '_')}.json"
        if not path.is_file():
            continue
        summary = summarize_layers(json.loads(path.read_text(), strict=False))
        for row in summary["detail"]:
            row["ms_batch4"] = times.get(row["name"])
        layers[key] = summary
    return {**result, "layers": {**result.get("layers", {}), **layers}}


def report(result: dict, network: str) -> str:
    plans = {key: (summary or {}).get("detail") or [] for key, summary in result.get("layers", {}).items()
             if key.startswith(network + " ")}
    plans = {k: v for k, v in plans.items() if any(r.get("ms_batch4") is not None for r in v)}
    if not plans:
        return f"No per-layer times for {network} in this result."
    lines = [f"## {network}: where the time goes (IProfiler, batch 4, ms per call)", "",
             "| plan | layers | convolutions (by input precision) | reformats | other | total |",
             "| --- | --- | --- | --- | --- | --- |"]
    for plan, detail in plans.items():
        kinds = time_by_kind(detail)
        conv = kinds.get("convolution", {})
        conv_text = ", ".join(f"{p} {ms:.3f}" for p, ms in sorted(conv.items()) if p != "count")
        total = sum(r["ms_batch4"] for r in detail if r.get("ms_batch4") is not None)
        lines.append(f"| {plan} | {len(detail)} | {conv_text} ({int(conv.get('count', 0))}) | "
                     f"{kinds.get('reformat', {}).get('all', 0):.3f} ({int(kinds.get('reformat', {}).get('count', 0))}) | "
                     f"{kinds.get('other', {}).get('all', 0):.3f} | {total:.3f} |")
    names = list(plans)
    lines += ["", f"## {network}: each convolution (the fused layer it leads), ms at batch 4", "",
              "| convolution | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for node, per_plan in conv_table(plans).items():
        cells = []
        for plan in names:
            cell = per_plan.get(plan)
            cells.append("-" if cell is None else f"{cell['ms']:.4f} {cell['precision']}"
                         + (f" (+{cell['fused_with']})" if cell["fused_with"] else ""))
        lines.append(f"| {node} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--network", default="unet14")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--inspector", type=Path, default=None, help="folder of the plans' raw inspector JSON")
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    if args.inspector:
        result = with_inspector(result, args.inspector)
    text = report(result, args.network)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
