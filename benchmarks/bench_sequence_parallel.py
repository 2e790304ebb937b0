"""Sequence parallelism: one long window trained on 1 rank x 1 thread against 2 ranks x 1
thread each (gloo on 127.0.0.1), the same updates, measured in one run.

The exact parallel recurrence (``--recurrence jacobi``, blocks of ``--block-size``) trains an
LSTM language model (1x128, PTB-trained weights cached in ``runs/bench-weights/``, as
``bench_parallel_time.py``) on windows of ``--steps`` tokens of one column of PTB: each update
is the window's forward+backward, the θ-gradients summed over the ranks, an SGD step. The
two configurations alternate (``--repeats`` times each, after a warm-up update); the wall time
per update is the median of its updates. Reported: the speed-up of 2 ranks, the bytes the
solver exchanges per iteration (boundary states, residual maxima; the θ all-reduce apart),
the iterations per update. Ends with one JSON line.

    python benchmarks/bench_sequence_parallel.py [--steps 2048] [--updates 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
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
    times, iters, solver_bytes, theta_bytes = [], [], [], []
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
            iters.append(rec.fwd_iters + rec.adj_iters)
            solver_bytes.append(before / max(1, rec.fwd_iters + rec.adj_iters))
            theta_bytes.append(theta)
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps({
            "world": world, "update_s": statistics.median(times), "iterations": iters,
            "bytes_per_iteration": statistics.median(solver_bytes),
            "theta_bytes_per_update": statistics.median(theta_bytes)}))
    if world > 1:
        comm.close()


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--train-tokens", type=int, default=200_000)
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
    print(json.dumps({"steps": args.steps, "batch": 1, "model": "lstm-1x128 (PTB-trained)",
                      "block_size": args.block_size, "tol": args.tol,
                      "update_s_1_rank": one, "update_s_2_ranks": two,
                      "speedup_2_ranks": one / two,
                      "bytes_per_iteration": statistics.median(
                          r["bytes_per_iteration"] for r in runs[2]),
                      "theta_bytes_per_update": statistics.median(
                          r["theta_bytes_per_update"] for r in runs[2]),
                      "iterations": runs[2][-1]["iterations"],
                      "iterations_1_rank": runs[1][-1]["iterations"]}))


if __name__ == "__main__":
    main()
