"""FP32-vs-INT8 agreement of the same INT8 folders on this CPU and on an emulated AVX2-only CPU (issue 22).

The emulation is qemu-user (``qemu-x86_64 -cpu Haswell``): the process sees the CPUID of an AVX2 CPU without
AVX-512 or VNNI, so ONNX Runtime and OpenVINO pick the kernels such a machine runs. Folders: the shipped phantom UNet
quantized for ``vnni`` (8-bit weights) and for ``avx2`` (7-bit weights) on two calibration phantoms; the segmented
volume is a third phantom (not used for calibration). Each row runs ``pipeline.segment(..., compare=True)`` in its
own process.

    python benchmarks/fidelity/emulated_cpus.py --out benchmarks/results/<machine>/emulated_cpus.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "PTQLogic" / "samples" / "data" / "phantom_unet.json"
ROW = ("import json, sys, time; t = time.perf_counter(); from PTQLogic.pipeline import segment; "
       "o = segment(sys.argv[1], sys.argv[2], sys.argv[3], runtime=sys.argv[4], compare=True); "
       "print(json.dumps({'agreement_dice': o.agreement_dice, 'seconds': time.perf_counter() - t}))")


def run_row(folder: Path, image: Path, runtime: str, cpu: str | None, work: Path) -> dict:
    qemu = [shutil.which("qemu-x86_64"), "-cpu", cpu] if cpu else []
    done = subprocess.run(qemu + [sys.executable, "-c", ROW, str(folder), str(image), str(work / "labels.nii.gz"),
                                  runtime], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", default="Haswell", help="qemu's CPU model for the emulated row")
    args = parser.parse_args()
    if shutil.which("qemu-x86_64") is None:
        sys.exit("qemu-user is not installed (apt-get install qemu-user)")
    sys.path.insert(0, str(ROOT))
    from PTQLogic.core.sysinfo import system_info
    from PTQLogic.pipeline import quantize_model
    from PTQLogic.samples.phantom import write_phantom_set

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantoms = [image for image, _ in write_phantom_set(work / "phantoms", 3, 100)]
        for target in ("vnni", "avx2"):
            folder = quantize_model(SAMPLE, phantoms[:2], work / target, num_patches=8, target_cpu=target,
                                    guard=None).model_dir
            for runtime in ("onnxruntime", "openvino"):
                for cpu in (None, args.cpu):
                    row = {"folder_target": target, "runtime": runtime, "cpu": cpu or "this machine's",
                           **run_row(folder, phantoms[2], runtime, cpu, work)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    result = {"benchmark": "emulated_cpus (issue 22)", "machine": system_info(), "platform": platform.platform(),
              "qemu": subprocess.run(["qemu-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
              "model": str(SAMPLE.relative_to(ROOT)), "calibration": "phantoms 100, 101", "segmented": "phantom 102",
              "command": ["python"] + sys.argv, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
