#!/usr/bin/env bash
# Every CPU benchmark quoted in docs/results.md, docs/parallel_time.md and docs/distributed.md,
# one after another, each output into results/benchmarks/NAME.txt (OUT=... to change). Run it
# on an otherwise idle machine: the ratios are measured side by side, but the 2-rank and the
# tokens-per-second figures need free cores.
#   scripts/cpu_benchmarks.sh [NAME ...]   (default: all; names as below)
set -u
cd "$(dirname "$0")/.."
export TPROP_DATA="${TPROP_DATA:-../shared/data}"
out="${OUT:-results/benchmarks}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(bench_bptt bench_generate bench_sequence_parallel
                                 bench_parallel_time precision api_example)
run() {  # NAME COMMAND...: time it, keep its output
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.txt"
  { /usr/bin/time -f "wall %e s" "$@"; } >> "$out/$name.txt" 2>&1
  tail -n 2 "$out/$name.txt"
}
for n in "${names[@]}"; do
  case $n in
    bench_bptt|bench_generate|bench_sequence_parallel|bench_parallel_time)
      run "$n" python "benchmarks/$n.py" ;;
    precision)  # autocast on this CPU: fp32 against bf16, the Zaremba-small model on 20,000 tokens
      tmp=$(mktemp -d)
      for p in fp32 bf16; do
        run "precision-$p" tprop train --preset zaremba-small --train-tokens 20000 --eval-tokens 5000 \
            --epochs 1 --precision "$p" --threads 1 --out "$tmp/$p"
      done
      rm -rf "$tmp" ;;
    api_example)  # the README's Python API example, as a new user runs it
      tmp=$(mktemp -d)
      awk '/```python/{f=1;next} /^```$/{f=0} f' README.md > "$tmp/api.py"
      (cd "$tmp" && run api_example python api.py)
      rm -rf "$tmp" ;;
    *) echo "unknown benchmark $n" >&2; exit 2 ;;
  esac
done
