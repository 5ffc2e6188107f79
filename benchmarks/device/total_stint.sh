#!/usr/bin/env bash
# On the lent machine, detached (setsid nohup): install the carried wheels, then device_stint.sh with issue 25's
# recipe into OUT (default /root/res): train the 5-part set on the GPU (organ part recipe B), quantize every part
# with --equalize, then the table: INT8 on OpenVINO 3 times, nnunetv2's CPU predictor once (stopped after
# NNU_TIMEOUT s, default 320: its clock then passes 5x an INT8 run of 60 s), and the FP32 reference once on the GPU
# (fp32-torch-cuda, about a minute instead of fp32-torch's five on the CPU).
# DEVICE, ORGANS, OTHERS, ROWS, EXTRA replace the recipe's (Testing/test_device_wheels.py: the CPU, tiny networks).
#   benchmarks/device/total_stint.sh SHA_FILE LABELS_JSON
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/root/res}; mkdir -p "$OUT"
echo "begin $(date +%s)" >> "$OUT/times"
if ! bash benchmarks/device/install_wheels.sh "$1" > "$OUT/install.log" 2>&1; then
  echo "install-failed $(date +%s)" >> "$OUT/times"
  exit 1
fi
echo "installed $(date +%s)" >> "$OUT/times"
export PYTHONPATH=${SITE:-/root/site}
(nvidia-smi -L; lscpu | head -20; grep -o -E "avx512_vnni|amx_tile" /proc/cpuinfo | sort | uniq -c; free -g) \
  > "$OUT/machine.txt" 2>&1
KEEP_FP32='--exclude-nodes ^/encoder/stages\.0/stages\.0\.0/convs/convs\.0/ ^/decoder/seg_layers\.'
RECIPE_ROWS="--rows int8 fp32-torch-cuda nnunetv2 --once fp32-torch-cuda nnunetv2 --repeats 3"
RECIPE_ROWS+=" --row-timeout nnunetv2=${NNU_TIMEOUT:-320}"  # one line: device_stint.sh reads it with read -a
RECIPE="5-part set trained in this stint (organ part recipe B: mixed class draw, 3500 steps, 32 CT-grid phantoms;"
RECIPE+=" the other four 11 phantoms, vertebrae and cardiac 600 steps, muscles and ribs 10), each part quantized"
RECIPE+=" here with --equalize (4 patches, no guard, first conv and head FP32); FP32 reference on the GPU"
RECIPE+=" (fp32-torch-cuda, TF32 off); 16-core AMX CPU of the GPU machine"
OUT=$OUT WORK=${WORK:-/root/stint} LABELS=$2 PYTHON=${PY:-/opt/torch/.venv/bin/python3} DEVICE=${DEVICE:-cuda} \
ORGANS=${ORGANS:-"--phantoms 32 --part-steps organs=3500 --class-draw mixed"} \
OTHERS=${OTHERS:-"--phantoms 11 --part-steps vertebrae=600 cardiac=600 muscles=10 ribs=10"} \
QUANTIZE="--no-guard --calibration-patches 4 --equalize $KEEP_FP32" ROWS=${ROWS:-$RECIPE_ROWS} NOTE="${NOTE:-$RECIPE}" \
bash benchmarks/nnunet/device_stint.sh
echo "stint-exit $? $(date +%s)" >> "$OUT/times"
