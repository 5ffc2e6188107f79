"""Nothing leaves the machine, seen at the system-call level: every command runs under ``strace -f`` with a
fresh HOME. Any connect/send to (or bind on) an address that is not loopback, any DNS traffic (port 53, even
on loopback) and any file under HOME outside PTQSeg's cache fails. Unlike a Python socket patch this sees
native code too: ONNX Runtime's telemetry, Ray's C++ processes, every subprocess."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_UNET

STRACE = shutil.which("strace")


def _strace_problem() -> str | None:
    if STRACE is None:
        return "strace is not installed (apt-get install strace): this test traces every command's network calls"
    probe = subprocess.run([STRACE, "-f", "-qq", "-e", "trace=connect", "-o", os.devnull, "true"],
                           capture_output=True, text=True, timeout=60)
    return None if probe.returncode == 0 else f"strace cannot trace here (ptrace not permitted?): {probe.stderr[-300:]}"


STRACE_PROBLEM = _strace_problem()
pytestmark = pytest.mark.skipif(STRACE_PROBLEM is not None, reason=str(STRACE_PROBLEM))
SYSCALLS = "connect,bind,sendto,sendmsg,sendmmsg"
ADDRESS = re.compile(r'sa_family=AF_INET6?, sin6?_port=htons\((\d+)\).*?'
                     r'(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')
# Written under HOME by libraries when not told otherwise: ONNX Runtime's telemetry queue, matplotlib's
# caches, Ray's auth token, OpenVINO's telemetry id.
FORBIDDEN_IN_HOME = (".cache/Microsoft", ".cache/matplotlib", ".config", ".ray", "intel")
ALLOWED_IN_HOME = (".cache/ptqseg",)  # PTQSeg's own cache (engines, matplotlib's font list)
ENV_DEFAULTS = ("PTQSEG_CACHE_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "ORT_DISABLE_TELEMETRY",
                "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _is_local(text: str) -> bool:
    address = ipaddress.ip_address(text)
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_loopback


def network_attempts(log: str) -> list[str]:
    """The strace lines that reach past loopback, listen beyond it, or speak DNS."""
    found = []
    for line in log.splitlines():
        for port, ipv4, ipv6 in ADDRESS.findall(line):
            if port == "53" or not _is_local(ipv4 or ipv6):
                found.append(line.strip())
                break
    return found


def home_files(home: Path) -> list[str]:
    """Files and folders under ``home`` (empty folders too: matplotlib made ~/.config/matplotlib) outside
    PTQSeg's cache and the folders that hold it."""
    entries = [p.relative_to(home).as_posix() for p in home.rglob("*")]
    holders = {parent.as_posix() for allowed in ALLOWED_IN_HOME for parent in Path(allowed).parents}
    return [e for e in entries if not e.startswith(ALLOWED_IN_HOME) and e not in holders]


def traced(args: list, tmp_path: Path, name: str,
           timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -m PTQLogic ARGS`` under strace with a fresh HOME and umask 022; returns the result and
    its network attempts. Also fails on any file left under HOME outside PTQSeg's cache."""
    home, log = tmp_path / f"home-{name}", tmp_path / f"strace-{name}.log"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ENV_DEFAULTS}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    command = [STRACE, "-f", "--seccomp-bpf", "-qq", "-e", f"trace={SYSCALLS}", "-o", str(log),
               sys.executable, "-m", "PTQLogic", *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8",
                            errors="replace", timeout=timeout, preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, (name, result.stderr[-3000:])
    written = home_files(home)
    assert not [e for e in written if e.startswith(FORBIDDEN_IN_HOME)], (name, written)
    assert not written, f"{name} wrote under HOME outside {ALLOWED_IN_HOME}: {written}"
    return result, network_attempts(log.read_text(errors="replace"))


def assert_umask_modes(*paths: Path) -> None:
    """Outputs follow the umask (022: folders 0755, files 0644); they were once 0700/0600."""
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


@pytest.fixture(scope="module")
def traced_quantize(phantom_files, tmp_path_factory):
    """`quantize` of the sample UNet on two patches, traced: its result and the model folder it wrote."""
    tmp = tmp_path_factory.mktemp("no-network")
    model = tmp / "model"
    result, attempts = traced(["quantize", "--model", SAMPLE_UNET, "--calibration", *phantom_files["calibration"],
                               "--out", model, "--patches", "2"], tmp, "quantize")
    return model, attempts


def test_quantize_info_and_build(traced_quantize, tmp_path):
    model, attempts = traced_quantize
    assert attempts == []
    assert_umask_modes(model, *model.iterdir())
    _, attempts = traced(["info"], tmp_path, "info")
    assert attempts == []
    _, attempts = traced(["build", "--model", model, "--runtime", "openvino"], tmp_path, "build")
    assert attempts == []


@pytest.mark.parametrize("runtime", ["auto", "onnxruntime"])
def test_segment(traced_quantize, phantom_files, runtime, tmp_path):
    model, _ = traced_quantize
    output = tmp_path / "labels.nii.gz"
    _, attempts = traced(["segment", "--model", model, "--input", phantom_files["image"], "--output", output,
                          "--runtime", runtime], tmp_path, f"segment-{runtime}")
    assert attempts == []
    assert_umask_modes(output)


def test_evaluate_and_benchmark(traced_quantize, phantom_files, tmp_path):
    _, attempts = traced(["evaluate", "--prediction", phantom_files["truth"], "--reference", phantom_files["truth"]],
                         tmp_path, "evaluate")
    assert attempts == []
    model, _ = traced_quantize
    bench = tmp_path / "bench"
    _, attempts = traced(["benchmark", "--model", model, "--input", phantom_files["image"], "--out", bench,
                          "--runtimes", "onnxruntime", "--precisions", "int8", "--repeats", "1", "--warmup", "1"],
                         tmp_path, "benchmark")
    assert attempts == []
    assert (bench / "latency_vs_size.png").is_file()  # matplotlib ran: its caches went to ~/.cache/ptqseg
    assert_umask_modes(bench, *bench.iterdir())


def test_segment_batch_local_ray_cluster(traced_quantize, phantom_files, tmp_path):
    """Ray: no usage stats, no cloud-metadata requests, node IP 127.0.0.1 (not learned from 8.8.8.8), every
    listening socket on loopback, its auth token kept out of ~/.ray, and no ``E ... core_worker.cc`` line."""
    pytest.importorskip("ray")
    model, _ = traced_quantize
    inputs = tmp_path / "cohort"
    inputs.mkdir()
    shutil.copy(phantom_files["image"], inputs / "case1.nii.gz")
    result, attempts = traced(["segment-batch", "--model", model, "--inputs", inputs, "--output-dir",
                               tmp_path / "labels", "--workers", "1"], tmp_path, "segment-batch")
    assert attempts == []
    assert (tmp_path / "labels" / "case1_labels.nii.gz").is_file()
    assert "core_worker.cc" not in result.stderr, result.stderr


def test_demo(tmp_path):
    """The main job of the README: phantoms, quantize, FP32 and INT8 on the best engine; its files go to the
    ptqseg cache folder under HOME, nothing else does."""
    result, attempts = traced(["demo", "--runtime", "onnxruntime"], tmp_path, "demo", timeout=600)
    assert attempts == []
    assert "agreement" in result.stdout.lower(), result.stdout[-2000:]


def test_the_trace_catches_what_it_must(tmp_path):
    """The check itself fails on a non-loopback connect (IPv4, IPv6), DNS on loopback and a bind on all
    addresses. UDP connects only: no packet is sent."""
    code = ("import socket\n"
            "for family, address in ((socket.AF_INET, ('203.0.113.7', 9)), (socket.AF_INET6, ('2001:db8::7', 9)),\n"
            "                        (socket.AF_INET, ('127.0.0.1', 53))):\n"
            "    with socket.socket(family, socket.SOCK_DGRAM) as s:\n"
            "        try:\n"
            "            s.connect(address)\n"
            "        except OSError:\n"
            "            pass\n"
            "with socket.socket() as s:\n"
            "    s.bind(('0.0.0.0', 0))\n"
            "with socket.socket() as s:\n"
            "    s.bind(('127.0.0.1', 0))\n")
    log = tmp_path / "strace.log"
    subprocess.run([STRACE, "-f", "--seccomp-bpf", "-qq", "-e", f"trace={SYSCALLS}", "-o", str(log),
                    sys.executable, "-c", code], check=True, timeout=60)
    attempts = network_attempts(log.read_text())
    for expected in ("203.0.113.7", "2001:db8::7", 'htons(53), sin_addr=inet_addr("127.0.0.1")', "0.0.0.0"):
        assert [line for line in attempts if expected in line], (expected, attempts)
    assert len(attempts) == 4, attempts  # the loopback bind is not one
