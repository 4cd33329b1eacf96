#!/usr/bin/env bash
# Commit a running `bench/full_mmlu.sh`'s work every INTERVAL seconds (default 45 minutes), so a
# session that ends mid-run loses at most that much: the records files (already written
# atomically, batch by batch) and a checkpoint of the probes' feature layer
# (bench/checkpoint_features.py). Commits only those paths; stops when STOP_FILE exists or after
# ROUNDS rounds.
#   usage: bench/checkpoint_loop.sh [PRESET]   (env: PYTHON, INTERVAL, ROUNDS, STOP_FILE)
set -uo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-default}
PYTHON=${PYTHON:-.venv/bin/python}
INTERVAL=${INTERVAL:-2700}
ROUNDS=${ROUNDS:-8}
STOP_FILE=${STOP_FILE:-/tmp/checkpoint_loop.stop}

commit_once() {
  local summary
  summary=$("$PYTHON" bench/checkpoint_features.py --preset "$PRESET" | tail -n 1) || { echo "checkpoint failed"; return 1; }
  for try in 1 2 3 4 5 6; do
    [ -e .git/index.lock ] && { sleep 5; continue; }
    git add data/results/mmlu/*.parquet data/hidden/mmlu 2>/dev/null
    if git diff --cached --quiet -- data/results/mmlu data/hidden/mmlu; then echo "nothing new"; return 0; fi
    git commit -q -m "full MMLU run, checkpoint: records and the probes' feature layer so far $summary" \
      -- data/results/mmlu data/hidden/mmlu && { echo "committed: $summary"; return 0; }
    sleep 5
  done
  echo "commit failed"; return 1
}

for round in $(seq 1 "$ROUNDS"); do
  for _ in $(seq 1 "$INTERVAL"); do [ -e "$STOP_FILE" ] && exit 0; sleep 1; done
  echo "$(date -u +%FT%TZ) round $round"; commit_once
done
