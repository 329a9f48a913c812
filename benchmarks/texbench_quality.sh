#!/usr/bin/env bash
# Quality figures on texbench-dev with the project's own CLI (README, "Quality").
# One denoiser per category, trained once as `dta`; `recon` and the DTA sweep
# variants reuse it through `lotscan calibrate`, so every row shares the model.
#
#   bash benchmarks/texbench_quality.sh [DATA] [RUNS]      (CPU: about 1 hour)
set -euo pipefail
DATA=${1:-../shared/datasets/texbench-dev}
RUNS=${2:-runs/texbench}
LOTSCAN=${LOTSCAN:-.venv/bin/lotscan}
BUDGET_MIN=${BUDGET_MIN:-10}
COMMON=(--set data.image_size=64 --set score.torch_threads=2 --set score.batch_size=8)

for CAT in ${CATEGORIES:-brick grass}; do
  BASE=$RUNS/$CAT
  # 1. Train the shared denoiser (as dta; calibration for dta's defaults).
  $LOTSCAN train --method dta --data "$DATA" --category "$CAT" --out "$BASE/dta-t150" "${COMMON[@]}" \
    --set train.max_steps=100000 --set train.time_budget_minutes="$BUDGET_MIN" \
    --set train.cpus_per_worker=2 --set train.learning_rate=0.0005
  # 2. Variants: recon at several single levels, dta at several sweep maxima.
  for T in ${RECON_LEVELS:-50 100 200 300}; do
    $LOTSCAN calibrate --model "$BASE/dta-t150" --method recon --data "$DATA" --category "$CAT" \
      --out "$BASE/recon-t$T" "${COMMON[@]}" --set recon.noise_level="$T"
  done
  for T in ${DTA_MAX_LEVELS:-100 300}; do
    $LOTSCAN calibrate --model "$BASE/dta-t150" --method dta --data "$DATA" --category "$CAT" \
      --out "$BASE/dta-t$T" "${COMMON[@]}" --set dta.max_noise_level="$T"
  done
  # DTA variant (A) of the paper: intensity trend only (uncertainty weight 0).
  $LOTSCAN calibrate --model "$BASE/dta-t150" --method dta --data "$DATA" --category "$CAT" \
    --out "$BASE/dtaA-t150" "${COMMON[@]}" --set dta.uncertainty_weight=0
  # 3. Score the test split and evaluate every variant.
  for MODEL in "$BASE"/recon-t* "$BASE"/dta-t* "$BASE"/dtaA-t*; do
    NAME=$(basename "$MODEL")
    $LOTSCAN score --model "$MODEL" --input "$DATA" --category "$CAT" --out "$BASE/scores/$NAME" \
      --set score.torch_threads=2
    $LOTSCAN evaluate "$BASE/scores/$NAME" | tee "$BASE/scores/$NAME.md"
  done
done
