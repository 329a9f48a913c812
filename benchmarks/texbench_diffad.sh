#!/usr/bin/env bash
# DiffAD on texbench-dev with the project's CLI: the full model and the paper's
# Table 1 ablations (README, "Quality"). Stages run one command at a time, each
# with its own wall-clock budget; the ablations share the checkpoints of the
# stages they do not change, so each retrains only what its setting touches.
#
#   bash benchmarks/texbench_diffad.sh [DATA] [RUNS]     (CPU: about 40 min per category)
set -euo pipefail
DATA=${1:-../shared/datasets/texbench-dev}
RUNS=${2:-runs/texbench}
LOTSCAN=${LOTSCAN:-.venv/bin/lotscan}
AE_MIN=${AE_MIN:-2}
LDM_MIN=${LDM_MIN:-6}
SEG_MIN=${SEG_MIN:-4}
COMMON=(--set data.image_size=64 --set score.torch_threads=2 --set score.batch_size=8
        --set train.max_steps=100000 --set train.cpus_per_worker=2 --set train.learning_rate=0.0005)

for CAT in ${CATEGORIES:-brick}; do
  BASE=$RUNS/$CAT/diffad
  CKPT=$BASE/checkpoints
  train() {  # train OUT MINUTES STAGE [--set ...]
    local out=$1 minutes=$2 stage=$3; shift 3
    $LOTSCAN train --method diffad --data "$DATA" --category "$CAT" --out "$BASE/$out" \
      --checkpoints "$CKPT" --stages "$stage" "${COMMON[@]}" \
      --set train.time_budget_minutes="$minutes" "$@"
  }
  # Full DiffAD: noisy condition, interpolated channels (lambda 0.5).
  train full "$AE_MIN" autoencoder
  train full "$LDM_MIN" latent_denoiser
  train full "$SEG_MIN" segmenter
  # Ablations (Table 1): discriminator input without x_inter; with x~_a (lambda = 1);
  # a clean condition when training the latent denoiser (DiffAD_c).
  train no-inter "$SEG_MIN" segmenter --set diffad.interpolated_channels=false
  train xa-inter "$SEG_MIN" segmenter --set diffad.interpolation_lambda=1.0
  train clean-cond "$LDM_MIN" latent_denoiser --set diffad.condition_noise=clean
  train clean-cond "$SEG_MIN" segmenter --set diffad.condition_noise=clean
  for NAME in full no-inter xa-inter clean-cond; do
    $LOTSCAN score --model "$BASE/$NAME" --input "$DATA" --category "$CAT" \
      --out "$BASE/scores/$NAME" --set score.torch_threads=2
    $LOTSCAN evaluate "$BASE/scores/$NAME" | tee "$BASE/scores/$NAME.md"
  done
done
