#!/usr/bin/env bash
# All of MMLU (14,042 questions) for every stage of a preset: records, then hidden-state features
# for records that have none (records made before features were kept), then the P(IK) probes.
#
# Two workers (the two cores), one model per process, one torch thread each, take the jobs below
# in order; a job is one `cascade_core bench` call, so each shows its own bar with an ETA and
# resumes where it stopped: rerun this script after an interruption and nothing done is redone.
#   usage: bench/full_mmlu.sh [PRESET]   (env: PYTHON, RESULTS_DIR, FEATURES_DIR, WORKERS, NICE)
set -uo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-default}
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS_DIR=${RESULTS_DIR:-data/results}
FEATURES_DIR=${FEATURES_DIR:-data/features}
WORKERS=${WORKERS:-2}
NICE=${NICE:-0}
LOGS=${LOGS:-$RESULTS_DIR/logs}
mkdir -p "$LOGS"

stages=$("$PYTHON" -m cascade_core presets --stages "$PRESET") || exit 2
largest=$(echo "$stages" | tail -n 1)
# The largest model's records first (the longest job); then each other stage in cascade order,
# its older records' features before its new records, so that when a session ends mid-run every
# record of a stage that has grown has features (its probe can be retrained on all of them) and
# the questions all stages share grow only with whole stages; then the largest model's backfill.
jobs=("$largest")
for s in $stages; do [ "$s" = "$largest" ] || jobs+=("$s --backfill-features" "$s"); done
# The largest model's backfill is the second-longest job: three shards per worker, so a worker that
# frees up late (after the largest model's records) still takes a share of what is left (a backfill
# only adds feature chunks, so shards never write the same file).
SHARDS=$((WORKERS * 3))
for k in $(seq 0 $((SHARDS - 1))); do jobs+=("$largest --backfill-features --shard $k/$SHARDS"); done

claims=$(mktemp -d)
trap 'rm -rf "$claims"' EXIT

worker() {
  local i=0 job
  for job in "${jobs[@]}"; do
    i=$((i + 1))
    mkdir "$claims/$i" 2>/dev/null || continue  # another worker has it
    local log="$LOGS/$(echo "$job" | tr ' ' '_').log"
    echo "worker $1: $job (log: $log)"
    # shellcheck disable=SC2086
    nice -n "$NICE" "$PYTHON" -m cascade_core bench --preset "$PRESET" --threads 1 \
      --results-dir "$RESULTS_DIR" --features-dir "$FEATURES_DIR" --stages $job >>"$log" 2>&1 \
      || { echo "worker $1: '$job' failed; see $log"; return 1; }
    tail -n 1 "$log"
  done
}

status=0
for w in $(seq 1 "$WORKERS"); do worker "$w" & done
for w in $(seq 1 "$WORKERS"); do wait -n || status=1; done
[ "$status" = 0 ] || exit 1
"$PYTHON" -m cascade_core probes train --preset "$PRESET" --results-dir "$RESULTS_DIR" --features-dir "$FEATURES_DIR"
