"""What the accuracy guard measures FP32-vs-INT8 agreement on: data no calibration patch came from, where it can.

- **3 or more calibration volumes**: the last :data:`HELD_OUT_VOLUMES` are held out whole and segmented the way
  ``segment`` runs them (the same sliding window on the guard's runtime, labels on the input grid), FP32 and
  INT8; the others give the calibration patches. Its cost grows with the volume: the note names the volumes
  and counts the windows.
- **Fewer**: every volume is preprocessed once; the calibration patches and the held-out patches (another seed)
  are drawn from that, each held-out patch where no calibration patch of its volume lies if such a place is
  found, else where they overlap least; the note says how far apart they came.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ..core.progress import Monitor
from .calibration import CalibrationSettings, PatchDraw, PreparedVolumes, draw_patches

WHOLE_VOLUMES_FROM = 3  # calibration volumes from which whole ones are held out
HELD_STAGE = "held-out patches"
HELD_OUT_VOLUMES = 1  # volumes held out then (each is segmented twice per guard attempt: keep it affordable)
# (engine, held-out volume number) -> (labels on the input grid, network seconds, windows run)
SegmentHeldOut = Callable[[Any, int], tuple[np.ndarray, float, int]]


def held_out_patch_count(num_patches: int) -> int:
    return max(4, num_patches // 4)


class HeldOut(Protocol):
    ranking_patches: np.ndarray  # held-out patches for :func:`sensitivity.rank_sensitivity`

    def predict(self, engine) -> tuple[np.ndarray, float]:
        """Labels of all held-out data (one array) and milliseconds per network call (per patch or window)."""

    @property
    def note(self) -> str:
        """What was held out, in one sentence (``quantization.json``'s ``guard.held_out``; printed)."""

    @property
    def detail(self) -> dict[str, Any]:
        """The same, as data (``guard.held_out_detail``)."""


def patch_labels(engine, patches: np.ndarray, timings: list[float] | None = None) -> np.ndarray:
    """Argmax labels of ``engine`` on each patch (one call per patch), timed into ``timings``."""
    out = []
    with torch.inference_mode():
        for patch in patches:
            batch = torch.from_numpy(np.ascontiguousarray(patch[None])).to(engine.device)
            started = time.perf_counter()
            logits = engine(batch)
            if timings is not None:
                timings.append(1000.0 * (time.perf_counter() - started))
            out.append(torch.argmax(logits[0], dim=0).cpu().numpy().astype(np.int16))
    return np.stack(out)


@dataclass
class HeldOutPatches:
    patches: np.ndarray
    note: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking_patches(self) -> np.ndarray:
        return self.patches

    def predict(self, engine) -> tuple[np.ndarray, float]:
        timings: list[float] = []
        labels = patch_labels(engine, self.patches, timings)
        return labels, statistics.median(timings)


@dataclass
class HeldOutVolumes:
    names: list[str]
    segment: SegmentHeldOut
    ranking_patches: np.ndarray
    calibration_volumes: int
    windows: int | None = None  # per FP32 or INT8 pass, known after the first

    def predict(self, engine) -> tuple[np.ndarray, float]:
        labels, seconds, windows = [], 0.0, 0
        for index in range(len(self.names)):
            volume_labels, volume_seconds, volume_windows = self.segment(engine, index)
            labels.append(np.asarray(volume_labels).ravel())
            seconds, windows = seconds + volume_seconds, windows + volume_windows
        self.windows = windows
        return np.concatenate(labels), 1000.0 * seconds / max(windows, 1)

    @property
    def note(self) -> str:
        names = ", ".join(self.names)
        return (f"whole volume(s): {names} ({self.windows} sliding-window windows, segmented as `segment` runs "
                f"them), held out of calibration; calibrated on the other {self.calibration_volumes} volume(s)")

    @property
    def detail(self) -> dict[str, Any]:
        return {"kind": "volumes", "volumes": list(self.names), "windows": self.windows,
                "calibration_volumes": self.calibration_volumes}


def _apart_note(held: PatchDraw, calibration: PatchDraw, settings: CalibrationSettings,
                names: Sequence[str]) -> HeldOutPatches:
    apart = int(np.sum(held.overlap == 0.0))
    largest = float(held.overlap.max())
    count, volumes = len(held.patches), len(names)
    where = ("all clear of every calibration patch" if apart == count else
             f"{apart} of {count} clear of every calibration patch, the others overlapping one by at most {largest:.0%}")
    note = (f"{count} patches drawn apart from the {len(calibration.patches)} calibration patches of the same "
            f"{volumes} volume(s), preprocessed once for both (seed {settings.seed + 1}): {where}; give "
            f"{WHOLE_VOLUMES_FROM} or more calibration volumes to hold a whole volume out")
    detail = {"kind": "patches", "patches": count, "volumes": list(names), "apart": apart,
              "largest_overlap": largest}
    return HeldOutPatches(held.patches, note, detail)


def calibration_and_held_out(volumes: Sequence[Any], names: Sequence[str], prepare, patch_size: Sequence[int],
                             settings: CalibrationSettings,
                             segmenter: Callable[[list, list], SegmentHeldOut],
                             monitor: Monitor | None = None) -> tuple[np.ndarray, HeldOut]:
    """Calibration patches and the guard's held-out data from ``volumes``, each preprocessed once by ``prepare``.
    ``segmenter(held-out volumes, their PreparedVolume)`` gives the whole-volume segmentation of the product."""
    monitor = monitor or Monitor()
    held_settings = replace(settings, num_patches=held_out_patch_count(settings.num_patches), seed=settings.seed + 1)
    if len(volumes) >= WHOLE_VOLUMES_FROM:
        held = list(range(len(volumes) - HELD_OUT_VOLUMES, len(volumes)))
        prepared = PreparedVolumes(volumes, prepare, monitor, keep=held)
        calibration = draw_patches(prepared, patch_size, settings, monitor, indices=range(held[0]))
        ranking = draw_patches(prepared, patch_size, held_settings, monitor, indices=held, stage=HELD_STAGE)
        segment = segmenter([volumes[i] for i in held], [prepared[i] for i in held])
        return calibration.patches, HeldOutVolumes([names[i] for i in held], segment, ranking.patches, held[0])
    prepared = PreparedVolumes(volumes, prepare, monitor, keep=range(len(volumes)))
    calibration = draw_patches(prepared, patch_size, settings, monitor)
    held = draw_patches(prepared, patch_size, held_settings, monitor, avoid=calibration, stage=HELD_STAGE)
    return calibration.patches, _apart_note(held, calibration, settings, names)
