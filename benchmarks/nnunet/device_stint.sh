#!/usr/bin/env bash
# Issue 25's whole 16-core table in one stint on a lent GPU machine, where neither the trained weights nor the
# machine outlast a session: train the 5-part 'total' set on the GPU (the organ part, the longest, in its own
# process), quantize the other parts on the CPU while the organ part still trains (whole_ct.py --prepare-parts),
# then run the CPU table with the GPU hidden (whole_ct.py; the organ part is quantized first).
#   OUT=/root/res WORK=/root/stint LABELS=.../totalsegmentator_total_labels.json benchmarks/nnunet/device_stint.sh
# Environment (defaults in brackets): OUT, WORK (required); LABELS [shapes.TOTAL_LABELS]; DEVICE [cuda];
# ORGANS: the organ part's training options [--phantoms 32 --part-steps organs=3500 --class-draw by-voxel];
# ORGANS_FROM: a folder holding an organ part trained earlier (Dataset*_organs, as the training writes it): used
#   instead of training one, and quantized on the CPU while the other parts train (they then set the pace);
# SET_FROM: a folder holding all five parts (e.g. carry_weights.py unpack's): nothing trains, all are quantized;
# QUANTIZED_FROM (with SET_FROM): the five INT8 parts quantized elsewhere with the same settings (<part>/ folders,
#   as whole_ct.py writes them): nothing is quantized here either (whole_ct.py --quantized-from);
# OTHERS: the other parts' [--phantoms 16 --part-steps vertebrae=1000 cardiac=1000 muscles=10 ribs=10];
# QUANTIZE: the INT8 parts' options [the committed AMX run's: --no-guard, 4 patches, first conv and head in FP32];
# ROWS [--rows fp32-torch int8 nnunetv2 --once fp32-torch nnunetv2 --row-timeout nnunetv2=270 --repeats 3]; with
#   a GPU row (fp32-torch-cuda: the FP32 reference in a minute, not fp32-torch's five) the GPU stays visible;
# PYTHON [python]; EXTRA: options for every script (tests: --tiny-networks --shape ...); NOTE: the table's header line.
# Parts trained here are rounded to fp16 values and packed into $OUT/packs (benchmarks/training/carry_weights.py:
# chunks of 16 MiB) before they are quantized: copy them off the machine while the stint goes on.
# The other parts train quickest first (muscles, ribs, vertebrae, cardiac); each is packed and quantized as soon as
# its checkpoint lands, while the next trains. Parts are quantized in one process each (much of quantizing is
# serial), torch's threads shared out (not taskset: ONNX Runtime pins its threads to cores outside a reduced mask).
# $OUT/times gets one line per finished step (seconds since the epoch); $WORK/stop_before_table skips the table.
# Start it detached (setsid nohup) and poll with calls back to back: a lent machine left idle for 30 s is given
# back, and everything on it (here: the trainings) is lost.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT}" "${WORK:?set WORK}"
mkdir -p "$OUT" "$WORK"
LABELS_ARG=(); [ -n "${LABELS:-}" ] && LABELS_ARG=(--labels "$LABELS")
TRAIN=("${PYTHON:-python}" benchmarks/training/train_totalseg_phantoms.py --config total --device "${DEVICE:-cuda}" --amp
       "${LABELS_ARG[@]}" ${EXTRA:-})
read -r -a QUANTIZE_ARGS <<< "${QUANTIZE:---no-guard --calibration-patches 4 --exclude-nodes ^/encoder/stages\.0/stages\.0\.0/convs/convs\.0/ ^/decoder/seg_layers\.}"
TABLE=("${PYTHON:-python}" benchmarks/nnunet/whole_ct.py ${EXTRA:-} --config total --weights "$WORK/set" --work "$WORK/ct"
       "${LABELS_ARG[@]}" "${QUANTIZE_ARGS[@]}")
FROM_ARG=(); [ -n "${QUANTIZED_FROM:-}" ] && FROM_ARG=(--quantized-from "$QUANTIZED_FROM")
step() { echo "$1 $(date +%s)" >> "$OUT/times"; }
step start
prepare() {  # quantize the named parts, one process each ($THREADS torch threads each, else the cores shared out)
  local pids=() part threads=${THREADS:-$(( $(nproc) / $# > 1 ? $(nproc) / $# : 1 ))}
  for part in "$@"; do
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=$threads "${TABLE[@]}" --prepare-parts "$part" \
      > "$OUT/prepare_$part.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || return 1; done
}
QUARTER=$(( $(nproc) / 4 > 1 ? $(nproc) / 4 : 1 ))  # torch threads of a part quantized beside other work
trained() { ls "$WORK"/set/Dataset*_"$1"/*/fold_0/checkpoint_final.pth > /dev/null 2>&1; }
pack() { "${PYTHON:-python}" benchmarks/training/carry_weights.py pack "$WORK/set" "$OUT/packs" --only "$@" >> "$OUT/pack.log" 2>&1; }
OTHER_PARTS=(muscles ribs vertebrae cardiac)  # the order they train in: quick ones first
train_others() {  # train the other parts; pack and quantize each as soon as its checkpoint is written
  local workers=$1 trainer part pid quantizing=()
  "${TRAIN[@]}" ${OTHERS:---phantoms 16 --part-steps vertebrae=1000 cardiac=1000 muscles=10 ribs=10} \
    --only "${OTHER_PARTS[@]}" --threads 4 --draw-workers "$workers" --out "$WORK/set" --work "$WORK/ct" \
    > "$OUT/train_others.log" 2>&1 &
  trainer=$!
  for part in "${OTHER_PARTS[@]}"; do
    until trained "$part"; do  # (the trainer may have written it and ended since the first look)
      kill -0 "$trainer" 2> /dev/null || trained "$part" || { step others-failed; return 1; }
      sleep 2
    done
    step "$part-trained"
    pack "$part" || { step pack-failed; return 1; }
    THREADS=$QUARTER prepare "$part" &
    quantizing+=($!)
  done
  wait "$trainer" || { step others-failed; return 1; }
  step others-trained
  for pid in "${quantizing[@]}"; do wait "$pid" || { step prepare-failed; return 1; }; done
  step others-quantized
}
if [ -n "${SET_FROM:-}" ]; then
  for part in organs "${OTHER_PARTS[@]}"; do
    ls -d "$SET_FROM"/Dataset*_"$part" > /dev/null 2>&1 || { step "set-missing-$part"; exit 1; }
  done
  mkdir -p "$WORK/set" && cp -r "$SET_FROM"/Dataset* "$WORK/set/" && step set-given
  if [ -n "${QUANTIZED_FROM:-}" ]; then
    step set-quantized-elsewhere  # the table copies them in
  else
    prepare organs "${OTHER_PARTS[@]}" || { step "prepare-failed"; exit 1; }
    step set-quantized
  fi
else
  organs=""
  if [ -z "${ORGANS_FROM:-}" ]; then
    # the organ part's own CT folder, so that the two trainings never write the same CT at once
    "${TRAIN[@]}" ${ORGANS:---phantoms 32 --part-steps organs=3500 --class-draw by-voxel} --only organs --threads 6 \
      --draw-workers 10 --out "$WORK/organs" --work "$WORK/ct-organs" > "$OUT/train_organs.log" 2>&1 &
    organs=$!
  elif ! ls -d "$ORGANS_FROM"/Dataset*_organs > /dev/null 2>&1; then
    step "organs-missing"; exit 1
  else
    mkdir -p "$WORK/set" && cp -r "$ORGANS_FROM"/Dataset*_organs "$WORK/set/" && step organs-given
    THREADS=$QUARTER prepare organs &
    organs=$!
  fi
  # phantoms are drawn on the CPU (about 40 s and 3 GB each): more at once where no organ part trains beside them
  train_others "$([ -z "${ORGANS_FROM:-}" ] && echo 6 || echo 12)" || exit 1
  if [ -z "${ORGANS_FROM:-}" ]; then
    wait "$organs" || { step "organs-failed"; exit 1; }
    step organs-trained
    cp -r "$WORK"/organs/Dataset*_organs "$WORK/set/" && cp "$WORK/organs/training_total.json" "$OUT/training_organs.json"
    pack organs || { step "pack-failed"; exit 1; }
    step organs-packed
  else
    wait "$organs" || { step "organs-prepare-failed"; exit 1; }
    step organs-quantized
  fi
  cp "$WORK/set/training_total.json" "$OUT/training_others.json"
fi
[ -f "$WORK/stop_before_table" ] && { step stopped-before-table; exit 0; }
read -r -a ROW_ARGS <<< "${ROWS:---rows fp32-torch int8 nnunetv2 --once fp32-torch nnunetv2 --row-timeout nnunetv2=270 --repeats 3}"
GPU=(env CUDA_VISIBLE_DEVICES=)  # the CPU table with the GPU hidden, unless a GPU row (the FP32 reference) is asked
case " ${ROW_ARGS[*]} " in *-cuda\ *|*-tensorrt\ *) GPU=(env) ;; esac
"${GPU[@]}" "${TABLE[@]}" "${FROM_ARG[@]}" "${ROW_ARGS[@]}" --no-probe \
  --note "${NOTE:-set trained in this stint}" --out "$OUT/total_table.json" > "$OUT/table.log" 2>&1 \
  || { step "table-failed"; exit 1; }
step table-done
