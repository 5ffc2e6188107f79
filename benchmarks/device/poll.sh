#!/usr/bin/env bash
# On the lent machine: wait up to $1 seconds (less if the stint ends), print its progress, and put RES (default
# /root/res, packs left out) as res.tgz under $OUT, the folder a device call hands back. Call it back to back: a
# machine idle for 30 s is given back with everything on it.
RES=${RES:-/root/res}
end=$(( $(date +%s) + ${1:-60} ))
while [ "$(date +%s)" -lt "$end" ]; do
  grep -q "stint-exit\|install-failed" "$RES/times" 2> /dev/null && break
  sleep 5
done
echo "now $(date +%s)"; cat "$RES/times" 2> /dev/null
tail -n 2 "$RES/install.log" "$RES/train_organs.log" 2> /dev/null; tail -n 4 "$RES/table.log" 2> /dev/null
name=$(basename "$RES")
mkdir -p "$OUT" && tar czf "$OUT/res.tgz" -C "$(dirname "$RES")" --exclude="$name/packs" "$name"
