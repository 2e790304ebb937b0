"""The exact parallel recurrence against sequential BPTT over one window, measured side by side.

The diagonal cells (``diag-lstm-1x128``, ``diag-gru-1x128``, ``--diag``) run step-level Newton
(block size 1, the elementwise scan) against their own sequential loop and against the fused
full LSTM of the same width (cuDNN on a GPU), windows up to 16,384 steps.

For each case (window T, columns B, model, untrained or PTB-trained weights, recurrence)
one forward+backward of a window of PTB validation text (the loss is the mean token cross
entropy, the decoder included) is timed for the fused sequential kernel (cuDNN on a GPU,
oneDNN here) and for ``--recurrence jacobi|newton|quasi-newton`` in blocks of K, in the same
process, alternating, median of ``--repeats``. Reported per case: the forward iterations and
adjoint iterations to ``--tol`` (float32), the sequential depth (recurrent steps run one after
another, forward and backward: 2T for the sequential kernel; see ``depth``), the wall-time
ratio sequential / parallel, and the relative error of the θ-gradient against the sequential
one. The PTB-trained weights are trained here once (``--train-tokens`` of PTB) and cached in
``runs/bench-weights/``. Cases too slow for this machine (dense Newton and its diagonal at
large state sizes or windows on a CPU, the diagonal cells' reference loop at B > 1 beyond
1,024 steps on a CPU) are listed as skipped, never given a number, and so are the cases that
would start after ``--budget-min`` (19 minutes on a CPU: the default run stays within 20).
On a CPU a case of more than 4,096 tokens is timed once (``repeats`` in its record). The
trained weights come first. Ends with one JSON line.

    python benchmarks/bench_parallel_time.py [--quick] [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tprop.config import make_config
from tprop.data import load_corpus
from tprop.inference import load_run
from tprop.models import RNNLM
from tprop.recurrence import RecurrenceSettings, RecurrenceStats, parallel_recur
from tprop.scan import levels
from tprop.system import tune_allocator
from tprop.train import train

MODELS = {"lstm-1x128": dict(model="lstm", nlayers=1, nhid=128, emsize=128),
          "lstm-2x200": dict(model="lstm", nlayers=2, nhid=200, emsize=200),
          "diag-lstm-1x128": dict(model="diag-lstm", nlayers=1, nhid=128, emsize=128),
          "diag-gru-1x128": dict(model="diag-gru", nlayers=1, nhid=128, emsize=128)}
DIAGONAL = ("diag-lstm-1x128", "diag-gru-1x128")


def trained_weights(name: str, tokens: int, device: str) -> RNNLM:
    """A model of ``MODELS[name]`` trained on the first ``tokens`` PTB tokens (cached)."""
    out = Path("runs/bench-weights") / f"{name}-{tokens}"
    if not (out / "best.pt").is_file():
        cfg = make_config(dataset="ptb", train_tokens=tokens, eval_tokens=20_000, epochs=2,
                          bptt=35, batch_size=20, optim="sgd", lr=20.0, clip=0.25,
                          quiet=True, device=device, **MODELS[name])
        if out.exists():
            import shutil

            shutil.rmtree(out)
        train(cfg, out)
    return load_run(out, "best", device=device, need_data=False).model


def untrained(name: str, vocab: int, device: str) -> RNNLM:
    spec = MODELS[name]
    torch.manual_seed(0)
    return RNNLM(vocab, spec["emsize"], spec["nhid"], spec["nlayers"], spec["model"]).to(device)


def depth(rec: str, k: int, blocks: int, fwd: float, adj: float, steps: int) -> float:
    """Recurrent steps run one after another in one forward+backward: the sequential kernel
    2T; Jacobi K per sweep, the final pass and its backward; Newton also a backward of K and
    ⌈log₂ M⌉ scan levels per iteration (the Jacobians), one reverse scan for the adjoint."""
    if rec == "sequential":
        return 2 * steps
    lv = levels(max(1, blocks - 1))
    if rec == "jacobi":
        return k * (fwd + adj + 3)
    return fwd * (2 * k + lv) + 3 * k + lv + adj * k


def timed(fn: Any, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_case(model: RNNLM, x: torch.Tensor, y: torch.Tensor, s0: torch.Tensor, rec: str,
             k: int, tol: float, repeats: int, device: str,
             full: RNNLM | None = None) -> dict[str, Any]:
    params = list(model.parameters())
    vocab = model.ntoken

    def sequential() -> list[torch.Tensor]:
        logits, _ = model(x, model.unflatten_state(s0))
        loss = F.cross_entropy(logits.view(-1, vocab), y.reshape(-1))
        return list(torch.autograd.grad(loss, params))

    def full_lstm() -> list[torch.Tensor]:  # the fused full LSTM of the same width
        logits, _ = full(x, full.init_state(x.shape[1]))
        loss = F.cross_entropy(logits.view(-1, vocab), y.reshape(-1))
        return list(torch.autograd.grad(loss, list(full.parameters())))

    stats_box: list[RecurrenceStats] = []
    st = RecurrenceSettings(recurrence=rec, rec_tol=tol, warm_start="zero")

    def parallel() -> list[torch.Tensor]:
        stats = RecurrenceStats()
        out, _ = parallel_recur(model, x, s0, st, k, stats)
        loss = F.cross_entropy(model.decode(out).view(-1, vocab), y.reshape(-1))
        g = list(torch.autograd.grad(loss, params))
        stats_box.append(stats)
        return g

    ref, got = sequential(), parallel()  # warm-up, and the gradients compared
    num = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(got, ref)))
    den = math.sqrt(sum(float(b.pow(2).sum()) for b in ref))
    ratios, t_seq, t_par, t_full = [], [], [], []
    sides = [sequential, parallel] + ([full_lstm] if full is not None else [])
    if full is not None:
        full_lstm()  # warm-up
    for i in range(repeats):
        order = sides if i % 2 == 0 else sides[::-1]
        times = {f.__name__: timed(f, device) for f in order}
        t_seq.append(times["sequential"])
        t_par.append(times["parallel"])
        ratios.append(times["sequential"] / times["parallel"])
        if full is not None:
            t_full.append(times["full_lstm"] / times["parallel"])
    recs = stats_box[-1].records
    fwd = max(r.fwd_iters for r in recs)
    adj = max(r.adj_iters for r in recs)
    blocks = recs[0].blocks
    return {"iterations": fwd, "adjoint_iterations": adj, "blocks": blocks,
            "fwd_residual": max(r.fwd_residual for r in recs),
            "fallback": any(r.fwd_fallback or r.adj_fallback for r in recs),
            "depth": depth(rec, k, blocks, fwd, adj, x.shape[0]) * len(recs),
            "sequential_depth": 2 * x.shape[0], "seq_s": statistics.median(t_seq),
            "par_s": statistics.median(t_par), "speedup_vs_sequential": statistics.median(ratios),
            "grad_rel_err": num / den,
            **({"speedup_vs_full_lstm": statistics.median(t_full)} if full is not None else {})}


def too_slow(rec: str, model: RNNLM, steps: int, batch: int, device: str,
             diag: bool) -> str | None:
    """Why a case is left out on this machine, or None."""
    if diag:
        if device == "cpu" and batch > 1 and steps > 1024:
            return (f"the diagonal cell's sequential reference loop over {steps} steps of "
                    f"{batch} columns on the CPU (run it on a GPU)")
        return None
    if rec == "jacobi":
        return None
    d = model.state_dim
    if device == "cpu" and (d > 256 or steps * batch > 256):
        return (f"dense {rec} on the CPU: {d} replicas of {steps * batch} tokens per "
                "iteration (run it on a GPU)")
    if d > 1024:
        return f"dense Newton with state size {d}: D^3 per combine"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--weights", nargs="+", default=["trained", "untrained"])
    p.add_argument("--recurrences", nargs="+", default=["jacobi", "newton", "quasi-newton"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-tokens", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--diag-steps", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--quick", action="store_true", help="T 64/256, B 1, one repeat")
    p.add_argument("--budget-min", type=float, default=None,
                   help="leave out (as skipped) the cases that would start after this many "
                        "minutes (default: 19 on the CPU, none on a GPU)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch, args.repeats = [64, 256], [1], 1
        args.diag_steps = [256, 1024]
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    corpus = load_corpus("ptb")
    data = corpus.valid.to(dev)
    cases, skipped = [], []
    budget = args.budget_min if args.budget_min is not None else (19.0 if dev == "cpu"
                                                                  else None)
    t_start = time.perf_counter()
    for name in args.models:
        for weights in args.weights:
            model = (trained_weights(name, args.train_tokens, dev) if weights == "trained"
                     else untrained(name, len(corpus.vocab), dev))
            model.eval()  # no dropout: the window's computation alone
            diag = name in DIAGONAL
            full = untrained("lstm-1x128", len(corpus.vocab), dev).eval() if diag else None
            for b in args.batch:
                for steps in (args.diag_steps if diag else args.steps):
                    xys = None
                    for rec in (["newton"] if diag else args.recurrences):
                        k = 1 if diag else args.block_size
                        base = {"T": steps, "B": b, "model": name, "weights": weights,
                                "recurrence": rec, "block_size": k}
                        why = too_slow(rec, model, steps, b, dev, diag) or \
                            too_short(data, steps, b)
                        minutes = (time.perf_counter() - t_start) / 60
                        if why is None and budget is not None and minutes > budget:
                            why = f"over this run's time budget (--budget-min {budget:g})"
                        if why:
                            skipped.append({**base, "why": why})
                            print(f"skip  {base}: {why}", flush=True)
                            continue
                        reps = 1 if dev == "cpu" and steps * b > 4096 else args.repeats
                        xys = xys or window(model, data, steps, b)
                        res = run_case(model, *xys, rec, k, args.tol, reps, dev, full)
                        res["repeats"] = reps
                        cases.append({**base, **res})
                        extra = (f" vs full LSTM {res['speedup_vs_full_lstm']:6.3f}"
                                 if diag else "")
                        print(f"{name:15s} {weights:9s} T={steps:5d} B={b} {rec:12s} "
                              f"iters {res['iterations']:3d}/{res['adjoint_iterations']:3d} "
                              f"depth {res['depth']:7.0f} (seq {2 * steps}) speed-up "
                              f"{res['speedup_vs_sequential']:6.3f}{extra} grad err "
                              f"{res['grad_rel_err']:.1e} [{minutes:.1f} min]", flush=True)
    print(f"total {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    print(json.dumps({"device": device_name(dev), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "tol": args.tol,
                      "cases": cases, "skipped": skipped}))


def too_short(data: torch.Tensor, steps: int, batch: int) -> str | None:
    """Why the validation split cannot give this window (and the 200 tokens before it)."""
    if (data.numel() - 1) // batch < steps + 200:
        return f"the validation split is too short for T={steps} in {batch} columns"
    return None


def window(model: RNNLM, data: torch.Tensor, steps: int, batch: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A window of validation text in ``batch`` columns and the state carried into it (the
    recurrence run over the 200 tokens before it)."""
    n = (data.numel() - 1) // batch
    if n < steps + 200:
        sys.exit(f"the validation split is too short for T={steps}, B={batch}")
    cols = data[: n * batch].view(batch, n).t()
    tgts = data[1: n * batch + 1].view(batch, n).t()
    with torch.no_grad():
        _, state = model(cols[:200], model.init_state(batch))
    return cols[200:200 + steps], tgts[200:200 + steps], model.flatten_state(state).detach()


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
