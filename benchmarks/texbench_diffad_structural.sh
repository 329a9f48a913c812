#!/usr/bin/env bash
# DiffAD's segmenter trained on texture-only synthetic anomalies (the paper's,
# the default) against texture + structural ones (diffad.anomaly_kinds), on the
# same autoencoder and latent denoiser, the same number of segmenter steps and
# the same seeds; each bundle scored on texbench-dev (surface defects) and on
# the structural-defect set's dev split (same photographs, structural kinds),
# evaluated per defect type (docs/methods-diffad-drdc.md, "Structural
# synthetic anomalies").
#
#   bash benchmarks/texbench_diffad_structural.sh [DATA] [STRUCTURAL] [RUNS]
#
# The autoencoder and latent denoiser are trained (as benchmarks/texbench_diffad.sh
# does) only when the category has no checkpoint folder yet, or with TRAIN_BASE=1;
# otherwise the segmenter runs reuse the existing ones (texture-only stage
# settings are unchanged by the structural fields). With
# diffad.structural_condition=false the latent denoiser stays the texture-only one.
set -euo pipefail
DATA=${1:-../shared/datasets/texbench-dev}
STRUCTURAL=${2:-runs/structural-dev}
RUNS=${3:-runs/texbench}
LOTSCAN=${LOTSCAN:-.venv/bin/lotscan}
PYTHON=${PYTHON:-.venv/bin/python}
AE_MIN=${AE_MIN:-2}
LDM_MIN=${LDM_MIN:-6}
SEG_STEPS=${SEG_STEPS:-235}
SEEDS=${SEEDS:-0 1 2}
MIX=${MIX:-[texture,warp,patch]}
COMMON=(--set data.image_size=64 --set score.torch_threads=2 --set score.batch_size=8
        --set train.max_steps=100000 --set train.cpus_per_worker=2 --set train.learning_rate=0.0005)

[ -d "$STRUCTURAL" ] || $PYTHON benchmarks/make_structural_set.py "$STRUCTURAL" --split dev

for CAT in ${CATEGORIES:-brick grass}; do
  BASE=$RUNS/$CAT/diffad
  CKPT=$BASE/checkpoints
  train() {  # train OUT MINUTES STAGE [--set ...]
    local out=$1 minutes=$2 stage=$3; shift 3
    $LOTSCAN train --method diffad --data "$DATA" --category "$CAT" --out "$BASE/$out" \
      --checkpoints "$CKPT" --stages "$stage" "${COMMON[@]}" \
      --set train.time_budget_minutes="$minutes" "$@"
  }
  if [ "${TRAIN_BASE:-0}" = 1 ] || [ ! -d "$CKPT" ]; then
    train full "$AE_MIN" autoencoder
    train full "$LDM_MIN" latent_denoiser
  fi
  NAMES=()
  for SEED in $SEEDS; do
    # Equal steps (a generous time budget, so max_steps decides).
    train "seg-texture-s$SEED" 60 segmenter --set train.max_steps="$SEG_STEPS" --set train.seed="$SEED"
    train "seg-structural-s$SEED" 60 segmenter --set train.max_steps="$SEG_STEPS" --set train.seed="$SEED" \
      --set "diffad.anomaly_kinds=$MIX" --set diffad.structural_condition=false
    NAMES+=("seg-texture-s$SEED" "seg-structural-s$SEED")
  done
  for NAME in "${NAMES[@]}"; do
    for SET in texbench structural; do
      INPUT=$DATA; [ "$SET" = structural ] && INPUT=$STRUCTURAL
      $LOTSCAN score --model "$BASE/$NAME" --input "$INPUT" --category "$CAT" \
        --out "$BASE/scores-$SET/$NAME" --set score.torch_threads=2
      $LOTSCAN evaluate "$BASE/scores-$SET/$NAME" | tee "$BASE/scores-$SET/$NAME.md"
    done
  done
done
