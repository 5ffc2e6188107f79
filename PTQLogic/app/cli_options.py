"""The options of every ``ptqseg`` command (``cli.build_parser`` puts them together with the handlers)."""
from __future__ import annotations

import argparse

from ..quantization.interface import DEFAULT_METHOD, DEFAULT_MIN_AGREEMENT, METHODS, ON_MISS
from .cli_support import Parser, int_at_least

# Same as engines.base.RUNTIMES/PRECISIONS (a test keeps them equal); engines imports torch.
RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
PRECISION_CHOICES = (*PRECISIONS, "auto")
RUNTIME_CHOICES = ("auto", *RUNTIMES)
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")  # = torch_engine's
DEFAULT_PRECISION = "int8"
NO_GPU_NOTE = "fp16 needs an NVIDIA GPU"


def add_tensorrt_options(cmd: argparse.ArgumentParser) -> None:
    group = cmd.add_argument_group("TensorRT build (used only when a TensorRT engine is built)")
    group.add_argument("--trt-opt-level", type=int, choices=range(6), metavar="0-5", default=None,
                       help="builder optimization level (default 2: shorter builds than TensorRT's 3)")
    group.add_argument("--trt-timing-cache", default="auto", metavar="PATH|auto|off",
                       help="kernel timing cache reused by later builds (auto: the user cache folder, one per network and precision; none on TensorRT 8.x, which refused its own saved caches)")


PRECISION_HELP = (f"engine precision ({NO_GPU_NOTE}) (default: auto = {DEFAULT_PRECISION} on the CPU runtimes, "
                  "fp16 on TensorRT, where INT8 measured no faster (fp32 for a model whose InstanceNorms TensorRT "
                  "8.6.0 decomposes); fp32 with --runtime torch)")
RUNTIME_HELP = "inference runtime; auto: TensorRT on an NVIDIA GPU, else OpenVINO, else ONNX Runtime"
MODEL_FOLDER_HELP = "model folder from `ptqseg quantize`"
REFERENCE_LABELS_HELP = ("label table of the reference (JSON/CSV, e.g. TotalSegmentator's {\"1\": \"spleen\", ...}; "
                         "default: one beside the reference): pairs classes by name")


def common_options(engines: bool = True) -> Parser:
    """Options every command takes (output format, progress, debugging) and, for the commands that build engines
    (``engines``), the engine cache and OpenVINO's float precision."""
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object (also for errors) instead of text")
    common.add_argument("--progress-lines", action="store_true", help="machine-readable progress on stderr")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    if not engines:
        return common
    common.add_argument("--cache-dir", help="engine cache folder (default: $PTQSEG_CACHE_DIR or the user cache folder)")
    common.add_argument("--cpu-float", choices=["f32", "bf16"],
                        help="OpenVINO INT8 engines: precision of the layers the INT8 graph leaves in floating point "
                             "(default f32, or $PTQSEG_CPU_FLOAT); bf16 can be faster on AMX CPUs, depending on the "
                             "network (f32 where the CPU lacks bf16; check with segment --compare); FP32 engines stay f32")
    return common


def add_engine_options(cmd: argparse.ArgumentParser, precision_default: str | None = None) -> None:
    """--runtime and --precision of the commands that open one engine."""
    cmd.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    cmd.add_argument("--precision", choices=PRECISION_CHOICES, default=precision_default, help=PRECISION_HELP)


def add_quantize_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", required=True,
                   help="model spec (.json/.yaml), a model file with a spec beside it, a MONAI bundle folder "
                        "or an nnU-Net v2 results folder")
    q.add_argument("--calibration", required=True, nargs="+",
                   help="unlabeled calibration volumes (like those you will segment) and/or folders of them")
    q.add_argument("--out", required=True, help="model folder to write")
    q.add_argument("--patches", type=int_at_least(1), default=32, help="number of calibration patches")
    q.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                   help="activation range calibration: entropy (the default: kept FP32's answer as well as or "
                        "better than max on the trained networks measured, docs/fidelity.md), max (the absolute "
                        "maximum) or percentile (ranges clipped at --percentile of |x|: better than entropy on two "
                        "of three trained networks, a tie on the third)")
    q.add_argument("--percentile", type=float, help="with --method percentile: the percentile of |x| that "
                   "activation ranges are clipped at (default 99.99)")
    q.add_argument("--bias-correction", action="store_true",
                   help="empirical bias correction: shift each quantized convolution's bias so that its per-channel "
                        "output means on the calibration patches match FP32's, layer by layer (one more model run "
                        "per conv level). Opt-in: with --method percentile it raised FP32-vs-INT8 agreement beyond "
                        "the calibration-seed spread on one of three trained networks and left the others within "
                        "it, one slightly lower (benchmarks/results/fidelity/bias_correction_epyc2_avx2.md)")
    q.add_argument("--equalize", action="store_true",
                   help="nnU-Net PlainConvUNet folders: equalize channel ranges before export (each norm -> LeakyReLU "
                        "or transposed-conv channel divided by a factor its next convolutions multiply back: the "
                        "same network in FP32, ranges INT8 keeps better). Opt-in: on one trained organ part it raised "
                        "agreement with FP32 from 0.972 to 0.989 (docs/nnunet.md)")
    q.add_argument("--seed", type=int_at_least(0), default=0, help="calibration patch sampling seed")
    q.add_argument("--exclude-nodes", nargs="*", help="regexes of ONNX node names kept in high precision")
    add_placement_options(q)
    q.add_argument("--folds", nargs="+", help="nnU-Net folds to quantize (default: all present)")
    q.add_argument("--checkpoint", choices=["checkpoint_final.pth", "checkpoint_best.pth"],
                   default="checkpoint_final.pth", help="nnU-Net checkpoint of each fold")
    add_guard_options(q)


def add_placement_options(q: argparse.ArgumentParser) -> None:
    """quantize: where the Q/DQ nodes go (--placement, --activations, --subpixel)."""
    q.add_argument("--placement", choices=["auto", "modelopt", "cpu"], default=None,
                   help="Q/DQ placement: 'auto' (default: ModelOpt's, TensorRT's rules, the one that keeps FP32's "
                        "answer best on trained networks and through which the accuracy guard keeps layers in FP32), "
                        "'modelopt' (the same) or 'cpu' (opt-in speed preset: INT8 chains through activation/add/"
                        "concat/ConvTranspose for OpenVINO and ONNX Runtime; costs agreement on trained networks; "
                        "the default when --activations or --subpixel is given)")
    q.add_argument("--activations", choices=["s8", "u8"], default="s8",
                   help="activation type of the 'cpu' placement (s8 symmetric, best for OpenVINO; u8 is ONNX Runtime's "
                        "preset: every conv fuses into QLinearConv except those it runs faster in float, the "
                        "first layer on 1-3 channels and the logits conv)")
    q.add_argument("--subpixel", action="store_true",
                   help="'cpu' placement for ONNX Runtime: ConvTranspose rewritten exactly as Conv + pixel shuffle "
                        "(ONNX Runtime's 3D ConvTranspose is slow and float-only; slower on OpenVINO)")
    q.add_argument("--target-cpu", choices=["auto", "vnni", "avx2"], default="auto",
                   help="the CPU that will run the INT8 file: 'auto' (this computer, see `ptqseg info`), 'vnni' "
                        "(int8 dot-product instructions: AVX512-VNNI, AVX-VNNI or AMX; also for NVIDIA GPUs) or "
                        "'avx2' (x86 CPUs without them: convolution weights get 7 bits, since 8-bit ones saturate "
                        "their 16-bit sums and lose FP32's answer)")


def add_guard_options(q: argparse.ArgumentParser) -> None:
    """quantize: the accuracy guard, on by default (layers kept in FP32 until INT8 agrees with FP32 well enough)."""
    target = q.add_mutually_exclusive_group()
    target.add_argument("--min-agreement", type=float,
                        help=f"accuracy guard: least INT8-vs-FP32 Dice on held-out data (default "
                             f"{DEFAULT_MIN_AGREEMENT}); the most sensitive layers stay FP32 until it holds")
    target.add_argument("--max-dice-drop", type=float, help="accuracy guard: most Dice lost against the FP32 "
                        "prediction (same as --min-agreement 1-D)")
    target.add_argument("--no-guard", action="store_true",
                        help="measure and record INT8-vs-FP32 agreement but keep the INT8 model whatever it is")
    q.add_argument("--guard-runtime", choices=RUNTIME_CHOICES, default="auto",
                   help="runtime whose INT8 result the guard checks (default: the one segment would pick)")
    q.add_argument("--max-kept-layers", type=int_at_least(1), default=8, help="accuracy guard: most layers kept in FP32")
    q.add_argument("--on-miss", choices=list(ON_MISS), default="fail",
                   help="when INT8 misses the accuracy target: stop with the error (fail, the default), or, for nnU-Net "
                        "folders, write the folder without INT8 (fp32): segment then runs this model, for example one "
                        "part of a TotalSegmentator-style set, in FP32 and says why")


def add_build_options(b: argparse.ArgumentParser) -> None:
    b.add_argument("--model", required=True, help=MODEL_FOLDER_HELP)
    add_engine_options(b)
    add_tensorrt_options(b)


def add_segment_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, action="append",
                   help="model folder from `ptqseg quantize`; repeat for nnU-Net parts (TotalSegmentator) or give a parts "
                        "file; with --precision fp32 also a model spec, MONAI bundle or nnU-Net results folder as it is")
    s.add_argument("--input", required=True, help="NIfTI/NRRD/MHA file or DICOM series folder")
    s.add_argument("--output", required=True, help="label map to write (.nii.gz/.nii/.nrrd/.seg.nrrd)")
    add_engine_options(s)
    s.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="patches per network call (default: 4 for OpenVINO where their logits fit in 256 MB, else 1)")
    s.add_argument("--torch-compile", choices=TORCH_COMPILE_MODES, default=None,
                   help="--runtime torch: torch.compile the network (GPU: ~1.9x faster per window, but the first "
                        "volume pays 10-25 s of compiling; 'reduce-overhead' also uses CUDA graphs)")
    s.add_argument("--compare", action="store_true",
                   help="also run FP32 on the same runtime; report its time and the agreement Dice")
    s.add_argument("--reference", help="reference label map for Dice")
    s.add_argument("--mirroring", action="store_true", help="nnU-Net models: test-time mirroring (slower)")
    s.add_argument("--step-size", type=float, help="nnU-Net models: sliding-window step (default 0.5)")
    s.add_argument("--fp32-windows", type=float, default=None, metavar="SHARE",
                   help="nnU-Net INT8 on the CPU: run again in FP32 the windows where INT8 is least sure (more than "
                        "1%% of voxels with their two top logits within 1.0), at most SHARE of each part's windows, "
                        "e.g. 0.25; slower by up to SHARE x (FP32 + INT8) window time; with --cpu-float bf16 the "
                        "FP32 graph's float layers run in bf16 (default: off)")
    add_pairing_options(s)
    add_tensorrt_options(s)


def add_segment_batch_options(sb: argparse.ArgumentParser) -> None:
    sb.add_argument("--model", required=True, help=MODEL_FOLDER_HELP)
    sb.add_argument("--inputs", required=True, nargs="+", help="folder(s), list file(s) (.txt) and/or volume files")
    sb.add_argument("--output-dir", required=True, help="folder for the label maps and manifest.jsonl")
    sb.add_argument("--ray-address", help="existing Ray cluster ('auto' or HOST:PORT); default: start a local one")
    sb.add_argument("--workers", type=int_at_least(1), default=2, help="worker actors, one engine each")
    sb.add_argument("--threads-per-worker", type=int_at_least(1), default=1, help="CPU threads per worker")
    sb.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker, e.g. 1 or 0.5")
    sb.add_argument("--no-pin-cpus", action="store_true",
                    help="local cluster: let workers share all CPUs (default: each gets its own --threads-per-worker CPUs)")
    add_engine_options(sb)
    sb.add_argument("--torch-compile", choices=TORCH_COMPILE_MODES, default=None,
                    help="--runtime torch: compile each worker's network once (10-25 s), faster for every volume after")


def add_evaluate_options(e: argparse.ArgumentParser) -> None:
    e.add_argument("--prediction", required=True, help="label map to score")
    e.add_argument("--reference", required=True, help="reference (ground-truth) label map")
    e.add_argument("--labels", type=int, nargs="*",
                   help="prediction label values (default: its label table, else all present)")
    e.add_argument("--label-map", help="prediction=reference label pairs, e.g. 1=5,2=1, or a JSON file/object")
    e.add_argument("--reference-labels", help=REFERENCE_LABELS_HELP)


def add_pairing_options(cmd: argparse.ArgumentParser) -> None:
    """segment and benchmark: how the model's classes pair with --reference's labels (as in evaluate)."""
    cmd.add_argument("--label-map", help="model class=reference label pairs for Dice, e.g. 1=5,2=1, or a JSON "
                                         "file/object (default: by name, else value)")
    cmd.add_argument("--reference-labels", help=REFERENCE_LABELS_HELP)


def add_benchmark_options(m: argparse.ArgumentParser) -> None:
    m.add_argument("--model", required=True, help=MODEL_FOLDER_HELP)
    m.add_argument("--input", required=True, help="volume to segment")
    m.add_argument("--reference", help="reference label map for Dice")
    add_pairing_options(m)
    m.add_argument("--out", required=True, help="folder for the Markdown/CSV/JSON tables and the plot")
    m.add_argument("--runtimes", nargs="+", default=["auto"], choices=RUNTIME_CHOICES, help="runtimes to compare")
    m.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=PRECISIONS,
                   help=f"precisions to compare ({NO_GPU_NOTE}; combinations a runtime cannot run are skipped)")
    m.add_argument("--repeats", type=int_at_least(1), default=20, help="timed repetitions per engine (FP32 and INT8 interleaved)")
    m.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed calls per engine first")
    m.add_argument("--batch-size", type=int_at_least(1), default=1, help="patches per network call")
    add_tensorrt_options(m)


def add_demo_options(d: argparse.ArgumentParser) -> None:
    d.add_argument("--out", default=None,
                   help="working folder (default: 'demo' in the user cache folder, replaced on each run; printed at the end)")
    d.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    d.add_argument("--model", default="unet", choices=["unet", "segresnet"], help="shipped sample network")
    d.add_argument("--train", action="store_true", help="train the sample network instead of loading shipped weights")
