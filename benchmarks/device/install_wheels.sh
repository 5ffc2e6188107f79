#!/usr/bin/env bash
# On the lent machine: join the carried pieces (PIECES, default /root/pieces), check them against wheels.sha, and
# install every wheel into SITE (default /root/site; use it as PYTHONPATH) for the machine's own torch Python (PY).
# pip is used where that Python has it; else the wheels are unzipped (none of wheels.txt has a .data lib folder).
#   benchmarks/device/install_wheels.sh SHA_FILE
set -euo pipefail
PY=${PY:-/opt/torch/.venv/bin/python3}; PIECES=${PIECES:-/root/pieces}; SITE=${SITE:-/root/site}
want=$(cat "${1:?the wheels.sha that stage_wheels.sh wrote}")
work=$(mktemp -d)
cat $(ls "$PIECES"/wheels.tar.part* | sort) > "$work/wheels.tar"
got=$(sha256sum "$work/wheels.tar" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  echo "install_wheels: pieces joined to sha256 $got, want $want (a piece missing?)" >&2
  exit 1
fi
mkdir -p "$work/wheels" && tar xf "$work/wheels.tar" -C "$work/wheels" && rm -rf "$SITE" && mkdir -p "$SITE"
if "$PY" -m pip --version > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$work"/wheels/*.whl
else
  "$PY" -c "import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob(sys.argv[2])]" \
    "$SITE" "$work/wheels/*.whl"
fi
rm -rf "$work"
cd "$(dirname "$0")/../.."
PYTHONPATH="$SITE:$PWD" "$PY" -c "
import torch, numpy, openvino, onnxruntime, monai, modelopt.onnx.quantization, nnunetv2.inference.predict_from_raw_data
import nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring, PTQLogic.pipeline
print('install_wheels: imports ok; torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'numpy', numpy.__version__)"
