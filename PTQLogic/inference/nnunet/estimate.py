"""What an nnU-Net run (one model or TotalSegmentator-style parts) will cost, said before the long work.

Per part: the engine calls nnunetv2's sliding window will make (its tiling of the preprocessed grid, times
mirrorings and folds), the peak memory (:mod:`.memory`), and the expected network time where a speed was
measured on this computer: the accuracy guard's INT8 latency per held-out patch (``quantization.json``) when it
ran on the same runtime, CPU model and INT8 instruction set (or GPU) with the same patch size, else one window
timed on the part's engine once it is open (its speed is then used for the parts with the same network).
Preprocessing and export are not timed: the seconds are the network's.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ...core.volume import Volume
from ...models.nnunet.model_dir import NnUNetModel
from .engines import quantization_report
from .memory import network_grid, peak_bytes_per_part


@dataclass
class PartEstimate:
    name: str
    windows: int  # engine calls: sliding-window positions x mirrorings x folds
    peak_bytes: int  # peak memory while this part runs
    network: str  # parts with the same network (architecture, patch, channels) run at the same speed
    seconds_per_window: float | None = None
    speed_source: str = ""  # where seconds_per_window was measured

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_window is None else self.windows * self.seconds_per_window


@dataclass
class RunEstimate:
    parts: list[PartEstimate]
    preprocessings: int  # the volume is preprocessed once per distinct preprocessing, shared by the parts
    compare: bool = False  # --compare runs FP32 afterwards (not in the seconds)
    fp32_windows: int = 0  # --fp32-windows: at most this many windows run again, in INT8 and FP32 (not in the seconds)
    shown: bool = field(default=False, repr=False)  # reported to the monitor already

    @property
    def windows(self) -> int:
        return sum(p.windows for p in self.parts)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.parts)

    @property
    def seconds(self) -> float | None:
        """Expected network seconds of all parts; None while a part's speed is unknown."""
        known = [p.seconds for p in self.parts]
        return None if any(s is None for s in known) else float(sum(known))

    def text(self) -> str:
        """One line, e.g. ``Expected: 5 parts, 320 windows, network ~95 s, peak ~6.1 GiB (speed: ...)``."""
        count = len(self.parts)
        what = f"{count} part{'s' if count > 1 else ''}, " if count > 1 else ""
        shared = (f", {self.preprocessings} preprocessing{'s' if self.preprocessings > 1 else ''} for {count} parts"
                  if self.preprocessings < count else "")
        unknown = [p.name for p in self.parts if p.seconds is None]
        if unknown:
            known = sum(p.seconds for p in self.parts if p.seconds is not None)
            timing = (f"network ~{_seconds(known)} + {', '.join(unknown)} (timed when it starts)"
                      if len(unknown) < count else "network time measured once the engines are ready")
        else:
            timing = f"network ~{_seconds(self.seconds)}"
        sources = sorted({p.speed_source for p in self.parts if p.speed_source})
        speed = f" (speed {'; '.join(sources)})" if sources else ""
        extra = "; --compare then runs FP32 too" if self.compare else ""
        if self.fp32_windows:
            extra += f"; up to {self.fp32_windows} unsure windows again in INT8 and FP32 (--fp32-windows)"
        return (f"Expected: {what}{self.windows} windows, {timing}, peak ~{self.peak_bytes / 2**30:.1f} GiB"
                f"{shared}{speed}{extra}")

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text(), "windows": self.windows, "seconds": self.seconds, "peak_bytes": self.peak_bytes,
                "preprocessings": self.preprocessings, "fp32_windows": self.fp32_windows,
                "parts": [{"name": p.name, "windows": p.windows, "peak_bytes": p.peak_bytes, "seconds": p.seconds,
                           "seconds_per_window": p.seconds_per_window, "speed_source": p.speed_source}
                          for p in self.parts]}


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def part_name(model: NnUNetModel) -> str:
    """A short name for progress: TotalSegmentator's ``..._part2_vertebrae_...`` -> ``vertebrae``, else the folder."""
    folder = model.root.parent if model.root.name.startswith("nnUNetTrainer") else model.root
    for text in (folder.name, model.spec.name):
        found = re.search(r"_part\d+_([A-Za-z]+)", text)
        if found:
            return found.group(1)
    return folder.name


def cropped_shape(volume: Volume) -> tuple[int, int, int]:
    """(K, J, I) shape of the region nnU-Net crops to: the bounding box of voxels nonzero in any channel."""
    array = volume.array
    nonzero = array != 0 if array.ndim == 3 else np.any(array != 0, axis=0)
    shape = []
    for axis in range(3):
        hits = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        shape.append(int(hits[-1] - hits[0] + 1) if hits.size else nonzero.shape[axis])
    return tuple(shape)


def window_count(runner, grid: Sequence[int], mirroring: bool) -> int:
    """Network calls of nnunetv2's sliding window on a preprocessed ``grid`` (one fold), as it tiles it."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = list(runner.config.patch_size)
    lead = len(grid) - len(patch)  # 2D configurations: every slice of the first axis
    padded = [max(int(g), p) for g, p in zip(grid[lead:], patch)]  # padded to one patch, as it does
    steps = compute_steps_for_sliding_window(padded, patch, runner.step_size)
    positions = int(np.prod(grid[:lead], dtype=np.int64)) * int(np.prod([len(s) for s in steps], dtype=np.int64))
    axes = len(runner.mirror_axes) if (mirroring and runner.mirror_axes) else 0
    return positions * 2 ** axes


def _where(runtime: str) -> tuple[str, str]:
    """(INT8 instruction set, device) as the accuracy guard records them."""
    from ...core.sysinfo import cpu_int8_target, cpu_model

    if runtime == "tensorrt":
        import torch

        return "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"
    return cpu_int8_target(), cpu_model()


def guard_speed(model: NnUNetModel, runner, runtime: str, precision: str) -> tuple[float, str] | None:
    """(seconds per window, where measured) from the accuracy guard of every fold, where it ran as this run will."""
    if not model.quantized or precision != "int8":
        return None
    if runtime == "openvino" and os.environ.get("PTQSEG_CPU_FLOAT", "f32") != "f32":
        return None  # the guard timed the f32 remainder
    if tuple(model.spec.patch_size) != tuple(runner.config.patch_size):
        return None
    report = quantization_report(model)
    if not report or report.get("int8_fallback"):  # runs in FP32 (quantize --on-miss fp32): the guard timed INT8
        return None
    isa, device = _where(runtime)
    latencies = []
    for fold in model.folds:
        guard = ((report.get("folds") or {}).get(str(fold)) or {}).get("guard") or {}
        if (guard.get("runtime"), guard.get("isa"), guard.get("device")) != (runtime, isa, device):
            return None
        latency = guard.get("int8_latency_ms") or ((guard.get("steps") or [{}])[-1]).get("int8_latency_ms")
        if not latency:
            return None
        latencies.append(float(latency) / 1000.0)
    return float(np.mean(latencies)), f"from the accuracy guard's INT8 run on {runtime}, {device}"


def _runtime_of(model: NnUNetModel, runtime: str, precision: str) -> str:
    """The runtime :func:`.engines.open_engines` will use for ``model``."""
    if not model.quantized:
        return "torch"
    if runtime != "auto":
        return runtime
    from ...engines import choose_runtime

    return choose_runtime(precision)[0]


def _network(model: NnUNetModel, runner) -> str:
    return json.dumps([model.architecture(), list(runner.config.patch_size), runner.in_channels], sort_keys=True,
                      default=str)


def estimate_run(models: Sequence[NnUNetModel], runners: Sequence, volume: Volume, runtime: str, precision: str,
                 mirroring: bool, compare: bool = False, overlap: bool = False,
                 fp32_windows: bool = False) -> RunEstimate:
    """Windows, memory and (where the accuracy guard measured it here) speed of each part; no engine is built.
    ``overlap``: each part's export runs beside the next part's sliding window (its memory counts there);
    ``fp32_windows``: ``segment --fp32-windows`` (the FP32 engine's memory counts)."""
    cropped = cropped_shape(volume)
    peaks = peak_bytes_per_part(runners, volume, [len(m.folds) for m in models], overlap, fp32_windows)
    parts = []
    for model, runner, peak in zip(models, runners, peaks):
        windows = window_count(runner, network_grid(runner, volume, cropped), mirroring) * len(model.folds)
        speed = guard_speed(model, runner, _runtime_of(model, runtime, precision), precision)
        parts.append(PartEstimate(part_name(model), windows, peak, _network(model, runner), *(speed or (None, ""))))
    return RunEstimate(parts, len({r.preprocess_key() for r in runners}), compare)


def time_one_window(engine, channels: int, patch: Sequence[int]) -> float:
    """Seconds the engine takes for one window (zeros: the runtimes' speed does not depend on the values)."""
    import torch

    window = torch.zeros((1, channels, *patch), dtype=torch.float32, device=engine.device)
    with torch.inference_mode():
        started = time.perf_counter()
        engine(window)
        if window.is_cuda:
            torch.cuda.synchronize(window.device)
        return time.perf_counter() - started


def set_timed_speed(estimate: RunEstimate, index: int, seconds: float) -> None:
    """Part ``index``'s timed window gives the speed of every part with its network whose speed is unknown."""
    network = estimate.parts[index].network
    for part in estimate.parts:
        if part.seconds_per_window is None and part.network == network:
            part.seconds_per_window, part.speed_source = seconds, "from one window timed on this computer"
