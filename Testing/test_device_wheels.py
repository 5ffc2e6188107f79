"""benchmarks/device/: the wheels a lent GPU machine gets for issue 25's stint. Every listed package has its tested
version in constraints.txt (staging would stop on the first that is not), and install_wheels.sh joins carried
pieces, refuses a set with a piece missing, and installs the wheels where PYTHONPATH finds them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "benchmarks" / "device"


def test_every_device_package_is_pinned_in_constraints():
    pinned = {canonicalize_name(line.replace("<=", "==").split("==")[0])  # pinned, or capped at the tested version
              for line in (ROOT / "constraints.txt").read_text().splitlines()
              if ("==" in line or "<=" in line) and not line.startswith("#")}
    listed = [line.strip() for line in (DEVICE / "wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed and [n for n in listed if canonicalize_name(n) not in pinned] == []
    assert {"nnunetv2", "openvino", "onnxruntime", "nvidia-modelopt", "batchgeneratorsv2"} <= set(listed)
    assert "torch" not in listed  # the machine's own CUDA build stays


def _wheel(folder: Path, name: str) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "ANSWER = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _pieces(tmp_path: Path, count: int) -> tuple[Path, Path]:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("carried_one", "carried_two"):
        _wheel(wheels, name)
    tar = tmp_path / "wheels.tar"
    with tarfile.open(tar, "w") as t:
        for w in sorted(wheels.iterdir()):
            t.add(w, arcname=w.name)
    data = tar.read_bytes()
    sha = tmp_path / "wheels.sha"
    sha.write_text(hashlib.sha256(data).hexdigest() + "\n")
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    size = -(-len(data) // count)
    for i in range(count):
        (pieces / f"wheels.tar.part{i:02d}").write_bytes(data[i * size:(i + 1) * size])
    return pieces, sha


def _install(pieces: Path, sha: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PY=sys.executable, PIECES=str(pieces), SITE=str(site))
    return subprocess.run(["bash", str(DEVICE / "install_wheels.sh"), str(sha)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_carried_pieces_are_joined_checked_and_installed(tmp_path):
    pieces, sha = _pieces(tmp_path, 3)
    done = _install(pieces, sha, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imports ok" in done.stdout
    found = subprocess.run([sys.executable, "-c", "import carried_one, carried_two; print(carried_two.ANSWER)"],
                           env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")), capture_output=True, text=True)
    assert found.stdout.strip() == "42", found.stderr


def test_a_missing_piece_is_refused_before_anything_is_installed(tmp_path):
    pieces, sha = _pieces(tmp_path, 3)
    (pieces / "wheels.tar.part01").unlink()
    site = tmp_path / "site"
    done = _install(pieces, sha, site)
    assert done.returncode == 1
    assert "a piece missing?" in done.stderr and not site.exists()


@pytest.mark.slow  # about two minutes: the tiny stint of test_device_stint.py behind the install
def test_the_stint_installs_the_carried_wheels_then_trains_quantizes_and_runs_the_table(tmp_path):
    """total_stint.sh as a lent machine runs it, on the CPU with tiny networks: the wheels installed first, the
    stint's steps in order, and the table's rows on the trained set."""
    pieces, sha = _pieces(tmp_path, 2)
    out = tmp_path / "res"
    labels = ROOT.parent / "shared" / "data" / "totalsegmentator_total_labels.json"
    env = dict(os.environ, PY=sys.executable, PIECES=str(pieces), SITE=str(tmp_path / "site"), OUT=str(out),
               WORK=str(tmp_path / "work"), DEVICE="cpu",
               EXTRA="--tiny-networks --shape 48 48 32 --spacing 1.5 1.5 1.5",
               ORGANS="--phantoms 2 --part-steps organs=2 --class-draw mixed",
               OTHERS="--phantoms 2 --part-steps vertebrae=2 cardiac=2 muscles=1 ribs=1",
               ROWS="--rows int8 fp32-torch nnunetv2 --once fp32-torch nnunetv2 --repeats 1")
    args = [str(sha), str(labels)] if labels.is_file() else [str(sha), ""]
    done = subprocess.run(["bash", str(DEVICE / "total_stint.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=1200)
    steps = [line.split()[0] for line in (out / "times").read_text().splitlines()]
    assert steps[:3] == ["begin", "installed", "start"] and steps[-2:] == ["table-done", "stint-exit"], (
        steps, done.stderr[-2000:])
    assert (out / "times").read_text().splitlines()[-1].split()[1] == "0"
    assert (tmp_path / "site" / "carried_one").is_dir() and "imports ok" in (out / "install.log").read_text()
    result = json.loads((out / "total_table.json").read_text())
    assert result["settings"]["equalize"] and result["settings"]["guard"] is False
    rows = result["configs"]["total"]["repeats"][0]["rows"]
    assert set(rows) == {"int8", "fp32-torch", "nnunetv2"} and all(r["seconds"] > 0 for r in rows.values())
