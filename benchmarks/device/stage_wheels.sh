#!/usr/bin/env bash
# Wheels for a lent GPU machine, in pieces small enough to carry: every package of wheels.txt at the version
# constraints.txt holds (pinned, or the cap), for the machine's Python (PYVER, default 3.12) on x86-64 Linux, as
# DEST/wheels.tar split into DEST/p1, DEST/p2, ... (PIECE_MIB each, default 42: a device call carries 64 MiB with
# the ~18 MiB work tree)
# and DEST/wheels.sha. DEST must be git-ignored (default .device/, which is). Needs the network; run here, never
# there. A package published only as source (acvl-utils) is built into a pure-Python wheel here.
#   benchmarks/device/stage_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.device}; PYVER=${PYVER:-3.12}; PIECE_MIB=${PIECE_MIB:-42}
mkdir -p "$DEST/wheels"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 linux_x86_64 any)
PLATFORM_ARGS=(); for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done
version_of() {  # the pinned version of a package in constraints.txt (names compared as pip does)
  python - "$1" <<'PY'
import sys
from packaging.utils import canonicalize_name
want = canonicalize_name(sys.argv[1])
for line in open("constraints.txt"):  # pinned (==), or capped (<=) at the version CI tested
    name, sep, version = line.strip().partition("==")
    if not sep:
        name, sep, version = line.strip().partition("<=")
    if sep and not name.startswith("#") and canonicalize_name(name) == want:
        print(version)
        break
else:
    sys.exit(f"{sys.argv[1]} has no tested version in constraints.txt")
PY
}
for name in $(grep -v '^#' benchmarks/device/wheels.txt); do
  requirement="$name==$(version_of "$name")"
  pip download -q -d "$DEST/wheels" --no-deps --only-binary=:all: --python-version "$PYVER" "${PLATFORM_ARGS[@]}" \
      "$requirement" 2> /dev/null && continue
  # source only: a wheel built here serves there only if it is pure Python
  rm -rf "$DEST/built" && pip wheel -q --no-deps -w "$DEST/built" "$requirement" 2> /dev/null || true
  ls "$DEST"/built/*-py3-none-any.whl > /dev/null 2>&1 \
    || { echo "stage_wheels: no wheel of $requirement for Python $PYVER on x86-64 Linux" >&2; exit 1; }
  mv "$DEST"/built/*-py3-none-any.whl "$DEST/wheels/" && rm -rf "$DEST/built"
done
rm -rf "$DEST"/p[0-9]* && tar cf "$DEST/wheels.tar" -C "$DEST/wheels" .
sha256sum "$DEST/wheels.tar" | cut -d' ' -f1 > "$DEST/wheels.sha"
split -b "${PIECE_MIB}M" -d -a 2 "$DEST/wheels.tar" "$DEST/wheels.tar.part"
i=1
for part in "$DEST"/wheels.tar.part*; do mkdir -p "$DEST/p$i" && mv "$part" "$DEST/p$i/"; i=$((i + 1)); done
rm "$DEST/wheels.tar"
echo "stage_wheels: $(ls "$DEST/wheels" | wc -l) wheels, $(du -sh "$DEST/wheels" | cut -f1)," \
     "in $((i - 1)) pieces under $DEST"
