#!/usr/bin/env bash
# The training-budget axis of the texbench figures: continue a category's
# denoiser from benchmarks/texbench_quality.sh (its checkpoints are copied, so
# `lotscan train` resumes them) up to TOTAL_STEPS, then calibrate, score and
# evaluate the same variants.
#
#   bash benchmarks/texbench_budget.sh [CATEGORY] [TOTAL_STEPS]
set -euo pipefail
CAT=${1:-brick}
TOTAL_STEPS=${2:-1900}
DATA=${DATA:-../shared/datasets/texbench-dev}
RUNS=${RUNS:-runs/texbench}
LOTSCAN=${LOTSCAN:-.venv/bin/lotscan}
SRC=$RUNS/$CAT/dta-t150
BASE=$RUNS/$CAT-steps$TOTAL_STEPS
COMMON=(--set data.image_size=64 --set score.torch_threads=2 --set score.batch_size=8)

mkdir -p "$BASE"
[ -d "$BASE/dta-t150" ] || cp -r "$SRC" "$BASE/dta-t150"
# Same config and data as the first run, so the Ray Train run resumes its checkpoint.
$LOTSCAN train --method dta --data "$DATA" --category "$CAT" --out "$BASE/dta-t150" "${COMMON[@]}" \
  --set train.max_steps="$TOTAL_STEPS" --set train.time_budget_minutes=60 \
  --set train.cpus_per_worker=2 --set train.learning_rate=0.0005
for T in ${RECON_LEVELS:-50 100}; do
  $LOTSCAN calibrate --model "$BASE/dta-t150" --method recon --data "$DATA" --category "$CAT" \
    --out "$BASE/recon-t$T" "${COMMON[@]}" --set recon.noise_level="$T"
done
$LOTSCAN calibrate --model "$BASE/dta-t150" --method dta --data "$DATA" --category "$CAT" \
  --out "$BASE/dta-t100" "${COMMON[@]}" --set dta.max_noise_level=100
for MODEL in "$BASE"/recon-t* "$BASE"/dta-t*; do
  NAME=$(basename "$MODEL")
  $LOTSCAN score --model "$MODEL" --input "$DATA" --category "$CAT" --out "$BASE/scores/$NAME" \
    --set score.torch_threads=2
  $LOTSCAN evaluate "$BASE/scores/$NAME" | tee "$BASE/scores/$NAME.md"
done
