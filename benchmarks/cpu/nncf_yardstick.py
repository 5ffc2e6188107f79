"""OpenVINO's own quantizer (NNCF) on the benchmark networks: a yardstick for the CPU Q/DQ placement.

For each NAME_<source>.onnx in ``--dir`` (default source ``fp32rw``: the FP32 graph with the same exact
rewrites as the INT8 files) it writes NAME_nncfov.xml/.bin (NNCF's OpenVINO backend: an IR with
FakeQuantize, NNCF's main path) and, with ``--onnx``, NAME_nncfrw.onnx (NNCF's ONNX backend: Q/DQ ONNX).
Calibration as ``cpu_int8_latency.py --variants`` builds the project's files: 4 random patches (latency
only), NNCF's CPU target and its default symmetric preset. Then time them beside the project's files:

    pip install nncf   # benchmark only: the product does not use it
    python benchmarks/cpu/nncf_yardstick.py --dir models
    python benchmarks/cpu/cpu_int8_latency.py --dir models --runtimes openvino --configs openvino-f32-cl openvino-bf16-cl
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def quantize(directory: Path, names: list[str], source: str, patch: int, onnx_backend: bool) -> None:
    import nncf
    import onnx
    import openvino as ov

    calibration = np.random.default_rng(0).uniform(0, 1, (4, 1, patch, patch, patch)).astype(np.float32)
    settings = {"subset_size": len(calibration), "target_device": nncf.TargetDevice.CPU,
                "preset": nncf.QuantizationPreset.PERFORMANCE}
    for name in names:
        source_path = directory / f"{name}_{source}.onnx"
        model = nncf.quantize(ov.Core().read_model(str(source_path)),
                              nncf.Dataset([c[None] for c in calibration]), **settings)
        ov.save_model(model, str(directory / f"{name}_nncfov.xml"), compress_to_fp16=False)
        print(f"made {name}_nncfov.xml", flush=True)
        if onnx_backend:
            proto = onnx.load(str(source_path))
            input_name = proto.graph.input[0].name
            quantized = nncf.quantize(proto, nncf.Dataset([{input_name: c[None]} for c in calibration]), **settings)
            onnx.save(quantized, str(directory / f"{name}_nncfrw.onnx"))
            print(f"made {name}_nncfrw.onnx", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("."))
    parser.add_argument("--models", nargs="+", default=["unet_bn", "unet_in", "segresnet"])
    parser.add_argument("--source", default="fp32rw", help="quantize NAME_<source>.onnx (default: fp32rw)")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--onnx", action="store_true", help="also NNCF's ONNX backend (NAME_nncfrw.onnx)")
    args = parser.parse_args()
    quantize(args.dir, args.models, args.source, args.patch, args.onnx)


if __name__ == "__main__":
    main()
