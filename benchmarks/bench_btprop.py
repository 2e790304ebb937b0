"""Cost of Block TPROP against BPTT at equal tokens: one h-step and one θ-step against one BPTT
update, and whole epochs against BPTT epochs.

Step costs, reference PTB configuration: LSTM, 100 units, K = 10, M = 32 blocks per update
(320 tokens); the BPTT update uses B = 32 columns and a window of K = 10 (the same 320 tokens).
The three are timed interleaved in one process (``--repeats`` rounds of ``--iters`` each, the
median round kept).

Epochs (``--cases``): PM and ADMM (forward initialisation, ``--h-steps`` H, ``--theta-steps``
P, duals from the first epoch) against a BPTT epoch over the same tokens (B = M columns,
window K), on a small model (``small``: LSTM 64 on PTB characters) and a Zaremba-sized one
(``zaremba``: 2x200 LSTM on PTB words), each cut to its ``--*-tokens``. Each of
``--epoch-repeats`` rounds first times the case's steps as an epoch takes them (U BPTT
updates, H·U h-steps, P·U θ-steps for U updates per epoch), which gives h and θ relative to
a BPTT update and the prediction H·h + P·θ BPTT epochs; then a BPTT epoch, a BTPROP epoch, a
BPTT epoch, the other BTPROP epoch, a BPTT epoch (PM first in even rounds, ADMM in odd ones).
A BTPROP epoch is compared with the mean of the two BPTT epochs beside it, and with the
round's prediction; the medians over the rounds are kept. ``--clock cpu`` times the
process's CPU time instead of the wall clock.

Ends with one JSON line: the reference step costs and ``epoch_vs_predicted``, the largest
over the cases and methods of the median ratio of a measured BTPROP epoch to its prediction
(and each case's medians under ``epochs``).

    python benchmarks/bench_btprop.py [--iters 30] [--repeats 5] [--threads N]
        [--cases small,zaremba] [--h-steps 1] [--theta-steps 5] [--epoch-repeats 9]
        [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from tprop.config import make_config
from tprop.data import Blocks, Corpus, StreamColumns, load_corpus
from tprop.models import RNNLM
from tprop.objective import BlockProblem, forward_states
from tprop.optim import build_optimizer
from tprop.system import tune_allocator
from tprop.train import make_trainer

# name -> corpus, model size, training tokens (the flag that overrides them)
CASES: dict[str, dict[str, Any]] = {
    "small": dict(dataset="ptb-char", emsize=64, nhid=64, nlayers=1, what="LSTM 64"),
    "zaremba": dict(dataset="ptb", emsize=200, nhid=200, nlayers=2, what="LSTM 2x200"),
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StepCosts:
    """One BPTT update (B = m columns, window k), one h-step and one θ-step (m blocks of k) of
    a model, ready to be timed."""

    def __init__(self, model: RNNLM, train: torch.Tensor, k: int, m: int) -> None:
        v = model.ntoken
        params = list(model.parameters())
        theta_opt = build_optimizer(params, "adagrad", 0.1)

        blocks = Blocks(train[: (m * k) * 4 + 1], k)
        x, y = blocks.span(0, m)
        carried = torch.zeros(1, model.state_dim)
        z0 = forward_states(model, x, carried)
        problem = BlockProblem(model, x, y, carried, z0, lam=1.0)
        h_opt = build_optimizer([problem.w], "adagrad", 1.0)

        cols = StreamColumns(train[: m * k * 4 + 1], m)
        bx, by = next(cols.windows(k))
        state = model.init_state(m)

        def bptt_update() -> None:
            logits, _ = model(bx, model.detach_state(state))
            loss = F.cross_entropy(logits.view(-1, v), by.reshape(-1))
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
                p.grad.div_(m)
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            theta_opt.step()

        self.fns = {"bptt": bptt_update, "h": h_step, "theta": theta_step}
        for f in self.fns.values():  # warm up
            for _ in range(3):
                f()

    def round(self, iters: int | dict[str, int], clock: str = "wall") -> dict[str, float]:
        """Seconds per call of each step over ``iters`` calls (or as many as ``iters`` says for
        that step), one step after the other."""
        now = CLOCKS[clock]
        out = {}
        for name, f in self.fns.items():
            n = iters if isinstance(iters, int) else iters[name]
            t0 = now()
            for _ in range(n):
                f()
            out[name] = (now() - t0) / n
        return out


def step_costs(model: RNNLM, train: torch.Tensor, k: int, m: int, iters: int,
               repeats: int) -> dict[str, float]:
    """Median seconds of one BPTT update (B = m columns, window k), one h-step and one θ-step
    (m blocks of k), timed interleaved."""
    steps = StepCosts(model, train, k, m)
    rounds = [steps.round(iters) for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in rounds) for key in steps.fns}


def epoch_case(name: str, corpus: Corpus, tokens: int, args: argparse.Namespace
               ) -> dict[str, Any]:
    """Step costs and whole epochs of PM, ADMM and BPTT for one case, measured round by round
    (the steps, then BPTT, a BTPROP method, BPTT, the other, BPTT); prints its lines."""
    spec = CASES[name]
    k, m, hs, ps = args.block_size, args.blocks, args.h_steps, args.theta_steps
    common = dict(dataset=spec["dataset"], data_dir=args.data_dir, quiet=True, device="cpu",
                  model="lstm", emsize=spec["emsize"], nhid=spec["nhid"],
                  nlayers=spec["nlayers"], bptt=k, train_tokens=tokens, eval_tokens=1000,
                  eval_batch_size=1, seed=0, optim="adagrad", lr=0.1, clip=0.5,
                  max_ppl=1e30, threads=args.threads)
    block = dict(blocks_per_update=m, h_steps=hs, theta_steps=ps, h_init="forward",
                 h_optim="adagrad", h_lr=1.0, u_start=1)
    trainers = {"bptt": make_trainer(make_config(method="bptt", batch_size=m, **common),
                                     corpus=corpus),
                "pm": make_trainer(make_config(method="pm", **block, **common), corpus=corpus),
                "admm": make_trainer(make_config(method="admm", **block, **common),
                                     corpus=corpus)}
    bptt_tokens = trainers["bptt"].train_epoch(1, 0.1)["tokens"]  # warm-up epochs
    for key in ("pm", "admm"):
        got = trainers[key].train_epoch(1, 0.1)["tokens"]
        assert got == bptt_tokens, f"{key} trains on {got} tokens, BPTT on {bptt_tokens}"
    torch.manual_seed(0)
    steps = StepCosts(RNNLM(len(corpus.vocab), spec["emsize"], spec["nhid"], spec["nlayers"],
                            "lstm"), trainers["bptt"].train_data, k, m)

    now = CLOCKS[args.clock]
    updates = bptt_tokens // (m * k)
    iters = {"bptt": updates, "h": max(1, hs) * updates, "theta": ps * updates}  # an epoch's
    rows = []  # per round: step costs, epoch seconds
    for r in range(args.epoch_repeats):
        row = {f"step_{key}": val for key, val in steps.round(iters, args.clock).items()}
        methods = ["pm", "admm"] if r % 2 == 0 else ["admm", "pm"]
        took = []  # a BPTT epoch before and after each BTPROP epoch
        for key in ["bptt", methods[0], "bptt", methods[1], "bptt"]:
            t0 = now()
            trainers[key].train_epoch(2 + r, 0.1)
            took.append(now() - t0)
        row["bptt"] = statistics.median(took[0::2])
        row["h"] = row["step_h"] / row["step_bptt"]
        row["theta"] = row["step_theta"] / row["step_bptt"]
        row["predicted"] = hs * row["h"] + ps * row["theta"]
        for i, key in enumerate(methods):
            row[key] = took[2 * i + 1]
            row[f"{key}_vs_bptt"] = row[key] / (0.5 * (took[2 * i] + took[2 * i + 2]))
            row[f"{key}_vs_predicted"] = row[f"{key}_vs_bptt"] / row["predicted"]
        rows.append(row)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    out = {key: round(med(key), 4) for key in ("h", "theta", "predicted", "pm_vs_bptt",
                                              "pm_vs_predicted", "admm_vs_bptt",
                                              "admm_vs_predicted")}
    print(f"{name}: {spec['what']} on {spec['dataset']}, vocab {len(corpus.vocab)}, K={k}, M={m},"
          f" {bptt_tokens:,} tokens per epoch ({bptt_tokens // (m * k)} updates),"
          f" H={hs} h-steps, P={ps} θ-steps, {args.clock} clock, medians of"
          f" {len(rows)} rounds")
    print(f"  steps: BPTT update {med('step_bptt') * 1e3:.2f} ms, h {out['h']:.3f}, θ"
          f" {out['theta']:.3f} x BPTT update -> predicted epoch {hs}·h + {ps}·θ ="
          f" {out['predicted']:.3f} x BPTT epoch")
    print(f"  bptt   epoch {med('bptt'):8.3f} s  {bptt_tokens / med('bptt'):10,.0f} tok/s")
    for key in ("pm", "admm"):
        per_round = ", ".join(f"{row[key + '_vs_predicted']:.3f}" for row in rows)
        print(f"  {key:6s} epoch {med(key):8.3f} s  {bptt_tokens / med(key):10,.0f} tok/s"
              f"  {out[key + '_vs_bptt']:.3f} x BPTT epoch = {out[key + '_vs_predicted']:.3f}"
              f" x predicted (rounds: {per_round})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--nhid", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cases", default="small,zaremba",
                    help="epoch comparisons to run (comma-separated; empty: none)")
    ap.add_argument("--h-steps", type=int, default=1)
    ap.add_argument("--theta-steps", type=int, default=5)
    ap.add_argument("--epoch-repeats", type=int, default=9)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="epoch comparisons: wall-clock or process CPU time (one thread)")
    ap.add_argument("--small-tokens", type=int, default=32 * 10 * 100 + 1,
                    help="training tokens of the small case (default: 100 updates of 320)")
    ap.add_argument("--zaremba-tokens", type=int, default=32 * 10 * 15 + 1,
                    help="training tokens of the Zaremba-sized case (default: 15 updates)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    torch.manual_seed(0)
    corpus = load_corpus("ptb", args.data_dir)
    V, K, M, H = len(corpus.vocab), args.block_size, args.blocks, args.nhid
    med = step_costs(RNNLM(V, H, H, 1, "lstm"), corpus.train, K, M, args.iters, args.repeats)
    print(f"LSTM {H} units, vocab {V}, K={K}, M={M} ({M * K} tokens per update), "
          f"threads {torch.get_num_threads()}")
    for k in med:
        print(f"  {k:6s} {med[k] * 1e3:8.2f} ms  ({med[k] / med['bptt']:.3f} x BPTT update)")
    result: dict[str, Any] = {"h_step_vs_bptt": round(med["h"] / med["bptt"], 4),
                              "theta_step_vs_bptt": round(med["theta"] / med["bptt"], 4)}

    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"--cases: unknown case {c!r} (choose from {', '.join(CASES)})")
    epochs = {}
    for c in cases:
        data = corpus if CASES[c]["dataset"] == "ptb" else load_corpus(CASES[c]["dataset"],
                                                                       args.data_dir)
        epochs[c] = epoch_case(c, data, getattr(args, f"{c}_tokens"), args)
    if epochs:
        result["epoch_vs_predicted"] = max(v[f"{m}_vs_predicted"] for v in epochs.values()
                                           for m in ("pm", "admm"))
        result["epochs"] = epochs
    print(json.dumps(result))


if __name__ == "__main__":
    main()
