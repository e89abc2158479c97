#!/usr/bin/env bash
# Train several models side by side on one GPU until a common deadline: generate synthetic training pairs
# (fmr make-pairs, one process per core), then run the jobs concurrently and collect their fp16 weight files
# plus one logs.tar.gz in RESULTS_DIR.
#   bash scripts/train_models.sh RESULTS_DIR
# Needs kornia (+ faiss) and, for the sandesc_aliked job, the official ALIKED weights (carrier package, or
# FMR_WEIGHTS_DIR from fmr export-weights).
# Environment: JOBS ("eloftr sandesc_orb sandesc_aliked"), PROCS and PAIRS_PER_PROC (train pairs), EVAL_PAIRS,
#   TRAIN_S (seconds from the end of data generation to the training deadline), ELOFTR_ARGS, SANDESC_ARGS,
#   WORK_DIR (scratch space for pairs, runs and logs), REAL_TRAIN / REAL_EVAL (real pair sets from
#   scripts/build_real_pairs.py, mixed with the synthetic pairs), RUN_ROOT (run folders RUN_ROOT/run_JOB; with
#   RESUME=1 each job continues from its checkpoint.pt, see docs/REAL_DATA.md), STEPS and MULTI_SESSION=1 (a run
#   over several sessions: the schedule follows STEPS and each session ends with --stop-at instead of --deadline).
# Used for resource/eloftr and resource/sandesc (their MODEL_CARD.md give the exact call).
set -o pipefail
if [ $# -ne 1 ]; then echo "usage: $0 RESULTS_DIR" >&2; exit 2; fi
RESULTS_DIR=$1
START=$(date +%s)
PY=${PY:-python3}
WORK_DIR=${WORK_DIR:-$(mktemp -d)}
PAIRS=$WORK_DIR/pairs
LOGS=$WORK_DIR/logs
JOBS=${JOBS:-"eloftr sandesc_orb sandesc_aliked"}
mkdir -p "$RESULTS_DIR" "$PAIRS" "$LOGS"
PROCS=${PROCS:-$(nproc)}
N=${PAIRS_PER_PROC:-48}
for i in $(seq 1 "$PROCS"); do
  $PY -m feature_matching_ros.cli make-pairs "$PAIRS/train_$i" --n "$N" --seed "$i" --split train --overwrite \
    >"$LOGS/gen_$i.log" 2>&1 &
done
E=${EVAL_PAIRS:-64}
$PY -m feature_matching_ros.cli make-pairs "$PAIRS/eval_a" --n $((E / 2)) --seed 100 --split eval --overwrite \
  >"$LOGS/gen_ea.log" 2>&1 &
$PY -m feature_matching_ros.cli make-pairs "$PAIRS/eval_b" --n $((E / 2)) --seed 101 --split eval --overwrite \
  >"$LOGS/gen_eb.log" 2>&1 &
wait
echo "pairs generated in $(( $(date +%s) - START )) s: $(ls "$PAIRS"/train_*/pair_*.npz | wc -l) train" \
  | tee "$LOGS/gen.log"
DEADLINE=$(( $(date +%s) + ${TRAIN_S:-300} ))
RUN_ROOT=${RUN_ROOT:-$WORK_DIR}
STOP=(--deadline "$DEADLINE")
if [ -n "$MULTI_SESSION" ]; then STOP=(--stop-at "$DEADLINE"); fi
# shellcheck disable=SC2206
COMMON=(--train "$PAIRS"/train_* $REAL_TRAIN --eval "$PAIRS/eval_a" "$PAIRS/eval_b" $REAL_EVAL
        "${STOP[@]}" --steps "${STEPS:-1000000}" ${RESUME:+--resume})
for job in $JOBS; do
  case $job in
    # shellcheck disable=SC2086
    eloftr) $PY -m feature_matching_ros.cli train eloftr "${COMMON[@]}" --out "$RUN_ROOT/run_$job" \
              --checkpoint-every 0 --export "$WORK_DIR/export_$job" $ELOFTR_ARGS >"$LOGS/train_$job.log" 2>&1 & ;;
    # shellcheck disable=SC2086
    sandesc_*) $PY -m feature_matching_ros.cli train sandesc --detector "${job#sandesc_}" "${COMMON[@]}" \
                 --out "$RUN_ROOT/run_$job" --checkpoint-every 0 --export "$WORK_DIR/export_$job" $SANDESC_ARGS \
                 >"$LOGS/train_$job.log" 2>&1 & ;;
  esac
done
wait
for job in $JOBS; do
  echo "== $job"; grep -v "keypoints:" "$LOGS/train_$job.log" | tail -n 6
  cp "$RUN_ROOT/run_$job/history.json" "$LOGS/history_$job.json" 2>/dev/null
  cp "$RUN_ROOT/run_$job/validation.json" "$LOGS/validation_$job.json" 2>/dev/null
  cp "$WORK_DIR/export_$job"/*.json "$LOGS/" 2>/dev/null
  cp "$WORK_DIR/export_$job"/*.safetensors "$RESULTS_DIR/" 2>/dev/null
done
tar -czf "$RESULTS_DIR/logs.tar.gz" -C "$WORK_DIR" logs
echo "total $(( $(date +%s) - START )) s"
