"""GPU check of the PyTorch engine path: TorchEngine FP32/FP16 on CUDA through whole-volume inference.

Run on a CUDA machine: ``python benchmarks/gpu/gpu_smoke.py PHANTOM.npz`` where the npz holds ``image``,
``labels`` and ``ijk_to_ras`` (written by ``python benchmarks/gpu/gpu_smoke.py --make PHANTOM.npz``, so the
GPU machine needs no scipy). Prints one JSON object: latency, volume time, Dice vs truth, agreement
with CPU FP32, peak GPU memory, and what the runtime chooser says on that machine.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

from PTQLogic.core.volume import Volume

ROOT_SPEC = "PTQLogic/samples/data/phantom_unet.json"


def make(path: str) -> None:
    from PTQLogic.samples.phantom import make_phantom

    image, labels = make_phantom(1000, shape=(96, 96, 96))
    np.savez_compressed(path, image=image.array, labels=labels.array, ijk_to_ras=image.ijk_to_ras)


def run(path: str) -> dict:
    from PTQLogic.engines import available_runtimes, choose_runtime
    from PTQLogic.engines.torch_engine import TorchEngine
    from PTQLogic.evaluation.metrics import agreement_dice, dice_per_class, peak_memory_bytes
    from latency_support import measure_latency  # next to this script
    from PTQLogic.inference.segmenter import segment_volume
    from PTQLogic.models.torch_models import load_torch_model
    from PTQLogic.core.spec import load_spec

    data = np.load(path)
    volume = Volume(data["image"], data["ijk_to_ras"])
    spec = load_spec(ROOT_SPEC)
    classes = range(1, spec.num_classes)
    model = load_torch_model(spec)
    cpu = segment_volume(volume, spec, TorchEngine(model, "fp32", device="cpu"), batch_size=4)
    out = {"gpu": torch.cuda.get_device_name(0), "runtimes": available_runtimes(),
           "auto_int8": choose_runtime("int8"), "auto_fp16": choose_runtime("fp16"), "engines": {}}
    for precision in ("fp32", "fp16"):
        engine = TorchEngine(model, precision, device="cuda")
        latency = measure_latency(engine, (4, 1, *spec.patch_size), warmup=5, repeats=20)
        segment_volume(volume, spec, engine, batch_size=4)  # warm-up of the whole path
        result = segment_volume(volume, spec, engine, batch_size=4)
        out["engines"][precision] = {
            "device": engine.info.device,
            "latency_ms_batch4": latency.median_ms,
            "volume_s": result.seconds,
            "network_s": result.network_seconds,
            "dice": dice_per_class(result.labels.array, data["labels"], classes).mean,
            "agreement_vs_cpu_fp32": agreement_dice(result.labels.array, cpu.labels.array, classes),
            "on_input_grid": result.labels.array.shape == volume.array.shape,
            "peak": peak_memory_bytes(),
        }
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--make":
        make(sys.argv[2])
    else:
        print(json.dumps(run(sys.argv[1]), indent=1, default=str))
