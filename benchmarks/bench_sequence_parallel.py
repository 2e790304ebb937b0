"""Sequence parallelism: one long window trained on 1 rank x 1 thread against 2 ranks x 1
thread each (gloo on 127.0.0.1), the same updates, measured in one run.

The exact parallel recurrence (``--recurrence jacobi``, blocks of ``--block-size``) trains an
LSTM language model (1x128, PTB-trained weights cached in ``runs/bench-weights/``, as
``bench_parallel_time.py``) on windows of ``--steps`` tokens of one column of PTB: each update
is the window's forward+backward, the θ-gradients summed over the ranks, an SGD step. The
two configurations alternate (``--repeats`` times each, after a warm-up update); the wall time
per update is the median of its updates. Reported: the speed-up of 2 ranks, the bytes the
solver exchanges per iteration (boundary states, residual maxima; the θ all-reduce apart),
the iterations per update, sequential BPTT of the same window (one fused call) on the one
process, the measured cost of each exchange, and the cost model of docs/distributed.md
checked against the 2-rank time, then its predictions at 8, 64 and 512 ranks. Ends with one
JSON line.

    python benchmarks/bench_sequence_parallel.py [--steps 8192] [--updates 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): ``--updates`` timed updates; results to ``--out``."""
    import torch

    from tprop.comm import LOCAL
    from tprop.config import make_config
    from tprop.data import load_corpus
    from tprop.exact import ExactWindows
    from tprop.system import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    comm = LOCAL
    if world > 1:
        from tprop import distributed

        distributed.init_process_group(torch.device("cpu"), 120)
        comm = distributed.DistComm(torch.device("cpu"), 120)
    sys.path.insert(0, str(HERE))
    from bench_parallel_time import trained_weights

    model = trained_weights("lstm-1x128", args.train_tokens, "cpu")
    cfg = make_config(dataset="ptb", recurrence="jacobi", bptt=args.steps,
                      block_size=args.block_size, rec_tol=args.tol, warm_start="zero",
                      model="lstm", nhid=128, emsize=128)
    exact = ExactWindows(cfg, model, comm)
    data = load_corpus("ptb").train
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    state = model.flatten_state(model.init_state(1))
    times, iters, solver_bytes, theta_bytes, fwd_adj, waits = [], [], [], [], [], []
    for u in range(args.updates + 1):  # the first is a warm-up
        x = data[u * args.steps:(u + 1) * args.steps].view(-1, 1)
        y = data[u * args.steps + 1:(u + 1) * args.steps + 1].view(-1, 1)
        comm.reset()
        t0 = time.perf_counter()
        loss, state = exact.loss(u, x, y, state.detach())
        loss.backward()
        before = sum(comm.bytes.values())
        exact.reduce_grads(params)
        theta = sum(comm.bytes.values()) - before
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rec = exact.solves[-1]
        exact.solves.clear()
        if u:
            times.append(dt)
            waits.append(comm.seconds)  # in exchanges, waiting for the other rank included
            iters.append(rec.fwd_iters + rec.adj_iters)
            fwd_adj.append((rec.fwd_iters, rec.adj_iters))
            solver_bytes.append(before / max(1, rec.fwd_iters + rec.adj_iters))
            theta_bytes.append(theta)
    extra = exchange_costs(comm, state, params) if world > 1 else \
        {"sequential_s": sequential_time(model, data, args.steps, args.updates)}
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps({
            "world": world, "update_s": statistics.median(times), "iterations": iters,
            "comm_wait_s": statistics.median(waits),
            "blocks": rec.blocks, "fwd_adj_iterations": fwd_adj, "state_dim": int(state.shape[-1]),
            "theta": sum(p.numel() for p in params),
            "bytes_per_iteration": statistics.median(solver_bytes),
            "theta_bytes_per_update": statistics.median(theta_bytes), **extra}))
    if world > 1:
        comm.close()
        sys.stdout.flush()
        os._exit(0)  # the results are written: no gloo teardown at interpreter exit


def sequential_time(model: Any, data: Any, steps: int, updates: int) -> float:
    """Median seconds of sequential BPTT (one fused call) over the same windows."""
    import torch
    import torch.nn.functional as F

    params, times = list(model.parameters()), []
    for u in range(updates + 1):
        x = data[u * steps:(u + 1) * steps].view(-1, 1)
        y = data[u * steps + 1:(u + 1) * steps + 1].view(-1, 1)
        t0 = time.perf_counter()
        logits, _ = model(x, model.init_state(1))
        loss = F.cross_entropy(logits.view(-1, model.ntoken), y.reshape(-1))
        torch.autograd.grad(loss, params)
        if u:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def exchange_costs(comm: Any, state: Any, params: list[Any], reps: int = 50) -> dict[str, float]:
    """Median seconds of one boundary exchange (rank 0 to rank 1, one state row), one MAX
    all-reduce of a number and one all-reduce of the θ-gradients, on these ranks."""
    import torch

    flat = torch.zeros(sum(p.numel() for p in params))
    row = state.detach().reshape(1, -1).contiguous()
    ops = {"shift_s": lambda: comm.shift(row if comm.rank == 0 else None,
                                         1 if comm.rank == 0 else None,
                                         0 if comm.rank == 1 else None, row),
           "max_s": lambda: comm.max(1.0), "theta_allreduce_s": lambda: comm.all_reduce_(flat)}
    out = {}
    for name, op in ops.items():
        ts = []
        for _ in range(reps):
            comm.max(0.0)  # line the ranks up
            t0 = time.perf_counter()
            op()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def launch(world: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the worker on ``world`` ranks (or one process) and read its results."""
    base = [sys.executable, __file__, "--worker", "--out", str(out),
            "--steps", str(args.steps), "--block-size", str(args.block_size),
            "--updates", str(args.updates), "--tol", str(args.tol),
            "--train-tokens", str(args.train_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if world == 1:
        subprocess.run(base, env=env, check=True)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        procs = [subprocess.Popen(base, env={**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                             "WORLD_SIZE": str(world), "MASTER_ADDR":
                                             "127.0.0.1", "MASTER_PORT": port})
                 for r in range(world)]
        if any(p.wait() for p in procs):
            sys.exit("a rank failed")
    return json.loads(out.read_text())


# ------------------------------------------------------------------ the cost model
ALPHA, BETA = 50e-6, 1.25e9  # the network of the predictions: 10 Gb/s Ethernet


def model_time(p: int, blocks: int, t_block: float, sweeps: tuple[float, float],
               shift: float, mx: float, theta: float) -> tuple[float, float]:
    """(compute, communication) seconds of one Jacobi update on ``p`` ranks: each rank runs
    ⌈M/p⌉ blocks' share of the one-rank update; every forward sweep exchanges a boundary and
    takes a MAX, every adjoint sweep a boundary and two MAXes; then the θ all-reduce and the
    carried state's broadcast (about one boundary)."""
    f, a = sweeps
    comm = f * (shift + mx) + a * (shift + 2 * mx) + theta + shift if p > 1 else 0.0
    return math.ceil(blocks / p) * t_block, comm


def network(p: int, batch: int, dim: int, theta: int) -> tuple[float, float, float]:
    """Predicted (boundary, MAX, θ all-reduce) seconds on ``p`` ranks of ALPHA, BETA: a
    point-to-point row of B·D floats, a tree all-reduce of a number, a ring all-reduce."""
    lg = math.ceil(math.log2(p)) if p > 1 else 0
    return (ALPHA + 4 * batch * dim / BETA, 2 * lg * ALPHA,
            2 * (p - 1) * ALPHA + 2 * (p - 1) / p * 4 * theta / BETA)


def predictions(one: dict[str, Any], steps: int, k: int, ptb_sweeps: tuple[float, float]
                ) -> list[dict[str, Any]]:
    """The model at 8, 64 and 512 ranks for a PTB-scale and a long-context window, from the
    measured one-rank update (its cost per block and sweep, scaled by steps and columns)."""
    f, a = (statistics.median(x) for x in zip(*one["fwd_adj_iterations"]))
    per_sweep = one["update_s"] / one["blocks"] / (f + a + 2) / k  # one step of one column
    seq_tok = one["sequential_s"] / steps
    cases = [("PTB-scale", 320, 10, 20, ptb_sweeps), ("long context", 65536, k, 1, (f, a))]
    out = []
    for name, t, kk, b, (sf, sa) in cases:
        blocks = math.ceil(t / kk)
        t_block = per_sweep * kk * b * (sf + sa + 2)
        for p in (1, 8, 64, 512):
            row = {"case": name, "T": t, "K": kk, "B": b, "M": blocks, "ranks": p,
                   "sweeps": [sf, sa]}
            if p > blocks:
                out.append({**row, "note": f"{p} ranks > {blocks} blocks"})
                continue
            comp, comm = model_time(p, blocks, t_block, (sf, sa),
                                    *network(p, b, one["state_dim"], one["theta"]))
            out.append({**row, "compute_s": comp, "comm_s": comm, "update_s": comp + comm,
                        "vs_sequential": t * b * seq_tok / (comp + comm)})
    for r in out:
        base = next(x for x in out if x["case"] == r["case"] and x["ranks"] == 1)
        if "update_s" in r:
            r["vs_one_rank"] = base["update_s"] / r["update_s"]
    return out


def print_model(one: dict[str, Any], two: dict[str, Any], preds: list[dict[str, Any]]
                ) -> dict[str, float]:
    """The model's 2-rank time from the measured exchanges, against the measurement; the
    predictions as a table."""
    f, a = (statistics.median(x) for x in zip(*two["fwd_adj_iterations"]))
    comp, comm = model_time(2, one["blocks"], one["update_s"] / one["blocks"], (f, a),
                            two["shift_s"], two["max_s"], two["theta_allreduce_s"])
    print(f"exchanges on these 2 ranks: boundary {two['shift_s'] * 1e6:.0f} µs, MAX "
          f"{two['max_s'] * 1e6:.0f} µs, θ all-reduce {two['theta_allreduce_s'] * 1e3:.2f} ms")
    print(f"model, 2 ranks: {comp:.3f} s compute + {comm:.3f} s communication = "
          f"{comp + comm:.3f} s per update (measured {two['update_s']:.3f} s); "
          f"predicted speed-up {one['update_s'] / (comp + comm):.2f}")
    print(f"measured, 2 ranks: {two['update_s'] - two['comm_wait_s']:.3f} s outside the "
          f"exchanges + {two['comm_wait_s']:.3f} s in them (waiting for the other rank "
          f"included); half the 1-rank update: {one['update_s'] / 2:.3f} s")
    print(f"sequential BPTT of the window (one fused call, 1 rank): {one['sequential_s']:.3f} s")
    print("| case | T | K | B | M | ranks | sweeps f/a | compute s | comm s | update s | "
          "vs 1-rank Jacobi | vs sequential BPTT |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in preds:
        head = (f"| {r['case']} | {r['T']} | {r['K']} | {r['B']} | {r['M']} | {r['ranks']} "
                f"| {r['sweeps'][0]:g}/{r['sweeps'][1]:g} |")
        if "note" in r:
            print(head + f" — | — | — | — | — ({r['note']}) |")
        else:
            print(head + f" {r['compute_s']:.4g} | {r['comm_s']:.3g} | {r['update_s']:.4g} | "
                  f"{r['vs_one_rank']:.1f} | {r['vs_sequential']:.2f} |")
    return {"model_update_s_2_ranks": comp + comm,
            "model_speedup_2_ranks": one["update_s"] / (comp + comm)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--train-tokens", type=int, default=200_000)
    p.add_argument("--ptb-sweeps", type=float, nargs=2, default=(18.5, 13.95),
                   metavar=("FWD", "ADJ"), help="Jacobi sweeps per window (forward, adjoint) "
                   "of the PTB-scale prediction (default: measured at T = 320, K = 10, "
                   "docs/parallel_time.md, study 3, c = all)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for world in ((1, 2) if i % 2 == 0 else (2, 1)):
                res = launch(world, args, Path(tmp) / f"r{world}-{i}.json")
                runs[world].append(res)
                print(f"repeat {i + 1}: {world} rank{'s' if world > 1 else ''}: "
                      f"{res['update_s']:.3f} s per update, iterations {res['iterations']}, "
                      f"{res['bytes_per_iteration']:.0f} bytes per iteration", flush=True)
    one = statistics.median(r["update_s"] for r in runs[1])
    two = statistics.median(r["update_s"] for r in runs[2])
    med1 = {**runs[1][-1], "update_s": one, "sequential_s": statistics.median(
        r["sequential_s"] for r in runs[1])}
    med2 = {**runs[2][-1], "update_s": two, **{k: statistics.median(r[k] for r in runs[2])
                                                for k in ("shift_s", "max_s",
                                                          "theta_allreduce_s", "comm_wait_s")}}
    preds = predictions(med1, args.steps, args.block_size, tuple(args.ptb_sweeps))
    checked = print_model(med1, med2, preds)
    print(json.dumps({"steps": args.steps, "batch": 1, "model": "lstm-1x128 (PTB-trained)",
                      "block_size": args.block_size, "tol": args.tol,
                      "update_s_1_rank": one, "update_s_2_ranks": two,
                      "speedup_2_ranks": one / two,
                      "bytes_per_iteration": statistics.median(
                          r["bytes_per_iteration"] for r in runs[2]),
                      "theta_bytes_per_update": statistics.median(
                          r["theta_bytes_per_update"] for r in runs[2]),
                      "iterations": runs[2][-1]["iterations"],
                      "iterations_1_rank": runs[1][-1]["iterations"],
                      "sequential_s_1_rank": med1["sequential_s"],
                      "exchange_s": {k: med2[k] for k in ("shift_s", "max_s",
                                                          "theta_allreduce_s")},
                      "comm_wait_s_2_ranks": med2["comm_wait_s"],
                      **checked, "predictions": preds}))


if __name__ == "__main__":
    main()
