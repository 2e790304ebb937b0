#!/usr/bin/env bash
# The CPU studies of docs/parallel_time.md, one after another on one thread (resumable: a
# finished run is skipped, an interrupted one continued). Usage:
#   scripts/parallel_time_study.sh [SPEC ...]     (default: all four; OUT=results/parallel_time)
set -u
cd "$(dirname "$0")/.."
export TPROP_DATA="${TPROP_DATA:-../shared/data}" OMP_NUM_THREADS=1
out="${OUT:-results/parallel_time}"
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(free_states credit_horizon parallel_iterations diag_cells)
for spec in "${specs[@]}"; do
  tprop reproduce "$spec" --preset cpu --threads 1 --out "$out/$spec-cpu"
done
