#!/usr/bin/env bash
# One GPU lease: generate training data ON the machine, fine-tune detector-agnostic ALIKED-LightGlue, export
# fp16 shards + logs to $OUT. Needs .whl (kornia wheels) and .gpu/weights (fmr export-weights) carried.
#   PAIRS_PER_PROC (train pairs per generator process, 16 processes), EVAL_PAIRS, BUDGET_S (whole script).
set -o pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-550}
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pairs
PROCS=${PROCS:-16}
N=${PAIRS_PER_PROC:-72}
for i in $(seq 1 "$PROCS"); do
  $PY -m feature_matching_ros.cli make-pairs /tmp/pairs/train_$i --n "$N" --seed "$i" --split train --overwrite \
    ${SIZE:+--width ${SIZE%x*} --height ${SIZE#*x}} >/tmp/pairs/gen_$i.log 2>&1 &
done
E=${EVAL_PAIRS:-96}
$PY -m feature_matching_ros.cli make-pairs /tmp/pairs/eval_a --n $((E / 2)) --seed 100 --split eval --overwrite \
  ${SIZE:+--width ${SIZE%x*} --height ${SIZE#*x}} >/tmp/pairs/gen_ea.log 2>&1 &
$PY -m feature_matching_ros.cli make-pairs /tmp/pairs/eval_b --n $((E / 2)) --seed 101 --split eval --overwrite \
  ${SIZE:+--width ${SIZE%x*} --height ${SIZE#*x}} >/tmp/pairs/gen_eb.log 2>&1 &
wait
tail -n 2 /tmp/pairs/gen_*.log > "$OUT/gen.log"
echo "pairs generated in $(( $(date +%s) - START )) s: $(ls /tmp/pairs/train_*/pair_*.npz | wc -l) train" | tee -a "$OUT/gen.log"
DEADLINE=$(( START + BUDGET_S - ${EXPORT_MARGIN_S:-25} ))
$PY -m feature_matching_ros.cli train lightglue --train /tmp/pairs/train_* --eval /tmp/pairs/eval_a /tmp/pairs/eval_b \
  --out /tmp/run --cache /tmp/cache --max-keypoints "${KP:-512}" --batch-size "${BS:-32}" --steps "${STEPS:-100000}" \
  --deadline "$DEADLINE" --log-every "${LOG_EVERY:-50}" --checkpoint-every 0 --export "$OUT/weights" "$@" \
  2>&1 | grep -v "^extract: " | tee "$OUT/train.log"
rc=$?
cp /tmp/run/validation.json /tmp/run/history.json "$OUT/" 2>/dev/null
echo "total $(( $(date +%s) - START )) s, rc $rc" | tee -a "$OUT/train.log"
exit $rc
