"""Cohort scaling on one machine: volumes per second of `segment-batch` (Ray) for N workers x T threads.

Runs the real code path, :func:`PTQLogic.cohort.run_cohort`, on a local Ray cluster started once, over
phantom CT volumes written as NIfTI (``--unique`` distinct phantoms copied to ``--volumes`` files), with
an OpenVINO INT8 model folder. Every configuration runs ``--rounds`` times, interleaved (the order is
reversed every other round so drift hits all alike), after one untimed warm-up cohort. Worker start-up
(actor start + engine compile) is reported apart from the volumes' phase; throughput is volumes done over
the time from the first volume handed out to the last one written (the driver reads, hashes and writes
every file, as in production). ``--unpinned`` configurations also run with ``pin_cpus=False`` (every
worker free to use every CPU) to show what the per-worker CPU sets are worth.

    # once, where ModelOpt is installed: the shipped sample UNet as an INT8 model folder
    python benchmarks/cohort/ray_scaling.py --quantize-to /tmp/unet-int8
    python benchmarks/cohort/ray_scaling.py --model /tmp/unet-int8 --out benchmarks/results/ray_scaling
    # small machines: python benchmarks/cohort/ray_scaling.py --model M --configs 1x1 2x1 --volumes 8 --shape 64 64 64
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SAMPLE_UNET = ROOT / "PTQLogic" / "samples" / "data" / "phantom_unet.json"
SPACING = (1.5, 1.5, 1.5)


def quantize_sample(out_dir: Path) -> Path:
    """The shipped sample UNet quantized to INT8 on two calibration phantoms (needs ModelOpt)."""
    from PTQLogic.samples.phantom import write_phantom_set
    from PTQLogic.pipeline import quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        calibration = [image for image, _ in write_phantom_set(Path(tmp), 2, 100, spacing=SPACING)]
        quantize_model(SAMPLE_UNET, calibration, out_dir, num_patches=16, placement="modelopt")  # as measured
    return out_dir


def make_inputs(folder: Path, volumes: int, unique: int, shape: list[int]) -> list[Path]:
    """``volumes`` NIfTI phantoms named case_XXX.nii.gz, ``unique`` distinct ones repeated."""
    from PTQLogic.samples.phantom import write_phantom_set

    pairs = write_phantom_set(folder / "distinct", min(unique, volumes), 700, shape=shape, spacing=SPACING)
    cohort = folder / "cohort"
    cohort.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(volumes):
        paths.append(cohort / f"case_{index:03d}.nii.gz")
        shutil.copy(pairs[index % len(pairs)][0], paths[-1])
    return paths


def machine() -> dict[str, Any]:
    from PTQLogic.core.sysinfo import system_info

    info = system_info()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=20).stdout
        keep = ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "NUMA node(s)",
                "L2 cache", "L3 cache", "CPU max MHz", "Hypervisor vendor")
        info["lscpu"] = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())
                         if k.strip() in keep}
    except (OSError, subprocess.SubprocessError):
        info["lscpu"] = None
    info["versions"]["ray"] = __import__("ray").__version__
    return info


def _engine_worker(onnx: str, patch: list[int], threads: int, cpus: list[int] | None, pinning: bool | None,
                   start_at: float, seconds: float, queue) -> None:
    """One process: OpenVINO INT8 with the engine's settings, windows per second from ``start_at`` on."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(onnx)
    model.reshape({model.inputs[0]: ov.PartialShape([1, 1, *patch])})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    if pinning is not None:
        config["ENABLE_CPU_PINNING"] = pinning
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    window = np.random.default_rng(0).random((1, 1, *patch), dtype=np.float32)
    for _ in range(5):
        request.infer({0: window})
    while time.time() < start_at:
        time.sleep(0.01)
    count = 0
    while time.time() < start_at + seconds:
        request.infer({0: window})
        count += 1
    masks = set()
    for status in Path(f"/proc/{os.getpid()}/task").glob("*/status"):
        masks.update(line.split()[1] for line in status.read_text().splitlines() if line.startswith("Cpus_allowed_list"))
    queue.put({"rate": count / seconds, "affinities": sorted(masks), "pin": str(compiled.get_property("ENABLE_CPU_PINNING")),
               "threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))})


def engine_only(model: Path, configs: list[tuple[int, int]], seconds: float = 5.0) -> dict[str, Any]:
    """The engine alone, no Ray and no volumes: P processes x T threads of OpenVINO INT8 on one window size.

    Modes: OpenVINO's default (it pins threads to cores it picks, unaware of other processes), each
    process on CPUs of its own (what segment-batch's local workers do), and pinning off.
    """
    import multiprocessing

    from PTQLogic.models.model_folder import open_model_dir

    spec = open_model_dir(model).spec()
    context = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {}
    for mode in ("default", "own_cpus", "no_pinning"):
        for procs, threads in configs:
            queue = context.Queue()
            start_at = time.time() + 6  # after every process compiled its model
            workers = [context.Process(target=_engine_worker, args=(
                str(model / "int8.onnx"), list(spec.patch_size), threads,
                list(range(i * threads, (i + 1) * threads)) if mode == "own_cpus" else None,
                False if mode == "no_pinning" else None, start_at, seconds, queue)) for i in range(procs)]
            for worker in workers:
                worker.start()
            out = [queue.get(timeout=120) for _ in workers]
            for worker in workers:
                worker.join()
            results[f"{mode}_{procs}"] = {
                "total_windows_per_s": round(sum(o["rate"] for o in out), 1),
                "per_process": [round(o["rate"], 1) for o in out],
                "affinities": [o["affinities"] for o in out][:3], "pin": out[0]["pin"], "threads": out[0]["threads"]}
            print(mode, procs, json.dumps(results[f"{mode}_{procs}"]), flush=True)
    return results


def parse_config(text: str) -> tuple[int, int]:
    workers, _, threads = text.lower().partition("x")
    try:
        return int(workers), int(threads)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not WORKERSxTHREADS, e.g. 8x2") from None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_once(model: Path, inputs: list[Path], out: Path, workers: int, threads: int, pin: bool,
             runtime: str, precision: str) -> dict[str, Any]:
    from PTQLogic.cohort import run_cohort
    from PTQLogic.core.progress import Monitor

    shutil.rmtree(out, ignore_errors=True)
    marks: list[tuple[float, int]] = []  # (time, volumes finished) of the volumes stage

    def record(stage: str, done: int, total: int) -> None:
        if stage == "volumes":
            marks.append((time.perf_counter(), done))

    started = time.perf_counter()
    summary = run_cohort(model, inputs, out, workers=workers, threads_per_worker=threads, runtime=runtime,
                         precision=precision, pin_cpus=pin, monitor=Monitor(on_progress=record))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    if summary.failed or summary.done != len(inputs):
        raise RuntimeError(f"{summary.failed} failed of {summary.total}: {summary.errors}")
    first, last = marks[0][0], marks[-1][0]
    done_at = [t for t, d in marks if d > 0]
    # steady state: after each worker's first volume (its first inferences warm the engine's caches)
    warm = done_at[workers - 1] if len(done_at) > workers else first
    timings = {key: statistics.median(r["timings"][key] for r in rows) for key in rows[0]["timings"]}
    return {
        "workers": workers, "threads": threads, "pinned": pin,
        "startup_seconds": summary.startup_seconds,
        "volumes_seconds": last - first,
        "total_seconds": time.perf_counter() - started,
        "volumes_per_second": len(inputs) / (last - first),
        "steady_volumes_per_second": (len(inputs) - workers) / (last - warm) if last > warm else None,
        "median_volume_timings": timings,
        "worker_cpus": sorted({r.get("cpus", "?") for r in rows}),
        "worker_threads": sorted({r.get("threads", 0) for r in rows}),
        "runtime": rows[0]["runtime"], "precision": rows[0]["precision"],
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["pinned"], run["workers"], run["threads"]), []).append(run)
    table = []
    for (pinned, workers, threads), items in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        vps = [r["volumes_per_second"] for r in items]
        steady = [r["steady_volumes_per_second"] for r in items if r["steady_volumes_per_second"]]
        table.append({"config": f"{workers}x{threads}", "pinned": pinned, "runs": len(items),
                      "volumes_per_second": statistics.median(vps), "min": min(vps), "max": max(vps),
                      "steady_volumes_per_second": statistics.median(steady) if steady else None,
                      "startup_seconds": statistics.median(r["startup_seconds"] for r in items),
                      "median_segment_seconds": statistics.median(r["median_volume_timings"]["segment"] for r in items),
                      "median_network_seconds": statistics.median(r["median_volume_timings"]["network"] for r in items)})
    base = table[0]  # the first configuration, pinned
    for row in table:
        row["speedup"] = row["volumes_per_second"] / base["volumes_per_second"]
        row["speedup_min_max"] = [row["min"] / base["max"], row["max"] / base["min"]]
    return table


def markdown(result: dict[str, Any]) -> str:
    info, settings = result["machine"], result["settings"]
    cpu, lscpu = info["cpu"], info.get("lscpu") or {}
    lines = [
        "# Ray cohort scaling (`ptqseg segment-batch`, OpenVINO INT8)", "",
        f"Machine: {cpu['model']}, {cpu['usable_cores']} usable logical CPUs"
        + (f" ({lscpu.get('Thread(s) per core')} thread(s) per core, {lscpu.get('Core(s) per socket')} core(s) per "
           f"socket, {lscpu.get('Socket(s)')} socket(s))" if lscpu else "")
        + f"; {info['platform']}; Python {info['versions']['python']}, torch {info['versions']['torch']}, "
          f"OpenVINO {info['versions']['openvino']}, Ray {info['versions']['ray']}, MONAI {info['versions']['monai']}.",
        f"Cohort: {settings['volumes']} phantom CT volumes of {'x'.join(map(str, settings['shape']))} voxels at 1.5 mm "
        f"(NIfTI, {settings['unique']} distinct), model `{settings['model_name']}` (patch "
        f"{'x'.join(map(str, settings['patch_size']))}), {settings['rounds']} interleaved round(s) planned after a warm-up "
        f"cohort; rounds completed per row in `runs` (a row of one run has no spread).",
        "Throughput: volumes over the time from the first volume handed out to the last label map written "
        "(worker start-up and engine compile excluded, shown apart); median of the rounds, [min, max]. "
        "Steady: after each worker's first volume. Pinned: each worker on its own CPUs (the default on a local "
        "cluster); unpinned: `--no-pin-cpus`.", "",
        "| workers x threads | CPUs | runs | volumes/s [min, max] | speedup vs first row [range] | steady volumes/s "
        "| start-up s | segment s/volume | network s/volume |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["summary"]:
        spread = row["speedup_min_max"]
        lines.append(
            f"| {row['config']} | {'pinned' if row['pinned'] else 'unpinned'} | {row['runs']} | {row['volumes_per_second']:.2f} "
            f"[{row['min']:.2f}, {row['max']:.2f}] | {row['speedup']:.2f}x [{spread[0]:.2f}, {spread[1]:.2f}] | "
            f"{row['steady_volumes_per_second'] or float('nan'):.2f} | {row['startup_seconds']:.1f} | "
            f"{row['median_segment_seconds']:.2f} | {row['median_network_seconds']:.2f} |")
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    lines += [f"- {note}" for note in result.get("notes", [])] + ([""] if result.get("notes") else [])
    engine = result.get("engine_only")
    if engine:
        lines += ["## OpenVINO alone (no Ray, no volumes): why workers get CPUs of their own", "",
                  "Processes x threads of the same INT8 model on one window, windows per second summed over processes "
                  "(`--engine-only`, same machine, same session):", "",
                  "| mode | " + " | ".join(k.rsplit("_", 1)[1] + " process(es)" for k in engine if k.startswith("default_"))
                  + " | speedup |", "| --- " * (2 + sum(k.startswith("default_") for k in engine)) + "|"]
        for mode in ("default", "own_cpus", "no_pinning"):
            rates = [v["total_windows_per_s"] for k, v in engine.items() if k.rsplit("_", 1)[0] == mode]
            lines.append(f"| {mode} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {rates[-1] / rates[0]:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="OpenVINO-ready INT8 model folder (from `ptqseg quantize`)")
    parser.add_argument("--quantize-to", type=Path, help="quantize the sample UNet into this folder and exit")
    parser.add_argument("--engine-only", action="store_true",
                        help="measure OpenVINO alone (processes x threads of --configs, no Ray) into PREFIX_engine_only.json")
    parser.add_argument("--configs", type=parse_config, nargs="+", default=[(1, 2), (2, 2), (4, 2), (8, 2)],
                        help="WORKERSxTHREADS; the first is the speedup baseline (default 1x2 2x2 4x2 8x2)")
    parser.add_argument("--unpinned", type=parse_config, nargs="*", default=[(1, 2), (8, 2)],
                        help="configurations also run with pin_cpus=False (default 1x2 8x2)")
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--unique", type=int, default=8, help="distinct phantoms among the volumes")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 160, 160], help="phantom K J I voxels (1.5 mm)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", default="openvino")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds; start no further run after this (what finished is still written)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ray_scaling",
                        help="output prefix: writes PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)
    if args.quantize_to:
        print(f"quantized: {quantize_sample(args.quantize_to)}")
        return 0
    if args.model is None:
        parser.error("--model is required (make one with --quantize-to DIR where ModelOpt is installed)")
    if args.engine_only:
        result = engine_only(args.model, args.configs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}_engine_only.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0

    from PTQLogic.cohort.cluster import connect
    from PTQLogic.models.model_folder import open_model_dir

    import ray

    began = time.perf_counter()
    spec = open_model_dir(args.model).spec()
    about = machine()
    work = args.work or Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    inputs = make_inputs(work, args.volumes, args.unique, args.shape)
    print(f"{len(inputs)} volumes written in {time.perf_counter() - began:.1f} s", flush=True)
    cpus = max(w * t for w, t in args.configs + args.unpinned)
    connect(None, cpus=cpus, gpus=0)  # one local cluster for every run (run_cohort reuses it)
    plan = [(w, t, True) for w, t in args.configs] + [(w, t, False) for w, t in args.unpinned]
    runs: list[dict[str, Any]] = []
    try:
        run_once(args.model, inputs[: max(2, args.configs[0][0])], work / "out", args.configs[0][0], args.configs[0][1],
                 True, args.runtime, args.precision)  # warm-up: file cache, imports, OpenVINO's first compile
        for round_index in range(args.rounds):
            for workers, threads, pin in (plan if round_index % 2 == 0 else plan[::-1]):
                if time.perf_counter() - began > args.time_budget:
                    print("time budget reached; writing what finished", flush=True)
                    break
                run = run_once(args.model, inputs, work / "out", workers, threads, pin, args.runtime, args.precision)
                run["round"] = round_index
                runs.append(run)
                print(f"round {round_index} {workers}x{threads} {'pinned' if pin else 'unpinned'}: "
                      f"{run['volumes_per_second']:.2f} volumes/s (steady {run['steady_volumes_per_second'] or 0:.2f}), "
                      f"start-up {run['startup_seconds']:.1f} s, segment {run['median_volume_timings']['segment']:.2f} s"
                      f"/volume, CPUs {run['worker_cpus'][:8]}", flush=True)
                write(args, spec, about, runs, argv)  # after every run: a run cut short keeps what finished
    finally:
        ray.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(write(args, spec, about, runs, argv)))
    return 0


def write(args: argparse.Namespace, spec, about: dict[str, Any], runs: list[dict[str, Any]],
          argv: list[str] | None) -> dict[str, Any]:
    result = {
        "command": "python benchmarks/cohort/ray_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": about,
        "settings": {"volumes": args.volumes, "unique": args.unique, "shape": args.shape, "rounds": args.rounds,
                     "runtime": args.runtime, "precision": args.precision, "model_name": spec.name,
                     "patch_size": list(spec.patch_size), "configs": [f"{w}x{t}" for w, t in args.configs],
                     "unpinned": [f"{w}x{t}" for w, t in args.unpinned]},
        "summary": summarize(runs) if runs else [],
        "runs": runs,
    }
    engine = Path(f"{args.out}_engine_only.json")
    if engine.is_file():  # from a --engine-only run before
        result["engine_only"] = json.loads(engine.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    Path(f"{args.out}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
