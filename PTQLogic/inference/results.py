"""What segmenting returns: one volume's labels and timings, and the outcome of a whole ``segment`` call."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.sysinfo import speed_note
from ..core.volume import Volume


@dataclass
class SegmentationResult:
    labels: Volume  # KJI uint8/uint16 label map on exactly the input volume's grid
    seconds: float  # total wall time (preprocessing, network, blending, resampling back)
    network_seconds: float  # time spent inside the engine
    patches: int  # number of windows the engine ran
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, where measured


@dataclass
class SegmentOutcome:
    output: Path
    labels_json: Path
    labels_csv: Path
    runtime: str
    runtime_reason: str
    precision: str
    engine_size_mb: float
    seconds: float
    network_seconds: float
    patches: int
    build_seconds: float
    agreement_dice: float | None = None
    reference_dice: float | None = None
    fp32_seconds: float | None = None  # with compare: the FP32 run of the same runtime
    fp32_network_seconds: float | None = None
    reference_per_class: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)
    estimate: dict[str, Any] | None = None  # nnU-Net: what was expected before the run (estimate.RunEstimate)
    overlapped_seconds: float = 0.0  # nnU-Net parts: export work that ran beside the sliding window (not in seconds)
    fp32_windows: dict[str, Any] | None = None  # nnU-Net --fp32-windows: windows taken from FP32 (fp32_windows.summary)

    def __post_init__(self) -> None:  # with --compare: say so when low precision did not pay off in speed
        note = self.fp32_latency_ms and speed_note(self.runtime, self.precision, self.latency_ms, self.fp32_latency_ms)
        self.warnings += [note] if note else []

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.network_seconds / max(self.patches, 1)

    @property
    def fp32_latency_ms(self) -> float | None:
        return None if self.fp32_network_seconds is None else 1000.0 * self.fp32_network_seconds / max(self.patches, 1)

    def to_dict(self) -> dict[str, Any]:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        data["latency_ms"] = self.latency_ms
        data["fp32_latency_ms"] = self.fp32_latency_ms
        return data
