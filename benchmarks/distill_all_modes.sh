#!/usr/bin/env bash
# Issue 23's cross-validated table, every mode at once: one benchmarks/distill_lite0.py process per
# mode, side by side on one GPU (each is launch-bound at batch 16, so they share it well).
#   bash benchmarks/distill_all_modes.sh IMAGES_ROOT OUT_DIR [SECONDS]
# Writes OUT_DIR/<mode>.json after each fold (a run cut short keeps what it measured) and
# OUT_DIR/log.txt. On a CPU machine use distill_lite0.py directly, one mode at a time.
set -u
root=${1:?images root}; out=${2:?output folder}; seconds=${3:-520}
mkdir -p "$out"
common=(--threads 2 --workers 3 --device "${DEVICE:-cuda}" --batch-size 16 --epochs 3 --fm-epochs "${FM_EPOCHS:-20}")
run() {  # name, then distill_lite0.py's options
  local name=$1; shift
  timeout "$seconds" python3 benchmarks/distill_lite0.py "$root" "${common[@]}" "$@" --json "$out/$name.json" \
    >"$out/$name.log" 2>&1
  echo "[$name exit $?]" >>"$out/$name.log"
}
run checkered_kf0 --mode checkered --keep-first 0 --variants converted,recalibrated,norm+head-frozen,fm,fm-tta &
run checkered_kf3 --mode checkered --keep-first 3 --variants converted,recalibrated,norm+head-frozen,fm,fm-tta &
run blurpool --mode blurpool --keep-first 0 --variants converted,recalibrated,norm+head-frozen,fm,fm-frozen,fm-tta &
run spectral --mode spectral --keep-first 0 --variants converted,recalibrated,norm+head-frozen,fm,fm-frozen,fm-tta &
run diffstride --mode diffstride --keep-first 0 --variants converted,recalibrated,norm+head-frozen,fm,fm-tta &
wait
for f in "$out"/*.log; do echo "=== $f"; grep -v -i "warning" "$f"; done >"$out/log.txt"
rm -f "$out"/*.log
