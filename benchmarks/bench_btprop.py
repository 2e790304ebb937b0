"""Cost of one h-step and one θ-step of Block TPROP against one BPTT update, same tokens.

Reference PTB configuration: LSTM, 100 units, K = 10, M = 32 blocks per update (320 tokens);
the BPTT update uses B = 32 columns and a window of K = 10 (the same 320 tokens). The three
are timed interleaved in one process (``--repeats`` rounds of ``--iters`` each, the median
round kept). Ends with one JSON line.

    python benchmarks/bench_btprop.py [--iters 30] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from tprop.data import Blocks, StreamColumns, load_corpus
from tprop.models import RNNLM
from tprop.objective import BlockProblem, forward_states
from tprop.optim import build_optimizer
from tprop.system import tune_allocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--nhid", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    torch.manual_seed(0)
    corpus = load_corpus("ptb", args.data_dir)
    V, K, M, H = len(corpus.vocab), args.block_size, args.blocks, args.nhid
    model = RNNLM(V, H, H, 1, "lstm")
    params = list(model.parameters())
    theta_opt = build_optimizer(params, "adagrad", 0.1)

    blocks = Blocks(corpus.train[: (M * K) * 4 + 1], K)
    x, y = blocks.span(0, M)
    carried = torch.zeros(1, model.state_dim)
    z0 = forward_states(model, x, carried)
    problem = BlockProblem(model, x, y, carried, z0, lam=1.0)
    h_opt = build_optimizer([problem.w], "adagrad", 1.0)

    cols = StreamColumns(corpus.train[: M * K * 4 + 1], M)
    bx, by = next(cols.windows(K))
    state = model.init_state(M)

    def bptt_update() -> None:
        logits, _ = model(bx, model.detach_state(state))
        loss = F.cross_entropy(logits.view(-1, V), by.reshape(-1))
        theta_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        theta_opt.step()

    def h_step() -> None:
        problem.w.grad = None
        problem.evaluate(states=True)
        h_opt.step()

    def theta_step() -> None:
        theta_opt.zero_grad(set_to_none=True)
        problem.evaluate(theta=True)
        for p in params:
            p.grad.div_(M)
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        theta_opt.step()

    fns = {"bptt": bptt_update, "h": h_step, "theta": theta_step}
    for f in fns.values():  # warm up
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                f()
            times[name].append((time.perf_counter() - t0) / args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"LSTM {H} units, vocab {V}, K={K}, M={M} ({M * K} tokens per update), "
          f"threads {torch.get_num_threads()}")
    for k in fns:
        print(f"  {k:6s} {med[k] * 1e3:8.2f} ms  ({med[k] / med['bptt']:.3f} x BPTT update)")
    print(json.dumps({"h_step_vs_bptt": round(med["h"] / med["bptt"], 4),
                      "theta_step_vs_bptt": round(med["theta"] / med["bptt"], 4)}))


if __name__ == "__main__":
    main()
