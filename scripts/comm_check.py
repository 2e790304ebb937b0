"""Every operation of ``tprop.distributed.DistComm`` on a process group of one machine's ranks,
checked against what it must return: the single-GPU check of the NCCL path (one rank per GPU;
with one GPU, one rank), and a gloo check on the CPU.

    torchrun --standalone --nproc-per-node N scripts/comm_check.py [--backend nccl|gloo]

Prints one JSON line per rank; exits 1 on the first wrong result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    args = p.parse_args()
    from tprop.distributed import DistComm

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, timeout=timedelta(seconds=60))
    comm = DistComm(device, 60)
    r, w = comm.rank, comm.world
    checks: dict[str, bool] = {}
    t = torch.full((3,), float(r + 1), device=device)
    checks["all_reduce"] = torch.equal(comm.all_reduce_(t.clone()),
                                       torch.full((3,), w * (w + 1) / 2, device=device))
    checks["max"] = comm.max(float(r)) == w - 1
    checks["sum"] = float(comm.sum([1.0, float(r)])[1]) == w * (w - 1) / 2
    checks["broadcast"] = torch.equal(comm.broadcast_(t.clone(), src=0),
                                      torch.ones(3, device=device))
    checks["broadcast_object"] = comm.broadcast_object({"r": r}) == {"r": 0}
    got = comm.all_gather(torch.tensor([float(r)], device=device))
    checks["all_gather"] = [float(g) for g in got] == [float(i) for i in range(w)]
    rows = [torch.tensor([i]) for i in range(w)]
    full = comm.gather_rows(torch.tensor([[float(r)]], device=device), rows, w)
    checks["gather_rows"] = full is None or full.view(-1).tolist() == list(map(float, range(w)))
    right = r + 1 if r + 1 < w else None
    left = r - 1 if r > 0 else None
    recv = comm.shift(t if right is not None else None, right, left, t)
    checks["shift"] = recv is None or float(recv[0]) == r  # the left neighbour's r + 1 - 1
    norm = comm.norm(torch.ones(4, device=device))
    checks["norm"] = abs(norm - (4 * w) ** 0.5) < 1e-6
    print(json.dumps({"rank": r, "world": w, "backend": comm.backend,
                      "device": str(device), **checks}), flush=True)
    comm.close()  # a barrier, then the group destroyed
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
