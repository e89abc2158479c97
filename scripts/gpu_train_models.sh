#!/usr/bin/env bash
# One GPU lease: generate training pairs ON the machine, train Efficient LoFTR and SANDESC side by side on the
# one GPU, benchmark, and bring back weights + logs through $OUT (at most 8 files of 16 MiB: weights shards
# plus one logs.tar.gz). Needs .whl (kornia wheels) carried and installed on PYTHONPATH.
#   MODELS ("eloftr sandesc"), PAIRS_PER_PROC (train pairs per generator process), PROCS, EVAL_PAIRS,
#   TRAIN_S (training seconds), BUDGET_S (whole script), ELOFTR_ARGS / SANDESC_ARGS (extra train flags),
#   BENCH (1: run benchmarks/bench_eloftr.py on the result).
set -o pipefail
START=$(date +%s)
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}
MODELS=${MODELS:-"eloftr sandesc"}
mkdir -p "$OUT" /tmp/pairs /tmp/logs
PROCS=${PROCS:-16}
N=${PAIRS_PER_PROC:-72}
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
for model in $MODELS; do
  case $model in
    eloftr) extra=$ELOFTR_ARGS ;;
    sandesc) extra=$SANDESC_ARGS ;;
  esac
  # shellcheck disable=SC2086
  $PY -m feature_matching_ros.cli train "$model" --train /tmp/pairs/train_* --eval /tmp/pairs/eval_a /tmp/pairs/eval_b \
    --out /tmp/run_$model --deadline "$DEADLINE" --checkpoint-every 0 --export /tmp/export_$model $extra \
    >/tmp/logs/train_$model.log 2>&1 &
done
wait
for model in $MODELS; do
  tail -n 5 /tmp/logs/train_$model.log
  cp /tmp/run_$model/history.json /tmp/logs/history_$model.json 2>/dev/null
  cp /tmp/run_$model/validation.json /tmp/logs/validation_$model.json 2>/dev/null
  cp /tmp/export_$model/*.json /tmp/logs/ 2>/dev/null
  cp /tmp/export_$model/*.safetensors "$OUT/" 2>/dev/null
done
echo "training done at $(( $(date +%s) - START )) s" | tee -a /tmp/logs/gen.log
if [ "${BENCH:-1}" = 1 ] && [ -d /tmp/export_eloftr ]; then
  # One safetensors file of the exported shards, passed as --weights (the package's pins are not touched).
  $PY -c "
import json, pathlib, torch
from safetensors.torch import load_file, save_file
export = pathlib.Path('/tmp/export_eloftr')
state = {}
for name in json.loads((export / 'eloftr_synthetic.json').read_text()):
    state.update(load_file(str(export / name)))
save_file(state, '/tmp/eloftr_synthetic.safetensors')
print(len(state), 'tensors')
"
  timeout $(( ${BUDGET_S:-570} - ($(date +%s) - START) - 10 )) \
    $PY benchmarks/bench_eloftr.py --device cuda --precision fp16 fp32 --weights /tmp/eloftr_synthetic.safetensors \
    --pairs-dir /tmp/pairs/eval_a --rendered-pairs 32 --out /tmp/logs/eloftr_gpu.md 2>&1 | tail -n 30
fi
tar -czf "$OUT/logs.tar.gz" -C /tmp logs
echo "total $(( $(date +%s) - START )) s"
