"""nnU-Net preprocessing of a whole CT: nnunetv2's ``DefaultPreprocessor`` as its predictor runs it vs PTQLogic's
(:meth:`NnUNetRunner.preprocess`: the cubic prefilter on every core, the unused nonzero mask not resampled),
interleaved, with a bit-for-bit comparison of the arrays.

    python benchmarks/nnunet/preprocess_stage.py --model FOLDER --ct ct.nii.gz --repeats 5 --out result.json

FOLDER: any nnU-Net folder ``ptqseg segment`` takes (its plans decide spacing, normalization and resampling).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cpu"))

from cpu_int8_latency import machine  # noqa: E402


def rows(model_folder: Path, ct: Path):
    """(name, function) per row; each returns the preprocessed array."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from PTQLogic.inference.nnunet.predict import runner_for
    from PTQLogic.inference.nnunet.segment import open_nnunet_model
    from PTQLogic.io.volumes import read_volume

    model = open_nnunet_model(model_folder)
    runner, volume = runner_for(model), read_volume(ct)
    manager = PlansManager(model.plans)
    configuration = manager.get_configuration(model.configuration)
    spacing = [abs(float(s)) for s in volume.spacing[::-1]]

    def nnunetv2() -> np.ndarray:
        data, _, _ = DefaultPreprocessor(verbose=False).run_case_npy(
            volume.array[None].astype(np.float32), None, {"spacing": list(spacing)}, manager, configuration,
            model.dataset)
        return data

    def ptqseg() -> np.ndarray:
        return runner.preprocess(volume)[0]

    return {"nnunetv2": nnunetv2, "ptqseg": ptqseg}, volume.array.shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ct", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    functions, shape = rows(args.model, args.ct)
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    outputs: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        order = list(functions) if repeat % 2 == 0 else list(reversed(functions))  # alternate who runs first
        for name in order:
            started = time.perf_counter()
            outputs[name] = functions[name]()
            seconds[name].append(time.perf_counter() - started)
            print(f"repeat {repeat} {name}: {seconds[name][-1]:.2f} s", flush=True)
    a, b = outputs["nnunetv2"], outputs["ptqseg"]
    result = {
        "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": str(args.model), "ct": str(args.ct), "ct_shape_kji": list(shape), "network_grid": list(b.shape),
        "repeats": args.repeats, "seconds": seconds,
        "median_s": {k: statistics.median(v) for k, v in seconds.items()},
        "speedup": statistics.median(seconds["nnunetv2"]) / statistics.median(seconds["ptqseg"]),
        "identical": bool(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median_s", "speedup", "identical")}))


if __name__ == "__main__":
    main()
