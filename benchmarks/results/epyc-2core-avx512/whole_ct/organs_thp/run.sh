#!/bin/bash
# the organ part's INT8 row on the 2-core EPYC with and without torch's THP allocations / glibc malloc settings
cd /work/main
base=(python benchmarks/nnunet/whole_ct.py --config total --parts 1 --weights /work/tw/set49 --work /work/wct --labels /work/shared/data/totalsegmentator_total_labels.json --threads 2 --no-guard --calibration-patches 4 --exclude-nodes '^/encoder/stages\.0/stages\.0\.0/convs/convs\.0/' '^/decoder/seg_layers\.' --equalize --rows int8 --repeats 2 --no-probe)
for v in plain thp plain2 thp2; do
  case $v in
    thp*) env THP_MEM_ALLOC_ENABLE=1 "${base[@]}" --note "organ part, THP_MEM_ALLOC_ENABLE=1" --out /work/exp/s50/thp/$v.json > /work/exp/s50/thp/$v.log 2>&1 ;;
    plain*) "${base[@]}" --note "organ part, defaults" --out /work/exp/s50/thp/$v.json > /work/exp/s50/thp/$v.log 2>&1 ;;
  esac
done
echo done > /work/exp/s50/thp/finished
