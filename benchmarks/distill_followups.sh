#!/usr/bin/env bash
# The follow-up runs of docs/results.md#recovery (run 2), side by side on one GPU:
#   bash benchmarks/distill_followups.sh IMAGES_ROOT OUT_DIR
set -u
root=${1:?images root}; out=${2:?output folder}
mkdir -p "$out"
c=(--threads 2 --workers 2 --device "${DEVICE:-cuda}" --batch-size 16)
run() { local n=$1; shift; timeout 300 python3 benchmarks/distill_lite0.py "$root" "${c[@]}" "$@" --json "$out/$n.json" >"$out/$n.log" 2>&1; echo "[$n exit $?]" >>"$out/$n.log"; }
run blurpool_e3 --mode blurpool --keep-first 0 --epochs 3 --variants norm+head-frozen-recal &
run blurpool_e10 --mode blurpool --keep-first 0 --epochs 10 --variants norm+head-frozen,norm+head-frozen-recal,all-frozen-recal &
run spectral_e3 --mode spectral --keep-first 0 --epochs 3 --variants norm+head-frozen-recal &
run spectral_e10 --mode spectral --keep-first 0 --epochs 10 --variants norm+head-frozen,norm+head-frozen-recal,all-frozen-recal &
run diffstride_e10 --mode diffstride --keep-first 0 --epochs 10 --variants norm+head-frozen,norm+head-frozen-recal &
run checkered_fm_std --mode checkered --keep-first 0 --fm-epochs 20 --fm-augment standard --variants fm &
run blurpool_fm_std --mode blurpool --keep-first 0 --fm-epochs 20 --fm-augment standard --variants fm-frozen &
wait
for f in "$out"/*.log; do echo "=== $f"; grep -v -i "warning" "$f"; done >"$out/log.txt"
rm -f "$out"/*.log
