"""Drive a cohort: stream volumes to worker actors, retry what a dead worker held, keep the manifest."""
from __future__ import annotations

import os
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.errors import EngineUnavailable, InputError, PTQError
from ..core.fileio import atomic_write_bytes
from ..core.progress import Monitor
from .cluster import available_gpus, connect, import_ray, local_cluster
from .inputs import CohortItem, collect_inputs, input_digest, read_input, volume_kind
from .manifest import Manifest, model_fingerprint
from .scratch import make_scratch_dir
from .worker import VolumeWorker, pack_model_dir, write_files

STAGE = "volumes"
IN_FLIGHT_PER_WORKER = 2  # the next volume's bytes travel while the current one is segmented
MAX_ATTEMPTS = 3  # a volume whose worker died this often is recorded as an error


@dataclass
class CohortSummary:
    total: int
    done: int
    skipped: int
    failed: int
    seconds: float
    startup_seconds: float  # starting the workers and building/loading their engines
    volumes_per_second: float  # volumes segmented per second once the workers were up
    workers: int
    output_dir: str
    manifest: str
    errors: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, PTQError):
        return str(cause)
    lines = [line.strip() for line in str(cause or exc).splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else type(exc).__name__)


class _Pool:
    """Worker actors and their state: ready to take volumes, restarting after a crash, or gone."""

    def __init__(self, ray, actors: list, model_files):
        self.ray, self.actors = ray, actors
        self.model_files = model_files  # restarted actors rebuild from it: keep it referenced
        self.load = [0] * len(actors)
        self.restarting: dict[Any, int] = {}  # pid() call -> actor index, for actors coming back
        self.dead: set[int] = set()

    def ready(self) -> list[int]:
        busy = set(self.restarting.values()) | self.dead
        return sorted((i for i in range(len(self.actors)) if i not in busy), key=lambda i: self.load[i])

    def crashed(self, index: int) -> None:
        if index not in self.restarting.values() and index not in self.dead:
            self.restarting[self.actors[index].pid.options(concurrency_group="control").remote()] = index

    def poll_restarts(self) -> None:
        if not self.restarting:
            return
        done, _ = self.ray.wait(list(self.restarting), num_returns=len(self.restarting), timeout=0)
        for ref in done:
            index = self.restarting.pop(ref)
            try:
                self.ray.get(ref)
            except self.ray.exceptions.ActorUnavailableError:
                self.crashed(index)  # still restarting: ask again
            except self.ray.exceptions.RayActorError:
                self.dead.add(index)


def worker_cpu_sets(workers: int, threads: int) -> list[list[int] | None]:
    """Disjoint CPU sets of this machine, one per worker of a local cluster (None each when they do not fit).

    OpenVINO pins its threads to cores it chooses without knowing of other processes: left alone, every
    worker would pin to the same first cores.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if workers * threads > len(cpus):
        return [None] * workers
    return [cpus[i * threads:(i + 1) * threads] for i in range(workers)]


def _start_workers(ray, model_dir: Path, n: int, threads: int, gpus: float, runtime: str, precision: str,
                   monitor: Monitor, scratch_root: str | None = None, pin: bool = False,
                   torch_compile: str | None = None) -> _Pool:
    remote = ray.remote(concurrency_groups={"control": 1})(VolumeWorker)
    if scratch_root:  # workers of a local cluster copy the model from here (restarted ones too)
        files = str(write_files(pack_model_dir(model_dir), Path(scratch_root) / "model"))
    else:  # kept referenced by the pool: restarted actors rebuild from it
        files = ray.put(pack_model_dir(model_dir))
    device = "cuda" if gpus > 0 else None
    cpu_sets = worker_cpu_sets(n, threads) if pin else [None] * n
    actors = [remote.options(num_cpus=threads, num_gpus=gpus, max_restarts=MAX_ATTEMPTS, max_task_retries=0)
              .remote(files, runtime, precision, device, threads, scratch_root, cpus, torch_compile)
              for cpus in cpu_sets]
    pending = {actor.info.options(concurrency_group="control").remote(): actor for actor in actors}
    try:
        monitor.update("starting workers", 0, n)
        while pending:  # wait for every engine to be built or loaded, staying cancellable
            monitor.check()
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise EngineUnavailable(f"A Ray worker could not open the model: {_error_text(exc)}") from None
            monitor.update("starting workers", n - len(pending), n)
    except BaseException:
        for actor in actors:  # on a shared cluster they would otherwise keep their CPUs
            ray.kill(actor, no_restart=True)
        raise
    return _Pool(ray, actors, files)


def _stop(ray, pool: _Pool | None, inflight: dict, graceful: bool) -> None:
    for ref in inflight:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - the worker may already be gone
            pass
    if pool is None:
        return
    if graceful:
        live = [pool.actors[i].close.remote() for i in pool.ready()]
        ray.wait(live, num_returns=len(live), timeout=10)
    for actor in pool.actors:
        ray.kill(actor, no_restart=True)


def _all_done(items: Sequence[CohortItem], manifest: Manifest, fingerprint: str) -> bool:
    """Whether every input already has a done row for its current bytes (stops at the first that has not)."""
    for item in items:
        row = manifest.rows.get(str(item.input))
        if not row or row.get("status") != "done":
            return False
        try:
            digest = input_digest(read_input(item.input))
        except OSError:
            return False
        if not manifest.is_done(item.input, digest, fingerprint):
            return False
    return True


def resolve_precision(runtime: str, precision: str | None) -> str:
    """The precision to run; None/"auto": fp32 for the PyTorch runtime (it has no INT8 engine), fp16 for TensorRT
    (INT8 measured no faster there, see ``engines.choose_precision``), else int8. With ``--runtime auto`` the
    workers' hardware is not known here, so auto means int8."""
    if runtime == "torch" and precision == "int8":
        raise InputError("--runtime torch cannot run int8: PyTorch is the FP32 reference (fp16 only on an NVIDIA "
                         "GPU). Use --precision fp32, or --runtime openvino|onnxruntime|tensorrt for INT8.")
    if precision not in (None, "auto"):
        return precision
    return {"torch": "fp32", "tensorrt": "fp16"}.get(runtime, "int8")


def _check_options(workers: int, threads_per_worker: int, gpus_per_worker: float, runtime: str,
                   torch_compile: str | None) -> None:
    if workers < 1 or threads_per_worker < 1 or gpus_per_worker < 0:
        raise InputError("--workers and --threads-per-worker must be >= 1 and --gpus-per-worker >= 0.")
    if torch_compile is not None and runtime != "torch":  # before the cluster starts
        raise InputError(f"--torch-compile is for --runtime torch workers, not '{runtime}'; add --runtime torch "
                         "or leave --torch-compile out.")


def _check_cluster(ray, workers: int, threads_per_worker: int, gpus_per_worker: float) -> None:
    """Refuse a cluster too small for the workers asked for."""
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if cpus < workers * threads_per_worker:
        raise InputError(f"{workers} worker(s) x {threads_per_worker} thread(s) need {workers * threads_per_worker} "
                         f"CPUs but the Ray cluster has {cpus:g}; use fewer workers or threads.")
    if gpus_per_worker > 0 and available_gpus() < gpus_per_worker:
        raise EngineUnavailable(f"--gpus-per-worker {gpus_per_worker} but the Ray cluster has "
                                f"{available_gpus():g} GPU(s); use 0 for CPU workers.")


class _Dispatch:
    """One cohort on a started pool: hand volumes to workers, record results, retry what a dead worker held."""

    def __init__(self, ray, items: Sequence[CohortItem], manifest: Manifest, fingerprint: str, precision: str,
                 monitor: Monitor, on_dispatch: Callable[[Path, int], None] | None):
        self.ray, self.manifest, self.fingerprint, self.precision = ray, manifest, fingerprint, precision
        self.monitor, self.on_dispatch = monitor, on_dispatch
        self.pool: _Pool | None = None
        self.inflight: dict[Any, tuple[CohortItem, int]] = {}  # task ref -> (volume, actor index)
        self.queue: deque[CohortItem] = deque(items)
        self.total = len(items)
        self.attempts: dict[Path, int] = {}
        self.hashes: dict[Path, str] = {}
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.errors: dict[str, str] = {}
        self.pids: list[int] = []

    def run(self) -> None:
        """Segment the whole queue on ``self.pool``; returns when every volume has its manifest row."""
        pool = self.pool
        self.pids = [self.ray.get(a.pid.options(concurrency_group="control").remote()) for a in pool.actors]
        self.monitor.update(STAGE, 0, self.total)
        while self.queue or self.inflight:
            self.monitor.check()
            pool.poll_restarts()
            for index in pool.ready():
                self._fill(index)
            if not self.inflight:
                if self.queue and not pool.ready() and not pool.restarting:
                    raise EngineUnavailable(f"Every Ray worker died; {len(self.queue)} volume(s) were not segmented. "
                                            "Rerun the same command to retry them.")
                if self.queue:
                    time.sleep(0.1)
                continue
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                self._collect(ref)

    def _fill(self, index: int) -> None:
        """Give worker ``index`` volumes up to IN_FLIGHT_PER_WORKER; unreadable and already done ones are not sent."""
        while self.pool.load[index] < IN_FLIGHT_PER_WORKER and self.queue:
            item = self.queue.popleft()
            try:
                data = read_input(item.input)
            except OSError as exc:  # vanished or unreadable since the listing: its row says so
                self._finish(item, {"input": str(item.input), "output": None, "sha256": None,
                                    "model": self.fingerprint, "attempts": 0, "status": "error", "runtime": None,
                                    "precision": self.precision, "seconds": None, "timings": {},
                                    "error": f"cannot read it: {exc.strerror}"})
                continue
            self.hashes[item.input] = input_digest(data)
            if item.input not in self.attempts and self.manifest.is_done(item.input, self.hashes[item.input],
                                                                         self.fingerprint):
                self.counts["skipped"] += 1
                self.monitor.update(STAGE, sum(self.counts.values()), self.total)
                continue
            self._send(item, data, index)

    def _send(self, item: CohortItem, data: bytes | dict[str, bytes], index: int) -> None:
        self.attempts[item.input] = self.attempts.get(item.input, 0) + 1
        ref = self.pool.actors[index].segment.remote(volume_kind(item.input), data, item.input.name)
        self.inflight[ref] = (item, index)
        self.pool.load[index] += 1
        if self.on_dispatch is not None:
            self.on_dispatch(item.input, self.pids[index])

    def _collect(self, ref) -> None:
        """Record one finished task: its label map and row, or a retry when its worker died."""
        item, index = self.inflight.pop(ref)
        self.pool.load[index] -= 1
        base = {"input": str(item.input), "output": None, "sha256": self.hashes[item.input],
                "model": self.fingerprint, "attempts": self.attempts[item.input]}
        try:
            result = self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError) as exc:
            self.pool.crashed(index)
            if self.attempts[item.input] < MAX_ATTEMPTS:
                self.queue.appendleft(item)  # goes to whichever worker is free next
            else:
                self._finish(item, {**base, "status": "error", "runtime": None, "precision": self.precision,
                                    "seconds": None, "timings": {},
                                    "error": f"its worker died {MAX_ATTEMPTS} times ({_error_text(exc)})"})
            return
        labels = result.pop("labels")
        if labels is not None:
            atomic_write_bytes(item.output, labels)
        timings = result.pop("timings")
        self._finish(item, {**base, "output": str(item.output) if labels is not None else None,
                            "status": "done" if labels is not None else "error",
                            "seconds": sum(v for k, v in timings.items() if k != "network") or None,
                            "timings": timings, **result})

    def _finish(self, item: CohortItem, row: dict[str, Any]) -> None:
        self.manifest.record(row)
        key = "done" if row["status"] == "done" else "failed"
        self.counts[key] += 1
        if row["error"]:
            self.errors[str(item.input)] = row["error"]
        self.monitor.update(STAGE, sum(self.counts.values()), self.total)


def _release(ray, pool: _Pool | None, inflight: dict, clean: bool, started_here: bool,
             scratch_root: str | None) -> None:
    """Stop the workers, the local cluster this run started, and remove the workers' scratch folder."""
    try:
        _stop(ray, pool, inflight, graceful=clean)
    finally:
        if started_here:
            ray.shutdown()
        if scratch_root:
            shutil.rmtree(scratch_root, ignore_errors=True)


def _summary(items: Sequence[CohortItem], counts: dict[str, int], errors: dict[str, str], seconds: float,
             startup: float, workers: int, output_dir: Path, manifest: Manifest) -> CohortSummary:
    return CohortSummary(
        total=len(items), done=counts["done"], skipped=counts["skipped"], failed=counts["failed"],
        seconds=seconds, startup_seconds=startup,
        volumes_per_second=counts["done"] / (seconds - startup) if seconds > startup else 0.0, workers=workers,
        output_dir=str(output_dir), manifest=str(manifest.path), errors=errors,
    )


def run_cohort(
    model: str | Path,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    ray_address: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    gpus_per_worker: float = 0.0,
    runtime: str = "auto",
    precision: str | None = None,
    pin_cpus: bool = True,
    torch_compile: str | None = None,
    monitor: Monitor | None = None,
    on_dispatch: Callable[[Path, int], None] | None = None,
) -> CohortSummary:
    """Segment every input volume on a Ray cluster; label maps and ``manifest.jsonl`` land in ``output_dir``.

    ``precision``: None/"auto" as :func:`resolve_precision` says (int8; fp16 for ``runtime="tensorrt"``, fp32 for
    ``runtime="torch"``).
    ``pin_cpus``: on a local cluster, give each worker its own ``threads_per_worker`` CPUs (when they fit).
    ``torch_compile``: a ``torch.compile`` mode for ``runtime="torch"`` workers (compiled once per worker).
    ``on_dispatch(input, worker_pid)`` is called when a volume is handed to a worker (for monitoring).
    """
    from ..io.volumes import write_label_tables
    from ..models.model_folder import open_model_dir

    monitor = monitor or Monitor()
    _check_options(workers, threads_per_worker, gpus_per_worker, runtime, torch_compile)
    precision = resolve_precision(runtime, precision)
    model_dir = open_model_dir(model)
    spec = model_dir.spec()
    items = collect_inputs(inputs, output_dir)
    output_dir = Path(output_dir).resolve()
    manifest = Manifest(output_dir)
    fingerprint = model_fingerprint(model_dir.root, precision)
    if items and _all_done(items, manifest, fingerprint):  # a finished cohort rerun: no cluster, no workers
        skipped = {"done": 0, "skipped": len(items), "failed": 0}
        return _summary(items, skipped, {}, 0.0, 0.0, workers, output_dir, manifest)
    started_here = connect(ray_address, workers * threads_per_worker, None)
    ray = import_ray()
    # Workers of a local cluster keep their model copy and volumes here; killed ones cannot clean up.
    scratch_root = make_scratch_dir() if local_cluster() else None
    run = _Dispatch(ray, items, manifest, fingerprint, precision, monitor, on_dispatch)
    started = time.perf_counter()
    clean = False
    new_output_dir = not output_dir.exists()
    try:
        _check_cluster(ray, workers, threads_per_worker, gpus_per_worker)
        output_dir.mkdir(parents=True, exist_ok=True)  # an unwritable output fails before the workers start
        run.pool = _start_workers(ray, model_dir.root, workers, threads_per_worker, gpus_per_worker, runtime,
                                  precision, monitor, scratch_root, pin=pin_cpus and local_cluster(),
                                  torch_compile=torch_compile)
        write_label_tables(spec.classes, output_dir / "labels.nii.gz")
        startup = time.perf_counter() - started
        run.run()
        clean = True
    finally:
        _release(ray, run.pool, run.inflight, clean, started_here, scratch_root)
        if new_output_dir and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # the workers never started: leave no empty folder behind
    return _summary(items, run.counts, run.errors, time.perf_counter() - started, startup, workers, output_dir,
                    manifest)
