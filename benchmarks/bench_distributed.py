"""Batch Block TPROP on 1 rank x 1 thread against 2 ranks x 1 thread each: epoch wall time.

The same run (PTB, the first ``--train-tokens`` training tokens, LSTM ``--nhid``, K =
``--block-size``, penalty method in batch mode: one update per epoch covering every block,
``--h-steps`` h-steps and ``--theta-steps`` θ-steps, forward initialisation) is timed in fresh
processes of one thread each: first the ordinary one-process trainer, then
``tprop.distributed`` on ``--ranks`` ranks (gloo on 127.0.0.1). The forward initialisation of
the free states (once per run) is done before the clock starts; each timed epoch is one call
of ``train_epoch``. Per configuration it prints the epoch wall time, the time inside
communication (waiting included) and the rest ("compute"), and the bytes each rank hands to
the communication layer per update by kind: ``boundary`` (states and their gradients sent to
the neighbouring ranks), ``theta`` (θ-gradient all-reduce payload), ``scalars`` (norms and
statistics). Then a gloo micro-benchmark of the two exchanges (the cost model's α and β, see
docs/distributed.md) and one JSON line:

    {"speedup_2_ranks": ..., "bytes_per_update": ...}

``bytes_per_update`` is rank 0's total per update (rank 1 sends as much).

    python benchmarks/bench_distributed.py [--train-tokens 100000] [--epochs 2]
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

HERE = Path(__file__).resolve()
DEFAULT_DATA = HERE.parents[2] / "shared" / "data"


def config(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dataset="ptb", data_dir=args.data_dir, method="pm", blocks_per_update="all",
                model="lstm", emsize=args.nhid, nhid=args.nhid, bptt=args.block_size,
                train_tokens=args.train_tokens, eval_tokens=1000, h_steps=args.h_steps,
                theta_steps=args.theta_steps, h_optim="adagrad", h_lr=1.0, optim="adagrad",
                lr=0.1, h_init="forward", epochs=args.epochs, quiet=True, device="cpu",
                threads=1, seed=1, max_ppl=1e9, dist_timeout=600.0)


# ----------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from tprop.config import make_config
    from tprop.system import tune_allocator

    tune_allocator()
    cfg = make_config(**config(args))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    comm = None
    if world > 1:
        import torch.distributed as dist

        from tprop import distributed

        distributed.init_process_group(torch.device("cpu"), cfg.dist_timeout)
        trainer = distributed.make_trainer(cfg, None)
        comm = trainer.comm
        rank = dist.get_rank()
    else:
        from tprop.train import make_trainer

        trainer = make_trainer(cfg, None)
        rank = 0
    trainer._init_stored_z()  # once per run, untimed
    times, comm_s, nbytes = [], [], []
    for epoch in range(1, args.epochs + 1):
        if comm is not None:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        row = trainer.train_epoch(epoch, cfg.lr)
        times.append(time.perf_counter() - t0)
        if comm is not None:
            comm_s.append(comm.seconds)
            nbytes.append(dict(comm.bytes))
    result: dict[str, Any] = {
        "world": world, "rank": rank, "epoch_s": times, "comm_s": comm_s, "bytes": nbytes,
        "blocks": trainer.blocks.num_blocks, "state_dim": trainer.model.state_dim,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "evaluations": args.h_steps + args.theta_steps, "train_loss": row["train_loss"],
        "threads": torch.get_num_threads()}
    if comm is not None:
        result["micro"] = micro(trainer, comm)
    with open(f"{args.out}.{world}.{rank}", "w") as f:
        json.dump(result, f)
    if comm is not None:
        torch.distributed.destroy_process_group()


def micro(trainer: Any, comm: Any, reps: int = 20) -> dict[str, float]:
    """Seconds of one boundary exchange (a state row each way) and one θ all-reduce."""
    import torch
    import torch.distributed as dist

    d = trainer.model.state_dim
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    row = torch.zeros(1, d)
    r, w = comm.rank, comm.world
    out = {}
    for name, fn in (
        ("boundary_s", lambda: comm.shift(row, r + 1 if r + 1 < w else None,
                                          r - 1 if r > 0 else None, row)),
        ("allreduce_theta_s", lambda: dist.all_reduce(flat)),
        ("allreduce_scalar_s", lambda: dist.all_reduce(torch.zeros(1, dtype=torch.float64))),
    ):
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


# ----------------------------------------------------------------------------- driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, world: int, out: str) -> list[dict[str, Any]]:
    port = str(free_port())
    argv = [sys.executable, str(HERE), "--worker", "--out", out] + [
        a for a in sys.argv[1:] if a != "--worker"]
    procs = []
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        else:
            env.pop("WORLD_SIZE", None)
        procs.append(subprocess.Popen(argv, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker of the {world}-rank run failed: exit codes {codes}")
    return [json.load(open(f"{out}.{world}.{r}")) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-tokens", type=int, default=100_000)
    ap.add_argument("--nhid", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=10)
    ap.add_argument("--h-steps", type=int, default=2)
    ap.add_argument("--theta-steps", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (median kept)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("TPROP_DATA") or str(DEFAULT_DATA))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "res")
        one = launch(args, 1, out)[0]
        many = launch(args, args.ranks, out)
    t1 = statistics.median(one["epoch_s"])
    tp = max(statistics.median(r["epoch_s"]) for r in many)
    r0 = many[0]
    comm = statistics.median(r0["comm_s"])
    per_update = {k: v for k, v in r0["bytes"][-1].items()}  # batch mode: 1 update per epoch
    total = sum(per_update.values())
    print(f"batch PM on PTB: {one['blocks']} blocks of K={args.block_size} "
          f"({one['blocks'] * args.block_size:,} tokens), LSTM {args.nhid} "
          f"(state {one['state_dim']}, {one['params']:,} parameters), "
          f"{args.h_steps} h-steps + {args.theta_steps} θ-steps per update, 1 thread per rank")
    print(f"{'ranks':>5} {'epoch s':>9} {'compute s':>10} {'comm s':>8} {'speedup':>8}")
    print(f"{1:>5} {t1:9.2f} {t1:10.2f} {0.0:8.3f} {1.0:8.2f}")
    print(f"{args.ranks:>5} {tp:9.2f} {tp - comm:10.2f} {comm:8.3f} {t1 / tp:8.2f}")
    print("bytes per update, rank 0: " + ", ".join(f"{k} {v:,}" for k, v in
                                                    sorted(per_update.items())))
    m = r0["micro"]
    print(f"gloo on 127.0.0.1: boundary exchange {m['boundary_s'] * 1e6:.0f} us, θ all-reduce "
          f"({one['params'] * 4:,} bytes) {m['allreduce_theta_s'] * 1e3:.2f} ms, scalar "
          f"all-reduce {m['allreduce_scalar_s'] * 1e6:.0f} us")
    evals = one["evaluations"]
    print(f"compute per block-evaluation (1 rank): {t1 / (one['blocks'] * evals) * 1e6:.1f} us")
    print(json.dumps({"speedup_2_ranks": round(t1 / tp, 3), "bytes_per_update": total}))


if __name__ == "__main__":
    main()
