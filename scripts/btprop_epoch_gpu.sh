#!/usr/bin/env bash
# Issue 3 evidence on a GPU: one full PTB epoch per method (LSTM 100, K=10, M=32 blocks / B=32
# columns), all runs at once on one GPU (start `nvidia-cuda-mps-control -d` first to let their
# kernels overlap). Three settings of the h-steps:
#   sgd0.1-*   the CPU script's (scripts/btprop_epoch_evidence.sh): SGD h-lr 0.1, 1 θ-step
#   ref-*      the reference's: Adagrad h-lr 1, 5 θ-steps
#   sgd0.01-*  SGD h-lr 0.01, 1 θ-step
# Usage: scripts/btprop_epoch_gpu.sh   (OUT=dir, DEVICE=cuda by default)
set -u
cd "$(dirname "$0")/.."
export TPROP_DATA="${TPROP_DATA:-../shared/data}" OMP_NUM_THREADS=1
out="${OUT:-runs/btprop-epoch-gpu}"
mkdir -p "$out"
common=(--dataset ptb --epochs 1 --threads 1 --quiet --seed 1 --positional-ppl
        --device "${DEVICE:-cuda}")
bt=(--block-size 10 --blocks-per-update 32 --u-start 1)
sgd1=(--h-optim sgd --h-lr 0.1 --theta-steps 1)
ref=(--h-optim adagrad --h-lr 1 --theta-steps 5)
sgd2=(--h-optim sgd --h-lr 0.01 --theta-steps 1)
run() {
  local name=$1; shift
  [ -f "$out/$name/summary.json" ] && return
  rm -rf "${out:?}/$name"
  tprop train "$@" "${common[@]}" --out "$out/$name" > "$out/$name.log" 2>&1 &
}
run bptt --method bptt --bptt 10 --batch-size 32
for m in pm admm; do
  run "sgd0.1-$m-h10" --method $m "${bt[@]}" "${sgd1[@]}" --h-steps 10
  run "ref-$m-h1" --method $m "${bt[@]}" "${ref[@]}" --h-steps 1
  run "ref-$m-h10" --method $m "${bt[@]}" "${ref[@]}" --h-steps 10
  run "sgd0.01-$m-h10" --method $m "${bt[@]}" "${sgd2[@]}" --h-steps 10
done
run sgd0.1-alm-10 --method alm "${bt[@]}" "${sgd1[@]}" --alm-max-steps 10
run ref-alm-1 --method alm "${bt[@]}" "${ref[@]}" --alm-max-steps 1
run ref-alm-10 --method alm "${bt[@]}" "${ref[@]}" --alm-max-steps 10
run sgd0.01-alm-10 --method alm "${bt[@]}" "${sgd2[@]}" --alm-max-steps 10
wait
