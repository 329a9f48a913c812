#!/usr/bin/env bash
# DRDC on texbench-dev with the project's CLI: ONE model for all categories
# (the multi-class setting) and the paper's Table 5 ablation (README, "Quality").
#   base only                                   (calibrate with drdc.gamma=0)
#   + test-time conditioning + fusion           (inpainter trained without model conditioning)
#   + model conditioning                        (the full method)
#
#   bash benchmarks/texbench_drdc.sh [DATA] [RUNS]      (CPU: about 35 min)
set -euo pipefail
DATA=${1:-../shared/datasets/texbench-dev}
RUNS=${2:-runs/texbench}
LOTSCAN=${LOTSCAN:-.venv/bin/lotscan}
BASE_MIN=${BASE_MIN:-3}
INPAINT_MIN=${INPAINT_MIN:-7}
COMMON=(--set data.image_size=64 --set score.torch_threads=2 --set score.batch_size=8
        --set train.max_steps=100000 --set train.cpus_per_worker=2 --set train.learning_rate=0.0005)
BASE=$RUNS/all/drdc
CKPT=$BASE/checkpoints
train() {  # train OUT MINUTES STAGE [--set ...]
  local out=$1 minutes=$2 stage=$3; shift 3
  $LOTSCAN train --method drdc --data "$DATA" --out "$BASE/$out" --checkpoints "$CKPT" \
    --stages "$stage" "${COMMON[@]}" --set train.time_budget_minutes="$minutes" "$@"
}
train full "$BASE_MIN" base
train full "$INPAINT_MIN" inpainter
train no-model-cond "$INPAINT_MIN" inpainter --set drdc.model_conditioning=false
$LOTSCAN calibrate --model "$BASE/full" --method drdc --data "$DATA" --out "$BASE/base-only" \
  "${COMMON[@]}" --set drdc.gamma=0
for NAME in base-only no-model-cond full; do
  $LOTSCAN score --model "$BASE/$NAME" --input "$DATA" --out "$BASE/scores/$NAME" \
    --set score.torch_threads=2
  $LOTSCAN evaluate "$BASE/scores/$NAME" | tee "$BASE/scores/$NAME.md"
done
