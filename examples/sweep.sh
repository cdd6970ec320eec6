#!/usr/bin/env bash
# A learning-rate x batch-size grid, JOBS runs at a time, then the runs side by side.
#
#   examples/sweep.sh [KEY=VALUE ...]        extra overrides go to every run
#
# Settings from the environment: CONFIG (configs/lenet.yaml), RUNS (runs/sweep),
# LRS ("0.01 0.05 0.1"), BATCH_SIZES ("32 64 128"), JOBS (number of cores),
# CNNTRAIN (cnntrain). Each run gets its own folder, RUNS/lr<LR>-bs<B>, claimed
# atomically, so sweeps may share RUNS; the exit status is non-zero if any run failed.
# Each run uses one core (training.threads=1: no helper processes), since JOBS runs share
# the machine; an override given to the script comes later and wins.
set -euo pipefail

CONFIG=${CONFIG:-configs/lenet.yaml}
RUNS=${RUNS:-runs/sweep}
LRS=${LRS:-"0.01 0.05 0.1"}
BATCH_SIZES=${BATCH_SIZES:-"32 64 128"}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
CNNTRAIN=${CNNTRAIN:-cnntrain}
export CONFIG RUNS CNNTRAIN

for lr in $LRS; do
  for bs in $BATCH_SIZES; do
    printf '%s %s\n' "$lr" "$bs"
  done
done |
  # each line is "LR B"; the script's own arguments come first, the pair last
  xargs -P "$JOBS" -L 1 bash -c '
    lr=${@: -2:1} bs=${@: -1}
    set -- "${@:1:$#-2}"
    $CNNTRAIN train "$CONFIG" training.threads=1 "$@" optimizer.lr="$lr" training.batch_size="$bs" \
      --name "lr$lr-bs$bs" --runs-dir "$RUNS" --quiet
  ' sweep "$@" && status=0 || status=$?

$CNNTRAIN runs "$RUNS" --sort test_acc
exit "$status"
