#!/usr/bin/env bash
# The scoring-speed table of docs/speed.md: every method at the default config
# (64 px, seeded random weights: speed does not depend on what they learned),
# batch 1, 8 and 32, fp32 and bf16, against the one-image, one-unit-per-call
# reference loop, best of REPEATS interleaved rounds; then channels_last at batch 8; then, with BEFORE_SRC set to
# the src/ of a checkout before issue #12 (e.g. a worktree of ed5e0b9), that
# Scorer (fp32, no_grad) at batch 8 on the same bundles.
#
#   bash benchmarks/speed_table.sh [WORKDIR]
#   BEFORE_SRC=/work/wt/before/src THREADS=1 bash benchmarks/speed_table.sh /tmp/speed/work
#
# One thread by default: on a machine shared with other work, more threads
# than free cores make the figures meaningless. Writes WORKDIR/<method>*.json
# and .md (and <method>-before.jsonl); the tables are printed at the end.
set -euo pipefail
WORK=${1:-/tmp/lotscan-speed}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
IMAGES=${IMAGES:-16}
REPEATS=${REPEATS:-3}
METHODS=${METHODS:-dta diffad drdc recon}
export OMP_NUM_THREADS=$THREADS PYTHONPATH=${PYTHONPATH:-src}
BENCH=("$PY" -m lotscan.jobs.cli bench --threads "$THREADS" --images "$IMAGES")

"$PY" benchmarks/speed_bundles.py "$WORK" $METHODS
if [ -n "${BEFORE_SRC:-}" ]; then  # made by that code, which cannot read the new score.* fields
  PYTHONPATH=$BEFORE_SRC "$PY" benchmarks/speed_bundles.py "$WORK/before" $METHODS
fi
for M in $METHODS; do  # a result already there is kept (re-run to finish an interrupted run)
  [ -s "$WORK/$M.md" ] || "${BENCH[@]}" --model "$WORK/$M" --batch-size 1 --batch-size 8 --batch-size 32 \
    --precision fp32 --precision bf16 --reference --peak-seconds 1 --repeats "$REPEATS" \
    --json "$WORK/$M.json" --table > "$WORK/$M.md"
  [ -s "$WORK/$M-cl.md" ] || "${BENCH[@]}" --model "$WORK/$M" --batch-size 8 --precision fp32 --precision bf16 \
    --peak-seconds 0 --repeats "$REPEATS" --set score.channels_last=true --json "$WORK/$M-cl.json" \
    --table > "$WORK/$M-cl.md"
  if [ -n "${BEFORE_SRC:-}" ] && [ ! -s "$WORK/$M-before.jsonl" ]; then
    for R in $(seq "$REPEATS"); do  # that bench has no --repeats: the best of these runs counts
      PYTHONPATH=$BEFORE_SRC "$PY" -m lotscan.jobs.cli bench --threads "$THREADS" --images "$IMAGES" \
        --model "$WORK/before/$M" --batch-size 8
    done > "$WORK/$M-before.jsonl"
  fi
done
for M in $METHODS; do cat "$WORK/$M.md" "$WORK/$M-cl.md"; done
