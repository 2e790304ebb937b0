"""``tprop generate`` speed: tokens per second of sampling from the Zaremba-small model (2x200
LSTM, PTB's 10,000 words) on this CPU, with the default thread count (1) against all of the
machine's threads, alternating, median of ``--repeats``. Ends with one JSON line.

    python benchmarks/bench_generate.py [--tokens 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tprop.data import Vocab
from tprop.inference import LoadedRun
from tprop.models import RNNLM
from tprop.system import tune_allocator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    vocab = Vocab([f"w{i}" for i in range(9999)] + ["<eos>"])
    model = RNNLM(len(vocab), 200, 200, 2, "lstm").eval()
    run = LoadedRun(None, model, vocab, "word", torch.device("cpu"))  # type: ignore[arg-type]
    cores = len(os.sched_getaffinity(0))
    rates: dict[int, list[float]] = {1: [], cores: []}
    run.generate(50)  # warm-up
    for i in range(args.repeats):
        for threads in ((1, cores) if i % 2 == 0 else (cores, 1)):
            t0 = time.perf_counter()
            run.generate(args.tokens, threads=threads)
            rates[threads].append(args.tokens / (time.perf_counter() - t0))
            print(f"repeat {i + 1}: {threads} thread(s): {rates[threads][-1]:,.0f} tokens/s",
                  flush=True)
    print(json.dumps({"model": "zaremba-small (2x200 LSTM, 10k words)", "tokens": args.tokens,
                      "tokens_per_s_1_thread": statistics.median(rates[1]),
                      f"tokens_per_s_{cores}_threads": statistics.median(rates[cores])}))


if __name__ == "__main__":
    main()
