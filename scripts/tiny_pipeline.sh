#!/usr/bin/env bash
# The paper's pipeline at CPU scale on the embedded synthetic suite, with the console scripts:
# pretrain an MHA model on synthetic span corruption, convert it to GQA-2 and MQA by mean pooling,
# uptrain each for UPTRAIN_FRACTION of the pretraining steps, fine-tune each on synthetic_qa, and
# evaluate. Every stage prints progress; metrics land in each MODEL_DIR's metrics.jsonl.
#
# The model and the step counts are configs/tiny_pipeline.toml's; PRETRAIN_STEPS,
# UPTRAIN_FRACTION and FINETUNE_STEPS in the environment override the steps.
#
#   scripts/tiny_pipeline.sh [OUT_DIR]      (FORCE=1 replaces an existing OUT_DIR)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
OUT=${1:-out/tiny_pipeline}
STEPS=$("$PYTHON" "$HERE/config_flags.py" tiny_pipeline --table steps)
FLAGS=$("$PYTHON" "$HERE/config_flags.py" tiny_pipeline)
eval "$(sed 's/^/DEFAULT_/' <<< "$STEPS")"
PRETRAIN_STEPS=${PRETRAIN_STEPS:-$DEFAULT_PRETRAIN_STEPS}
UPTRAIN_FRACTION=${UPTRAIN_FRACTION:-$DEFAULT_UPTRAIN_FRACTION}
FINETUNE_STEPS=${FINETUNE_STEPS:-$DEFAULT_FINETUNE_STEPS}
KV_HEADS=${KV_HEADS:-8 2 1}  # 8 = MHA (no conversion)
if [ -e "$OUT" ]; then
  if [ "${FORCE:-0}" != 1 ]; then
    echo "$OUT exists; set FORCE=1 to replace it" >&2
    exit 1
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"

mapfile -t MODEL_FLAGS <<< "$FLAGS"
MODEL=(--gin_file=models/tiny.gin "${MODEL_FLAGS[@]}")
# Pretraining and uptraining keep T5's schedule, 1/sqrt(max(step, 10k)): a constant 0.01 at these
# step counts; a warmup to ten times that rate leaves fine-tuning on a plateau
# (docs/measurements.md).
SPAN=(--gin.MIXTURE_OR_TASK_NAME="'synthetic_span_corruption'"
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 256, 'targets': 64}" --gin.BATCH_SIZE=32
      --gin.LOG_EVERY=50)
QA=(--gin.MIXTURE_OR_TASK_NAME="'synthetic_qa'"
    --gin.TASK_FEATURE_LENGTHS="{'inputs': 128, 'targets': 8}")

stage() { echo; echo "== $* ($(date +%T))"; }

stage "pretrain MHA, $PRETRAIN_STEPS steps"
gqa-train "${MODEL[@]}" --gin_file=attention/mha.gin --gin_file=runs/pretrain.gin "${SPAN[@]}" \
  --gin.MODEL_DIR="'$OUT/pretrain'" --gin.TRAIN_STEPS="$PRETRAIN_STEPS" \
  --gin.CHECKPOINT_EVERY="$PRETRAIN_STEPS"

for kv in $KV_HEADS; do
  case $kv in 8) name=mha; attention=mha.gin ;; 1) name=mqa; attention=mqa.gin ;;
              *) name=gqa$kv; attention=gqa8.gin ;; esac
  start="$OUT/pretrain"
  if [ "$kv" != 8 ]; then
    stage "convert MHA -> $name (mean pooling)"
    gqa-convert --input "$OUT/pretrain" --output "$OUT/$name-converted" --num_kv_heads "$kv" \
      --method mean
    start="$OUT/$name-converted"
  fi
  stage "uptrain $name for $UPTRAIN_FRACTION x $PRETRAIN_STEPS steps"
  gqa-train "${MODEL[@]}" --gin_file=attention/$attention --gin.NUM_KV_HEADS="$kv" \
    --gin_file=runs/uptrain.gin "${SPAN[@]}" --gin.MODEL_DIR="'$OUT/$name-uptrain'" \
    --gin.INITIAL_CHECKPOINT_PATH="'$start'" --gin.UPTRAIN_FRACTION="$UPTRAIN_FRACTION"
  stage "fine-tune $name on synthetic_qa, $FINETUNE_STEPS steps"
  gqa-train "${MODEL[@]}" --gin_file=attention/$attention --gin.NUM_KV_HEADS="$kv" \
    --gin_file=runs/finetune.gin "${QA[@]}" --gin.MODEL_DIR="'$OUT/$name-finetune'" \
    --gin.INITIAL_CHECKPOINT_PATH="'$OUT/$name-uptrain'" --gin.TRAIN_STEPS="$FINETUNE_STEPS" \
    --gin.BATCH_SIZE=32 --gin.LEARNING_RATE=0.01 --gin.DROPOUT_RATE=0.0 \
    --gin.EVAL_EVERY="$FINETUNE_STEPS" --gin.EVAL_BATCH_SIZE=100 --gin.EVAL_NUM_EXAMPLES=200 \
    --gin.BEST_METRIC="'synthetic_qa/em'" --gin.LOG_EVERY=100
  stage "evaluate $name"
  gqa-eval --gin_file=runs/eval.gin "${QA[@]}" --gin.MODEL_DIR="'$OUT/$name-finetune'" \
    --gin.EVAL_BATCH_SIZE=100 --gin.EVAL_NUM_EXAMPLES=200
done
echo; echo "done: $OUT"
