#!/usr/bin/env bash
# One GPU lease: generate training pairs ON the machine, then train several models side by side on the one GPU
# until a common deadline, and bring back weights + logs through $OUT (at most 8 files of 16 MiB each: the
# weights files plus one logs.tar.gz). Needs the kornia (+ faiss) wheels installed on PYTHONPATH, and
# FMR_WEIGHTS_DIR with aliked_n16 (fmr export-weights) for the sandesc_aliked job.
#   JOBS ("eloftr sandesc_orb sandesc_aliked"), PROCS and PAIRS_PER_PROC (train pairs), EVAL_PAIRS,
#   TRAIN_S (seconds from the end of data generation to the training deadline), ELOFTR_ARGS, SANDESC_ARGS.
# Used for resource/eloftr and resource/sandesc (their MODEL_CARD.md give the exact call).
set -o pipefail
START=$(date +%s)
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
JOBS=${JOBS:-"eloftr sandesc_orb sandesc_aliked"}
mkdir -p "$OUT" /tmp/pairs /tmp/logs
PROCS=${PROCS:-16}
N=${PAIRS_PER_PROC:-48}
for i in $(seq 1 "$PROCS"); do
  $PY -m feature_matching_ros.cli make-pairs /tmp/pairs/train_$i --n "$N" --seed "$i" --split train --overwrite \
    >/tmp/logs/gen_$i.log 2>&1 &
done
E=${EVAL_PAIRS:-64}
$PY -m feature_matching_ros.cli make-pairs /tmp/pairs/eval_a --n $((E / 2)) --seed 100 --split eval --overwrite \
  >/tmp/logs/gen_ea.log 2>&1 &
$PY -m feature_matching_ros.cli make-pairs /tmp/pairs/eval_b --n $((E / 2)) --seed 101 --split eval --overwrite \
  >/tmp/logs/gen_eb.log 2>&1 &
wait
echo "pairs generated in $(( $(date +%s) - START )) s: $(ls /tmp/pairs/train_*/pair_*.npz | wc -l) train" \
  | tee /tmp/logs/gen.log
DEADLINE=$(( $(date +%s) + ${TRAIN_S:-300} ))
COMMON=(--train /tmp/pairs/train_* --eval /tmp/pairs/eval_a /tmp/pairs/eval_b --deadline "$DEADLINE" --steps 1000000)
for job in $JOBS; do
  case $job in
    # shellcheck disable=SC2086
    eloftr) $PY -m feature_matching_ros.cli train eloftr "${COMMON[@]}" --out /tmp/run_$job --checkpoint-every 0 \
              --export /tmp/export_$job $ELOFTR_ARGS >/tmp/logs/train_$job.log 2>&1 & ;;
    sandesc_*) $PY -m feature_matching_ros.cli train sandesc --detector "${job#sandesc_}" "${COMMON[@]}" \
                 --out /tmp/run_$job --checkpoint-every 0 --export /tmp/export_$job $SANDESC_ARGS \
                 >/tmp/logs/train_$job.log 2>&1 & ;;
  esac
done
wait
for job in $JOBS; do
  echo "== $job"; grep -v "keypoints:" /tmp/logs/train_$job.log | tail -n 6
  cp /tmp/run_$job/history.json /tmp/logs/history_$job.json 2>/dev/null
  cp /tmp/run_$job/validation.json /tmp/logs/validation_$job.json 2>/dev/null
  cp /tmp/export_$job/*.json /tmp/logs/ 2>/dev/null
  cp /tmp/export_$job/*.safetensors "$OUT/" 2>/dev/null
done
tar -czf "$OUT/logs.tar.gz" -C /tmp logs
echo "total $(( $(date +%s) - START )) s"
