"""The Ray worker actor: builds or loads one engine at start, then segments volumes sent as file bytes.

Volumes and label maps travel as the bytes of one file each, so workers need no shared file system
and the driver alone writes outputs (atomically): a worker that dies leaves nothing half written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

MODEL_FILES_SKIPPED = ("engines",)  # build caches are rebuilt per worker when needed


def pack_model_dir(model_dir: Path) -> dict[str, bytes]:
    """The model folder's files (spec, ONNX, weights, report) as name -> bytes, to ship to the cluster."""
    return {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir())
            if p.is_file() and p.name not in MODEL_FILES_SKIPPED}


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    """Write files packed as name -> bytes (a model folder, a DICOM series) into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _restrict_to(cpus: Sequence[int]) -> None:
    """Run every thread of this process (Ray's own ones too) on ``cpus`` only; new threads inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def _cpu_list() -> str:
    """The CPUs this process may run on, as in /proc (e.g. "0-1" or "0,2,4")."""
    cpus = sorted(os.sched_getaffinity(0))
    runs: list[str] = []
    for cpu in cpus:
        if runs and cpu == int(runs[-1].split("-")[-1]) + 1:
            runs[-1] = f"{runs[-1].split('-')[0]}-{cpu}"
        else:
            runs.append(str(cpu))
    return ",".join(runs)


class VolumeWorker:
    """One engine per worker process, reused for every volume it is given."""

    def __init__(self, model_files: dict[str, bytes] | str, runtime: str, precision: str, device: str | None,
                 threads: int | None, scratch_root: str | None = None, cpus: Sequence[int] | None = None,
                 torch_compile: str | None = None):
        if cpus:  # before any runtime starts its threads: they inherit the set (OpenVINO pins inside it)
            _restrict_to(cpus)
        import torch
        from monai.data.utils import compute_importance_map  # noqa: F401 - imported now, not on the first volume

        from ..engines.open import open_engine

        from ..models.model_folder import open_model_dir

        if threads:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        # On a local cluster the driver owns scratch_root and removes it even after a killed worker.
        parent = scratch_root if scratch_root and Path(scratch_root).is_dir() else None
        self.root = Path(tempfile.mkdtemp(prefix="ptqseg-worker-", dir=parent))
        # a local cluster's driver passes the folder it wrote the model to; a remote one, the files
        write_files(pack_model_dir(Path(model_files)) if isinstance(model_files, str) else model_files, self.root)
        model_dir = open_model_dir(self.root)
        self.spec = model_dir.spec()
        started = time.perf_counter()
        # a compiled PyTorch engine compiles here, once per worker, and pays off over the worker's volumes
        self.engine, _ = open_engine(model_dir, runtime, precision, device=device, threads=threads,
                                     torch_compile=torch_compile)
        self.build_seconds = time.perf_counter() - started
        self._warm_up()
        self.scratch = Path(tempfile.mkdtemp(prefix="ptqseg-volumes-", dir=parent))

    def _warm_up(self) -> None:
        """Load the readers and transforms and run one batch of windows now, so the first volume costs what
        every later one does."""
        import torch

        from ..io.volumes import sitk_module, read_volume, write_labelmap  # noqa: F401
        from ..inference.segmenter import auto_batch_size
        from ..inference.preprocess import load_transforms

        sitk_module()
        load_transforms()
        batch = auto_batch_size(self.engine, self.spec)  # the batch shape segment_volume will use
        self.engine(torch.zeros(batch, self.spec.in_channels, *self.spec.patch_size, device=self.engine.device))

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "build_seconds": self.build_seconds, "threads": self.threads, "cpus": _cpu_list(),
                **self.engine.info.to_dict()}

    def segment(self, kind: str, data: bytes | dict[str, bytes], name: str = "the volume") -> dict[str, Any]:
        """Segment one volume: a file's bytes (``kind`` its suffix) or a DICOM folder's files (``kind`` "dicom");
        returns the label map's bytes, timings and engine facts, or an error."""
        from ..core.errors import PTQError
        from ..io.volumes import read_volume, write_labelmap
        from ..inference.segmenter import segment_volume

        facts = {"runtime": self.engine.info.runtime, "precision": self.engine.info.precision,
                 "device": self.engine.info.device, "worker_pid": os.getpid(), "threads": self.threads,
                 "cpus": _cpu_list()}
        folder = isinstance(data, dict)
        source, target = self.scratch / ("input-dicom" if folder else "input" + kind), self.scratch / "labels.nii.gz"
        try:
            started = time.perf_counter()
            if folder:
                write_files(data, source)
            else:
                source.write_bytes(data)
            volume = read_volume(source).validate("input volume")
            loaded = time.perf_counter()
            result = segment_volume(volume, self.spec, self.engine)
            segmented = time.perf_counter()
            write_labelmap(result.labels, target)
            labels = target.read_bytes()
            timings = {"read": loaded - started, "segment": segmented - loaded, "network": result.network_seconds,
                       "encode": time.perf_counter() - segmented}
            return {**facts, "labels": labels, "timings": timings, "error": None}
        except PTQError as exc:
            return {**facts, "labels": None, "timings": {}, "error": str(exc).replace(str(source), name)}
        except Exception as exc:  # noqa: BLE001 - one bad volume must not stop the cohort
            return {**facts, "labels": None, "timings": {}, "error": f"unexpected {type(exc).__name__}: {exc}"}
        finally:
            if folder:
                shutil.rmtree(source, ignore_errors=True)
            else:
                source.unlink(missing_ok=True)
            target.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
