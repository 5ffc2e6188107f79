"""Command lines for the engine CLI and a cancellable background process (no Qt, no Slicer).

The Slicer module runs ``PythonSlicer -m PTQLogic.app.cli ...`` through :class:`BackgroundProcess`
and polls it from a ``qt.QTimer``: reader threads collect output lines, ``poll()`` hands them to the
GUI thread, ``cancel()`` ends the whole process tree (the CLI writes atomically, so nothing
partial remains).
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from ..core.errors import PTQError
from ..core.progress import parse_estimate_line, parse_progress_line
from ..quantization.interface import DEFAULT_MIN_AGREEMENT, QuantizeOptions

_FLAGS = ["--progress-lines", "--json"]


def quantize_command(python_exe: str, spec_path: str | Path, calibration_paths: Sequence[str | Path],
                     out_dir: str | Path, patches: int, method: str, min_agreement: float | None = DEFAULT_MIN_AGREEMENT,
                     runtime: str = "auto", percentile: float | None = None,
                     bias_correction: bool = False, on_miss: str = "fail", equalize: bool = False) -> list[str]:
    """``python -m PTQLogic.app.cli quantize ...`` (always machine progress + JSON result).

    The accuracy guard checks INT8-vs-FP32 agreement on held-out data on ``runtime``, the one chosen for
    segmenting ("auto": the one segment picks for INT8), and keeps layers in FP32 until ``min_agreement`` holds;
    ``min_agreement`` 0 or None measures agreement without enforcing it (``--no-guard``). The Q/DQ placement is
    the fidelity default (ModelOpt's). ``percentile`` is passed with ``method`` "percentile" only (the panel
    keeps its value while another method is chosen; the CLI refuses ``--percentile`` with other methods).
    ``bias_correction`` adds ``--bias-correction`` (opt-in, any method; docs/fidelity.md). ``on_miss`` "fp32"
    adds ``--on-miss fp32`` (nnU-Net folders: a part whose INT8 misses the guard's target is kept in FP32).
    ``equalize`` adds ``--equalize`` (nnU-Net PlainConvUNet folders: channel equalization before export).
    """
    if not calibration_paths:
        raise PTQError("Choose at least one calibration volume or a folder of volumes.")
    if int(patches) < 1:
        raise PTQError(f"The number of calibration patches must be >= 1, got {patches}.")
    percentile = float(percentile) if method == "percentile" and percentile is not None else None
    QuantizeOptions(method=str(method), percentile=percentile, on_miss=on_miss).validate_method()  # before a job
    calibration = ["--method", str(method)] + (["--percentile", repr(percentile)] if percentile is not None else [])
    calibration += ["--bias-correction"] if bias_correction else []
    calibration += ["--equalize"] if equalize else []
    guard = ["--min-agreement", f"{float(min_agreement):g}"] if min_agreement else ["--no-guard"]
    guard += ["--on-miss", on_miss] if on_miss != "fail" and min_agreement else []
    guard_runtime = runtime if runtime in ("openvino", "onnxruntime", "tensorrt") else "auto"
    return [str(python_exe), "-m", "PTQLogic.app.cli", "quantize", "--model", str(spec_path),
            "--calibration", *[str(p) for p in calibration_paths], "--out", str(out_dir),
            "--patches", str(int(patches)), *calibration, *guard, "--guard-runtime", guard_runtime, *_FLAGS]


def info_command(python_exe: str) -> list[str]:
    """``python -m PTQLogic.app.cli info --json``: versions, CPU/GPU features and the automatic runtime choice."""
    return [str(python_exe), "-m", "PTQLogic.app.cli", "info", "--json"]


def runtime_choice_text(info: dict) -> str:
    """One line per precision saying which runtime "auto" picks here and why, then what precision "auto" runs
    (from ``info_command``)."""
    choices = info.get("auto_runtime") or {}
    lines = [f"{precision.upper()}: {choice.get('runtime') or 'unavailable'} - {choice.get('reason', '')}"
             for precision, choice in choices.items()]
    auto = info.get("auto_precision")
    if auto:
        lines.append(f"AUTO precision: {auto.get('precision') or 'unavailable'} - {auto.get('reason', '')}")
    return "\n".join(lines)


def fp32_windows_for(model: str | Path, precision: str, share: float) -> float:
    """The ``--fp32-windows`` share Segment passes: the panel's, for nnU-Net models (a quantized folder or parts
    file) run at INT8 or auto precision; 0 (off) for other models and precisions, which do not take it."""
    from ..inference.nnunet.segment import is_nnunet_target

    if not share or precision not in ("int8", "auto") or str(model) in ("", "."):
        return 0.0
    return float(share) if is_nnunet_target(model) else 0.0


def segment_command(python_exe: str, model_dir: str | Path, input_path: str | Path, output_path: str | Path,
                    runtime: str, precision: str, compare: bool, reference: str | Path | None = None,
                    trt_opt_level: int | None = None, cpu_bf16: bool = False,
                    fp32_windows: float = 0.0) -> list[str]:
    """``python -m PTQLogic.app.cli segment ...``; ``compare`` adds the FP32 run for agreement Dice;
    ``trt_opt_level`` is the TensorRT builder optimization level (0-5) if a TensorRT engine gets built;
    ``cpu_bf16`` runs the float remainder of OpenVINO INT8 engines in bf16 (AMX CPUs); ``fp32_windows`` (nnU-Net
    INT8): at most this share of the windows, those INT8 is least sure of, from FP32 (0: off; passed only where
    segment takes it, :func:`fp32_windows_for`)."""
    command = [str(python_exe), "-m", "PTQLogic.app.cli", "segment", "--model", str(model_dir),
               "--input", str(input_path), "--output", str(output_path),
               "--runtime", str(runtime), "--precision", str(precision)]
    if compare:
        command.append("--compare")
    if reference is not None:
        command += ["--reference", str(reference)]
    if trt_opt_level is not None:
        if not 0 <= int(trt_opt_level) <= 5:
            raise PTQError(f"The TensorRT optimization level must be 0-5, got {trt_opt_level}.")
        command += ["--trt-opt-level", str(int(trt_opt_level))]
    if cpu_bf16:
        command += ["--cpu-float", "bf16"]
    fp32_windows = fp32_windows_for(model_dir, precision, fp32_windows)
    if fp32_windows:
        command += ["--fp32-windows", f"{float(fp32_windows):g}"]
    return command + _FLAGS


# a stage of an nnU-Net part ("part 2/5 (vertebrae): sliding window") and the share of the part's time per step
_PART_STAGE = re.compile(r"part (\d+)/(\d+) \(.*\): (.+)$")
_PART_STEPS = {"preprocessing": (0.0, 0.1), "sliding window": (0.1, 0.9), "export": (0.9, 1.0)}


def parse_progress(line: str) -> tuple[float, str] | None:
    """A ``PTQSEG_PROGRESS`` line -> (fraction 0..1 for the progress bar, "stage done/total"); else None. The
    fraction is the current stage's, or for a stage of an nnU-Net part (``part 2/5 (name): step``) the whole
    run's, so the bar does not start over with each part."""
    parsed = parse_progress_line(line.strip())
    if parsed is None:
        return None
    stage, done, total = parsed
    fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    part = _PART_STAGE.match(stage)
    if part and 0 < int(part.group(1)) <= int(part.group(2)):
        start, end = _PART_STEPS.get(part.group(3), (0.0, 1.0))
        fraction = (int(part.group(1)) - 1 + start + (end - start) * fraction) / int(part.group(2))
    return fraction, f"{stage} {done}/{total}"


class RunProgress:
    """The progress bar of one job: :func:`parse_progress` line by line, except that over the parts of an nnU-Net
    run the bar never moves back. A part's export runs beside the next part's sliding window, so its last lines
    can arrive after the next part's first ones (on a busy machine, many of them)."""

    def __init__(self) -> None:
        self.parts_fraction = 0.0

    def update(self, line: str) -> tuple[float, str] | None:
        """(fraction for the bar, text for the status) of a progress line; None for other lines."""
        parsed = parse_progress(line)
        if parsed is None:
            return None
        fraction, text = parsed
        if _PART_STAGE.match(text):
            self.parts_fraction = fraction = max(fraction, self.parts_fraction)
        return fraction, text


def parse_estimate(line: str) -> dict | None:
    """A ``PTQSEG_ESTIMATE`` line (what a run is expected to cost, said before it runs) -> its summary, whose
    "text" is one line for the user; else None."""
    return parse_estimate_line(line.strip())


def parse_result(stdout_text: str) -> dict:
    """The last JSON object printed on stdout (the CLI's ``--json`` result)."""
    decoder = json.JSONDecoder()
    last, index = None, 0
    while (start := stdout_text.find("{", index)) != -1:
        try:
            value, end = decoder.raw_decode(stdout_text, start)
        except ValueError:
            index = start + 1
            continue
        if isinstance(value, dict):
            last = value
        index = end
    if last is None:
        raise PTQError("The engine process finished without printing a result; see the log for details.")
    return last


def parse_error(stderr_text: str) -> str:
    """The one-line reason for a failure: the last ``error: ...`` line, else the last meaningful line."""
    lines = [ln.strip() for ln in stderr_text.splitlines() if ln.strip() and parse_progress_line(ln.strip()) is None]
    for line in reversed(lines):
        if line.lower().startswith("error:"):
            return line[len("error:"):].strip()
    return lines[-1] if lines else "The engine process failed without a message; see the log."


def ptqlogic_parent_dir(module_dir: str | Path) -> Path:
    """Folder to put on PYTHONPATH so ``-m PTQLogic.app.cli`` works: the module folder (installed
    extension: PTQLogic is copied next to the module) or its parent (source checkout)."""
    module_dir = Path(module_dir).resolve()
    for candidate in (module_dir, module_dir.parent):
        if (candidate / "PTQLogic" / "__init__.py").is_file():
            return candidate
    raise PTQError(f"PTQLogic was not found next to '{module_dir}'; reinstall the extension.")


def engine_environment(base_env: Mapping[str, str], ptqlogic_parent: str | Path) -> dict[str, str]:
    """Environment for the engine process: PTQLogic first on PYTHONPATH, unbuffered UTF-8 output."""
    env = dict(base_env)
    paths = [str(ptqlogic_parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"  # the module decodes UTF-8; Windows pipes default to the ANSI code page
    return env


class BackgroundProcess:
    """One engine process; ``poll()`` never blocks, so a GUI timer can drive it."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None):
        self.command = [str(c) for c in command]
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.cancelled = False
        self.kill_after_s = 5.0
        self.reap_after_kill_s = 5.0  # upper bound on waiting for SIGKILLed processes to disappear
        self._cancel_time = 0.0
        self._killed = False
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches grandchildren
        self._process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env), cwd=cwd, text=True, encoding="utf-8", errors="replace",
            bufsize=1, **kwargs,
        )
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr"))]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _read(self, stream, name: str) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    def poll(self) -> tuple[list[tuple[str, str]], int | None]:
        """New (stream, line) pairs since the last call, and the exit code once finished and drained.

        After :meth:`cancel` the job counts as finished only when its whole process group is gone:
        ``PythonSlicer`` is a launcher that dies on SIGTERM at once while its child (``python-real``,
        maybe inside a native TensorRT build) carries on, so the group is SIGKILLed after the grace period.
        """
        returncode = self._process.poll()
        if self.cancelled and os.name != "nt":
            waited = time.monotonic() - self._cancel_time
            if _group_running(self._process.pid):
                if waited > self.kill_after_s and not self._killed:
                    self._kill_tree(force=True)  # did not unwind in time after SIGTERM
                if waited < self.kill_after_s + self.reap_after_kill_s:
                    returncode = None  # the engine may still run under a launcher that already exited
        elif returncode is None and self.cancelled and time.monotonic() - self._cancel_time > self.kill_after_s:
            self._kill_tree(force=True)
        if returncode is not None:
            for reader in self._readers:
                reader.join(timeout=1)
        new = []
        while True:
            try:
                stream, line = self._lines.get_nowait()
            except queue.Empty:
                break
            (self.stdout_lines if stream == "stdout" else self.stderr_lines).append(line)
            new.append((stream, line))
        return new, returncode

    def cancel(self) -> None:
        """Ask the process tree to stop; never blocks. The engine unwinds on SIGTERM (removing its
        staging files); :meth:`poll` kills the whole tree if it has not ended ``kill_after_s`` later."""
        if self._process.poll() is not None or self.cancelled:
            return
        self.cancelled = True
        self._cancel_time = time.monotonic()
        self._kill_tree(force=os.name == "nt")

    def _kill_tree(self, force: bool) -> None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/PID", str(self._process.pid), "/T", "/F"], capture_output=True, check=False)
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL if force else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        if force:
            self._killed = True
            self._process.wait()

    def wait(self, timeout: float | None = None) -> int:
        """Block until finished (tests and scripts only; the GUI uses :meth:`poll`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            returncode = self.poll()[1]
            if returncode is not None:
                return returncode
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.command, timeout)
            time.sleep(0.05)


def _group_running(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies waiting to be reaped do not count)."""
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited while scanning
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def default_python() -> str:
    """The interpreter for engine processes: Slicer's ``PythonSlicer`` when present, else this one."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable
