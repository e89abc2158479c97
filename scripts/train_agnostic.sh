#!/usr/bin/env bash
# Fine-tune detector-agnostic ALIKED-LightGlue from scratch data in one time-budgeted run: generate synthetic
# training pairs (fmr make-pairs, one process per core), train until the budget, export fp16 shards + logs.
#   bash scripts/train_agnostic.sh RESULTS_DIR [extra `fmr train lightglue` options]
# Needs kornia and the official ALIKED weights (carrier package, or FMR_WEIGHTS_DIR from fmr export-weights).
# Environment: PAIRS_PER_PROC (train pairs per generator process), PROCS, EVAL_PAIRS, BUDGET_S (whole script),
# WORK_DIR (scratch space for pairs and the training run), SIZE (WxH of the generated pairs), KP, BS, STEPS,
# REAL_TRAIN / REAL_EVAL (real pair sets from scripts/build_real_pairs.py, mixed with the synthetic pairs),
# RUN_DIR (the run folder; with RESUME=1 training continues from RUN_DIR/checkpoint.pt, see docs/REAL_DATA.md),
# MULTI_SESSION=1 (a run over several sessions: the schedule follows STEPS and the session ends with --stop-at;
# otherwise --deadline ends both the session and the schedule).
set -o pipefail
if [ $# -lt 1 ]; then echo "usage: $0 RESULTS_DIR [fmr train lightglue options]" >&2; exit 2; fi
RESULTS_DIR=$1; shift
START=$(date +%s)
BUDGET_S=${BUDGET_S:-550}
PY=${PY:-python3}
WORK_DIR=${WORK_DIR:-$(mktemp -d)}
PAIRS=$WORK_DIR/pairs
mkdir -p "$RESULTS_DIR" "$PAIRS"
PROCS=${PROCS:-$(nproc)}
N=${PAIRS_PER_PROC:-72}
for i in $(seq 1 "$PROCS"); do
  $PY -m feature_matching_ros.cli make-pairs "$PAIRS/train_$i" --n "$N" --seed "$i" --split train --overwrite \
    ${SIZE:+--width ${SIZE%x*} --height ${SIZE#*x}} >"$PAIRS/gen_$i.log" 2>&1 &
done
E=${EVAL_PAIRS:-96}
$PY -m feature_matching_ros.cli make-pairs "$PAIRS/eval_a" --n $((E / 2)) --seed 100 --split eval --overwrite \
  ${SIZE:+--width ${SIZE%x*} --height ${SIZE#*x}} >"$PAIRS/gen_ea.log" 2>&1 &
$PY -m feature_matching_ros.cli make-pairs "$PAIRS/eval_b" --n $((E / 2)) --seed 101 --split eval --overwrite \
  ${SIZE:+--width ${SIZE%x*} --height ${SIZE#*x}} >"$PAIRS/gen_eb.log" 2>&1 &
wait
tail -n 2 "$PAIRS"/gen_*.log > "$RESULTS_DIR/gen.log"
echo "pairs generated in $(( $(date +%s) - START )) s: $(ls "$PAIRS"/train_*/pair_*.npz | wc -l) train" \
  | tee -a "$RESULTS_DIR/gen.log"
DEADLINE=$(( START + BUDGET_S - ${EXPORT_MARGIN_S:-25} ))
STOP=(--deadline "$DEADLINE")
if [ -n "$MULTI_SESSION" ]; then STOP=(--stop-at "$DEADLINE"); fi
RUN_DIR=${RUN_DIR:-$WORK_DIR/run}
# shellcheck disable=SC2086
$PY -m feature_matching_ros.cli train lightglue --train "$PAIRS"/train_* $REAL_TRAIN \
  --eval "$PAIRS/eval_a" "$PAIRS/eval_b" $REAL_EVAL \
  --out "$RUN_DIR" --cache "$WORK_DIR/cache" --max-keypoints "${KP:-512}" --batch-size "${BS:-32}" \
  --steps "${STEPS:-100000}" "${STOP[@]}" --log-every "${LOG_EVERY:-50}" --checkpoint-every 0 \
  ${RESUME:+--resume} --export "$RESULTS_DIR/weights" "$@" 2>&1 | grep -v "^extract: " | tee "$RESULTS_DIR/train.log"
rc=$?
cp "$RUN_DIR/validation.json" "$RUN_DIR/history.json" "$RESULTS_DIR/" 2>/dev/null
echo "total $(( $(date +%s) - START )) s, rc $rc" | tee -a "$RESULTS_DIR/train.log"
exit $rc
