"""Write constraints.txt: the installed version of every package the CPU CI set pulls in.

Run in the environment CI tested (after `.ci/run` installed it): `python .ci/freeze_constraints.py`.
It walks the requirements of `ptqsegmentation[cpu,nnunet,cluster,test]` through the installed
packages' metadata (markers evaluated for this machine) and pins each one found to its installed
version, like `pip freeze` restricted to what the project needs (no tools that merely share the
environment, no local version labels such as `+cpu`). Packages whose exact pin would make the GPU set
unresolvable get an upper bound at the tested version instead (AT_MOST; README "Tested versions").
"""
from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT, EXTRAS = "ptqsegmentation", ("cpu", "nnunet", "cluster", "test")
# nvidia-modelopt[onnx] (the gpu set) asks older versions of these than the CPU set installs (ModelOpt
# 0.47: onnx~=1.21.0; onnxruntime~=1.24.2 on aarch64 and macOS). `==` would leave `.[gpu]` with no solution;
# `<=` the tested version still gives the CPU set exactly that version (pip takes the newest allowed).
AT_MOST = {"onnx", "onnxruntime"}
NOT_PINNED = {"argparse", "pip", "setuptools", "wheel"}  # what pip freeze leaves out too (stdlib, installers)
HEADER = """\
# Versions CI tested: the CPU install set `.[cpu,nnunet,cluster,test]` with torch 2.13.0 on Python {python}
# (Linux x86-64), as .ci/run installed it. Made by `python .ci/freeze_constraints.py`: the dependency
# closure of those extras from the installed packages' metadata (pip freeze restricted to what the project
# pulls in; local labels such as torch's `+cpu` dropped).
# Used by the README's install line and .ci/run: pip install -c constraints.txt -e ".[SET,...]" torch==2.13.0
# {at_most} are capped at the tested version (`<=`), not pinned: pip still installs the tested
# version for the CPU set, and the gpu set's nvidia-modelopt[onnx] can take the older ones it asks for
# (onnx~=1.21 with ModelOpt 0.47; onnxruntime~=1.24 on aarch64). What only the gpu set brings
# (onnxruntime-gpu, cupy-cuda12x, tensorrt, polygraphy) is not installed by CI and not pinned.
# pyproject.toml keeps ranges for library users; to test the newest versions: `.ci/run --newest`.
"""


def closure() -> dict[str, str]:
    """Canonical name -> installed version of every package reachable from the project's extras."""
    pinned: dict[str, str] = {}
    queue = [(PROJECT, set(EXTRAS))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        name, extras = queue.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency this environment does not have
        if canonicalize_name(name) != PROJECT:
            pinned[canonicalize_name(name)] = re.sub(r"\+.*$", "", dist.version)
        for text in dist.requires or []:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker and not any(requirement.marker.evaluate(env) for env in environments):
                continue
            queue.append((requirement.name, set(requirement.extras)))
    return pinned


def main() -> int:
    pinned = {name: version for name, version in closure().items() if name not in NOT_PINNED}
    python = ".".join(map(str, sys.version_info[:2]))
    lines = [HEADER.format(python=python, at_most=" and ".join(sorted(AT_MOST)))]
    lines += [f"{name}{'<=' if name in AT_MOST else '=='}{version}\n" for name, version in sorted(pinned.items())]
    (ROOT / "constraints.txt").write_text("".join(lines), encoding="utf-8")
    print(f"constraints.txt: {len(pinned)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
