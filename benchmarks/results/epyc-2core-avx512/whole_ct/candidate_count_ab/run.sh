#!/bin/bash
# the 5-part INT8 row before (a89d275: count += can, an int16 copy per class) and after (6b73ac9: one int16 buffer), alternating, 2-core EPYC
for i in 1 2; do
  for v in old new; do
    tree=/work/main; [ $v = old ] && tree=/tmp/oldtree52
    cd $tree
    python benchmarks/nnunet/whole_ct.py --config total --weights /work/tw/set49 --work /work/wct --labels /work/shared/data/totalsegmentator_total_labels.json --threads 2 --no-guard --calibration-patches 4 --exclude-nodes '^/encoder/stages\.0/stages\.0\.0/convs/convs\.0/' '^/decoder/seg_layers\.' --equalize --rows int8 --repeats 1 --no-probe --note "5-part INT8 row, candidate count $v ($tree)" --out /work/exp/s52/ab/$v$i.json > /work/exp/s52/ab/$v$i.log 2>&1
    cp /work/wct/models-d1d9a2f1cf/labels/total/int8.nii.gz /work/exp/s52/ab/labels_$v$i.nii.gz
  done
done
(cd /work/exp/s52/ab && sha256sum labels_*.nii.gz > labels.sha256)
echo done > /work/exp/s52/ab/finished
