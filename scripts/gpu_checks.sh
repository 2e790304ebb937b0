#!/usr/bin/env bash
# Every GPU measurement and check of docs/parallel_time.md, docs/distributed.md and
# docs/results.md, in one call on a lent GPU machine (results into $OUT, default runs/gpu):
#   the CUDA tests; the NCCL communication check on one GPU; bench_parallel_time.py on the GPU;
#   one PTB epoch of the Zaremba-small model in fp32 and bf16 (tokens/s, valid ppl).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export TPROP_DATA="${TPROP_DATA:-../shared/data}"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
python -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$out/test_cuda.txt" 2>&1
torchrun --standalone --nproc-per-node 1 scripts/comm_check.py --backend nccl \
    > "$out/comm_check_nccl.txt" 2>&1
python benchmarks/bench_parallel_time.py --device cuda > "$out/bench_parallel_time.txt" 2>&1
for p in fp32 bf16; do
  tprop train --preset zaremba-small --epochs 1 --device cuda --precision "$p" --quiet \
      --out "$out/zaremba-1epoch-$p" > "$out/zaremba-1epoch-$p.log" 2>&1
done
tail -n 2 "$out"/*.txt "$out"/*.log
