"""Where ONNX Runtime's CPU time goes per op type, for FP32 and INT8 ONNX files (its own profiler).

    python benchmarks/cpu/ort_profile.py models/unet_bn_fp32sub.onnx models/unet_bn_u8sub.onnx [--nodes 12] [--out table.md]

Runs each file on a random 96^3 patch (2 warm-up runs, then ``--runs`` timed runs; intra-op spinning off as
in cpu_int8_latency.py) and prints the median wall time of the timed runs and the kernel time per op type,
averaged over all runs (ONNX Runtime's profiler also records the warm-ups); ``--nodes N`` adds the N most
expensive nodes with their output type and shape.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile(path: Path, runs: int, patch: int, threads: int | None = None) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path("/tmp") / f"ort_profile_{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 1, patch, patch, patch)).astype(np.float32)
    walls = []
    for i in range(runs + 2):
        start = time.perf_counter()
        session.run(None, {name: x})
        if i >= 2:
            walls.append((time.perf_counter() - start) * 1e3)
    trace = Path(session.end_profiling())
    by_op: dict = defaultdict(float)
    nodes: dict = defaultdict(set)
    by_node: dict = defaultdict(float)
    node_info: dict = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            by_op[op] += event["dur"] / 1e3 / (runs + 2)
            nodes[op].add(event["name"])
            node = event["name"][:-len("_kernel_time")]
            by_node[node] += event["dur"] / 1e3 / (runs + 2)
            node_info[node] = (op, json.dumps(event["args"].get("output_type_shape", "")))
    trace.unlink(missing_ok=True)
    return {"file": path.name, "median_ms": float(np.median(walls)),
            "ops": {op: {"ms": round(ms, 2), "nodes": len(nodes[op])}
                    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "nodes": [{"node": n, "op": node_info[n][0], "output": node_info[n][1], "ms": round(ms, 2)}
                      for n, ms in sorted(by_node.items(), key=lambda kv: -kv[1])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's, one per core)")
    parser.add_argument("--nodes", type=int, default=0, help="also list the N most expensive nodes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = []
    for path in args.files:
        result = profile(path, args.runs, args.patch, args.threads)
        lines += [f"**{result['file']}**: {result['median_ms']:.1f} ms per call (median of {args.runs})", "",
                  "| op type | nodes | ms per call |", "|---|---|---|"]
        lines += [f"| {op} | {row['nodes']} | {row['ms']:.1f} |" for op, row in result["ops"].items()] + [""]
        if args.nodes:
            lines += ["| node | op type | output | ms per call |", "|---|---|---|---|"]
            lines += [f"| {row['node'][-60:]} | {row['op']} | {row['output']} | {row['ms']:.1f} |"
                      for row in result["nodes"][:args.nodes]] + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
