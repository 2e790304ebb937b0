"""Distributed training on ``torch.distributed``: block-parallel Block TPROP, data-parallel BPTT.

Launched by ``torchrun`` (``torchrun --nproc-per-node N -m tprop train ...``, on one machine or
many) or by ``tprop train --nproc N`` on one machine; ``docs/distributed.md`` is the user's
guide and holds the cost model. Backends: gloo on the CPU, NCCL on CUDA devices.

Block TPROP (methods pm, admm, alm). The blocks of every update are cut into contiguous
shards, one per rank (``split``: the first ``M mod P`` ranks take one block more). Rank r owns
blocks ``[s_r, e_r)``, the free states *after* them (``z_{s_r+1} … z_{e_r}``) and their duals,
so every penalty term is local; the only coupling is that block ``s_r`` enters from rank
r−1's last free state. Per evaluation of J:

* forward: rank r−1 sends that state (one row of ``state_dim`` numbers) to rank r
  (point-to-point ``isend``/``irecv``), which uses it as the entering state of its first block;
* backward (when the free states are being optimised): rank r sends the gradient of J with
  respect to that entering state back to rank r−1, which adds it to the gradient of its last
  free state (through the ``arctanh`` reparametrisation when on);
* θ-gradients are all-reduced (one flat buffer, SUM) and divided by the update's *global*
  number of blocks; the norms that decide clipping and early stopping of h-steps / ALM steps
  (and the dual increment's clip) are global norms (an all-reduce of the squared norm), so
  every rank takes the same steps and the result equals the one-process run's.

The forward initialisation of the free states is run in full on every rank (a recurrence-only
pass: over the update's span in minibatch mode, over the training stream once per run in batch
mode), each rank keeping its own rows: exact, and no rank waits on another. In minibatch mode
the state carried to the next update (the last block's final state, on the last rank) is
broadcast. Checkpoints gather the sharded free states and duals to rank 0 and hold the full
tensors, so a run resumes on any number of ranks (one process included).

BPTT: ``DistributedDataParallel`` over stream columns: the global batch of B columns is cut
into P contiguous groups of B/P columns; each rank's loss is the mean over its columns and
DDP averages the gradients, which is the one-process gradient of the same B columns.

Only rank 0 writes the run directory, the log and the progress bar. Validation shares the
split's evaluation columns out over the ranks and all-reduces the summed cross entropy, so
every rank takes the same learning-rate and stopping decisions. A rank that dies is noticed
by the others at their next exchange (the connection closes); a rank that hangs, after
``--dist-timeout`` seconds. They then stop with the message of ``lost_contact_message`` and
exit with status ``EXIT_LOST_CONTACT``; the last checkpoint is written atomically and stays
intact.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .btprop import BTPROPTrainer
from .checkpoint import load_checkpoint
from .config import BTPROP_METHODS, ConfigError, TrainConfig
from .constraints import StateTerms
from .data import StreamColumns
from .evaluate import eval_chunk_len
from .objective import BlockProblem, forward_states
from .optim import build_optimizer, set_lr
from .rundir import RunDir
from .solvers import ADMM, ALM, PenaltyMethod, SolverSettings, UpdateStats
from .system import resolve_device
from .train import BPTTTrainer, Trainer

EXIT_LOST_CONTACT = 4  # exit status of a rank that lost contact with another one
EXIT_TERMINATED = 143  # stopped by SIGTERM (torchrun stops every rank when one fails)
DEFAULT_TIMEOUT_S = 120.0
LOST_CONTACT = "lost contact with another rank"

# Phrases of the errors gloo / NCCL / the c10d store raise when a peer is gone or silent.
_COMM_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe",
                 "peer", "socket", "store", "c10d")


# ============================================================================ process group
def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_process_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Join the process group torchrun describes in the environment (``env://``): gloo for a
    CPU run, NCCL for a CUDA one (each rank on GPU ``LOCAL_RANK``). Returns the backend."""
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this build of torch")
    if dist.is_initialized():
        return str(dist.get_backend())
    backend = "gloo"
    if device.type == "cuda":
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return backend


def is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` says that another rank is gone or not answering."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    if isinstance(e, (RuntimeError, ConnectionError, TimeoutError, OSError)):
        text = str(e).lower()
        return any(m in text for m in _COMM_MARKERS)
    return False


def lost_contact_message(rank_: int, world: int, error: BaseException, timeout_s: float,
                         out: str | None, epoch: int | None) -> str:
    """The documented message of a rank that stops because another rank died or hung."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(reason) > 300:
        reason = reason[:300] + "…"
    if out is None:
        ckpt = "this run writes no checkpoints"
    elif epoch == 0:
        ckpt = "no epoch has finished, so no checkpoint was written"
    else:
        ckpt = (f"the last checkpoint, {Path(out) / 'last.pt'} (written by rank 0), is intact; "
                f"continue with `tprop train --resume {out}` on any number of ranks")
    return (f"tprop train: rank {rank_} of {world}: {LOST_CONTACT} ({reason}). A rank that dies "
            f"is noticed at once, one that hangs after --dist-timeout {timeout_s:g} s. "
            f"Stopping; {ckpt}.")


# ============================================================================ sharding
def split(count: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards ``(start, stop)`` of ``count`` items over ``world`` ranks, the first
    ``count mod world`` ranks taking one more: ranks with items always form a prefix."""
    base, extra = divmod(count, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass(frozen=True)
class SpanShard:
    """One update's span ``[a, b)`` and this rank's blocks ``[s, e)`` of it; ``lo`` is where its
    rows start in the rank's stored free states / duals; ``nonempty`` ranks hold blocks."""

    a: int
    b: int
    s: int
    e: int
    lo: int
    nonempty: int

    @property
    def size(self) -> int:
        return self.e - self.s

    @property
    def hi(self) -> int:
        return self.lo + self.size


def plan_spans(n: int, m: int, world: int) -> list[list[SpanShard]]:
    """For each rank, its shard of every update's span (updates of ``m`` blocks out of ``n``)."""
    plans: list[list[SpanShard]] = [[] for _ in range(world)]
    lo = [0] * world
    for a in range(0, n, m):
        b = min(a + m, n)
        shards = split(b - a, world)
        nonempty = sum(1 for s, e in shards if e > s)
        for r, (s, e) in enumerate(shards):
            plans[r].append(SpanShard(a, b, a + s, a + e, lo[r], nonempty))
            lo[r] += e - s
    return plans


def owned_rows(plan: Sequence[SpanShard]) -> torch.Tensor:
    """Global row indices (blocks) of a rank's stored free states, in storage order."""
    parts = [torch.arange(sp.s, sp.e) for sp in plan]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# ============================================================================ communication
class Comm:
    """The exchanges of one rank, with the bytes it hands to them (by kind) and the wall time
    spent in them (waiting for slower ranks included)."""

    def __init__(self, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = device
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds = 0.0

    def reset(self) -> None:
        self.bytes = defaultdict(int)
        self.seconds = 0.0

    @contextmanager
    def _timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def _count(self, kind: str, t: torch.Tensor) -> None:
        self.bytes[kind] += t.numel() * t.element_size()

    def all_reduce_(self, t: torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        """In-place SUM over ranks."""
        with self._timed():
            dist.all_reduce(t)
        self._count(kind, t)
        return t

    def sum(self, values: Sequence[float] | torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        """Float64 sum over ranks of a vector of numbers."""
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device).reshape(-1).clone()
        return self.all_reduce_(t, kind).cpu()

    def broadcast_(self, t: torch.Tensor, src: int = 0, kind: str = "broadcast") -> torch.Tensor:
        with self._timed():
            dist.broadcast(t, src)
        if self.rank == src:
            self._count(kind, t)
        return t

    def shift(self, send: torch.Tensor | None, to: int | None, recv_from: int | None,
              like: torch.Tensor, kind: str = "boundary") -> torch.Tensor | None:
        """Point-to-point: send ``send`` to rank ``to`` and receive a tensor shaped as ``like``
        from rank ``recv_from`` (either may be None), both posted before either is waited."""
        reqs, got = [], None
        with self._timed():
            if recv_from is not None:
                got = torch.empty_like(like)
                reqs.append(dist.irecv(got, recv_from))
            if to is not None:
                assert send is not None
                send = send.detach().contiguous()
                reqs.append(dist.isend(send, to))
                self._count(kind, send)
            for req in reqs:
                req.wait()
        return got

    def gather_rows(self, local: torch.Tensor, rows: Sequence[torch.Tensor],
                    total: int) -> torch.Tensor | None:
        """Assemble on rank 0 the ``(total, D)`` tensor whose rows ``rows[r]`` rank r holds
        (``local``, in that order); None on the other ranks."""
        width = max(1, max(len(r) for r in rows))
        pad = local.new_zeros(width, local.shape[1])
        pad[: local.shape[0]] = local
        bufs = [torch.empty_like(pad) for _ in range(self.world)] if self.rank == 0 else None
        with self._timed():
            dist.gather(pad, bufs, dst=0)
        self._count("gather", local)
        if self.rank != 0:
            return None
        full = local.new_zeros(total, local.shape[1])
        for r, idx in enumerate(rows):
            full[idx.to(full.device)] = bufs[r][: len(idx)]
        return full


# ============================================================================ BTPROP problem
class ShardedBlockProblem(BlockProblem):
    """This rank's shard of one update's blocks. ``evaluate`` and ``final_states`` exchange the
    boundary state with the neighbouring ranks; ``total_blocks`` is the update's global M.

    ``z_fixed`` is the state entering the shard's first block: the fixed carried state on the
    first rank, and on the others a copy of the previous rank's last free state, received at
    every evaluation (a leaf requiring grad when the free states are being optimised, its
    gradient then sent back)."""

    def __init__(self, model: Any, inputs: torch.Tensor, targets: torch.Tensor,
                 z_fixed: torch.Tensor, z_init: torch.Tensor, lam: float,
                 dual: torch.Tensor | None = None, *, comm: Comm, total_blocks: int,
                 nonempty: int, arctanh: bool = False, chunk_blocks: int | None = None,
                 terms: StateTerms | None = None) -> None:
        # the extra terms (tprop.constraints) are local to each block: no extra exchange
        super().__init__(model, inputs, targets, z_fixed, z_init, lam, dual, arctanh=arctanh,
                         chunk_blocks=chunk_blocks, terms=terms)
        self.comm = comm
        self.total_blocks = total_blocks
        r = comm.rank
        self.nonempty = nonempty
        self.has_left = 0 < r < nonempty
        self.has_right = r + 1 < nonempty
        self.is_last = r == nonempty - 1
        self.entering_fixed = not self.has_left

    def _receive_entering(self, requires_grad: bool) -> None:
        r = self.comm.rank
        with torch.no_grad():  # the last free state (the same op as the one-process pass)
            send = self.param.to_z(self.w.detach()[-1:]) if self.has_right else None
        got = self.comm.shift(send, r + 1 if self.has_right else None,
                              r - 1 if self.has_left else None, self.z_fixed)
        if got is not None:
            self.z_fixed = got.requires_grad_(requires_grad)

    def _return_gradient(self) -> None:
        r = self.comm.rank
        send = None
        if self.has_left:
            g = self.z_fixed.grad
            send = g if g is not None else torch.zeros_like(self.z_fixed)
        got = self.comm.shift(send, r - 1 if self.has_left else None,
                              r + 1 if self.has_right else None, self.z_fixed.detach())
        if got is not None:
            with torch.enable_grad():
                self.param.to_z(self.w[-1:]).backward(got)

    def evaluate(self, *, theta: bool = False, states: bool = False,
                 token_ce: bool = False) -> Any:
        self._receive_entering(states)
        res = super().evaluate(theta=theta, states=states, token_ce=token_ce)
        if states:
            self._return_gradient()
        return res

    @torch.no_grad()
    def final_states(self) -> torch.Tensor:
        self._receive_entering(False)
        if self.num_blocks == 0:
            return self.w.new_zeros(0, self.w.shape[1])
        return super().final_states()

    def carried_out(self) -> torch.Tensor:
        """The update's last final state (on the last rank holding blocks), on every rank."""
        buf = (self.last_final.detach().clone() if self.is_last
               else self.z_fixed.detach().new_zeros(self.z_fixed.shape))
        return self.comm.broadcast_(buf, src=self.nonempty - 1, kind="carried")


# ============================================================================ BTPROP solvers
class _ShardedSolver:
    """What a solver does differently on a shard: θ-gradients all-reduced and divided by the
    global number of blocks; free-state norms (clipping, h_tol, ALM's stopping test, the dual
    gradient's clip) taken over all ranks. Everything else is the single-process solver."""

    comm: Comm
    params: list[torch.Tensor]
    settings: SolverSettings
    theta_optimizer: torch.optim.Optimizer
    state: dict[str, Any]

    def _scale_theta_grads(self, problem: BlockProblem) -> None:
        for p in self.params:
            if p.grad is None:  # a rank without blocks in this update
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        self.comm.all_reduce_(flat, "theta")
        flat.div_(problem.total_blocks)
        i = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[i:i + n].view_as(p))
            i += n

    def _state_norm(self, t: torch.Tensor | None) -> float:
        sq = 0.0 if t is None else float(t.detach().double().pow(2).sum())
        return math.sqrt(float(self.comm.sum([sq])[0]))


class ShardedPM(_ShardedSolver, PenaltyMethod):
    pass


class ShardedADMM(_ShardedSolver, ADMM):
    pass


class ShardedALM(_ShardedSolver, ALM):
    pass


SHARDED_SOLVERS: dict[str, type[PenaltyMethod]] = {
    "pm": ShardedPM, "admm": ShardedADMM, "alm": ShardedALM}


# ============================================================================ trainers
class _DistributedTrainer:
    """What every distributed trainer shares: rank 0 alone logs, shows progress and writes the
    run directory; validation uses rank 0's value; ``gather_checkpoints`` (True when the run
    has a directory) makes the trainer gather its sharded state for rank 0's checkpoints."""

    comm: Comm
    cfg: TrainConfig
    epoch: int

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None,
                 corpus: Any = None, *, gather_checkpoints: bool | None = None) -> None:
        if not is_active():
            raise ConfigError("distributed training needs an initialised process group of "
                              "more than one rank (launch with torchrun or tprop train --nproc)")
        self.comm = Comm(resolve_device(cfg.device))
        self.gather_checkpoints = (run_dir is not None if gather_checkpoints is None
                                   else gather_checkpoints)
        if self.comm.rank != 0:
            cfg, run_dir = cfg.replace(quiet=True), None
        super().__init__(cfg, run_dir, corpus)  # type: ignore[call-arg]

    def _seed_rank(self) -> None:
        """Ranks other than 0 draw their own dropout masks."""
        if self.comm.rank:
            epoch = getattr(self, "epoch", 0)
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.comm.rank + 7919 * epoch)

    def log(self, line: str) -> None:
        if self.comm.rank == 0:
            super().log(line)  # type: ignore[misc]

    @torch.no_grad()
    def evaluate_loss(self, data: torch.Tensor) -> float:
        """As ``tprop.evaluate.evaluate``, the split's ``eval_batch_size`` columns shared out
        over the ranks (contiguous groups, the same windows), the summed cross entropy
        all-reduced: every rank gets the same value, equal to one process's up to rounding."""
        model, comm = self.model, self.comm  # type: ignore[attr-defined]
        b = self.cfg.eval_batch_size
        cols = StreamColumns(data, b)
        c0, c1 = split(b, comm.world)[comm.rank]
        total = torch.zeros((), dtype=torch.float64, device=comm.device)
        if c1 > c0:
            was = model.training
            model.eval()
            state = model.init_state(c1 - c0)
            for x, y in cols.windows(eval_chunk_len(b, model.ntoken), drop_last=False):
                logits, state = model(x[:, c0:c1], state)
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         y[:, c0:c1].reshape(-1), reduction="sum").double()
            model.train(was)
        return float(comm.sum([float(total)], kind="eval")[0]) / cols.num_tokens

    def restore(self, ckpt: dict[str, Any]) -> None:
        super().restore(ckpt)  # type: ignore[misc]
        self._seed_rank()

    def summarize(self, last_row: dict[str, Any], session_s: float) -> dict[str, Any]:
        if self.comm.rank != 0:  # rank 0 measures the test perplexity and writes the summary
            return {"status": self.status, "method": self.cfg.method,  # type: ignore[attr-defined]
                    "epochs_run": self.epoch, "rank": self.comm.rank}
        summary = super().summarize(last_row, session_s)  # type: ignore[misc]
        summary["world_size"] = self.comm.world
        return summary

    def _comm_row(self, updates: int) -> dict[str, Any]:
        b = dict(self.comm.bytes)
        return {"world_size": self.comm.world,
                "comm_bytes_per_update": sum(b.values()) / max(updates, 1),
                "comm_s": self.comm.seconds}


class DistributedBTPROPTrainer(_DistributedTrainer, BTPROPTrainer):
    """Block TPROP with every update's blocks sharded over the ranks (see the module doc)."""

    def setup(self) -> None:
        cfg, model, comm = self.cfg, self.model, self.comm
        n = self._layout()
        for p in model.parameters():  # every rank starts from rank 0's parameters
            comm.broadcast_(p.data, 0, kind="setup")
        theta_opt = build_optimizer(model.parameters(), cfg.optim, cfg.lr)
        self.solver = SHARDED_SOLVERS[cfg.method](model, theta_opt,
                                                  SolverSettings.from_config(cfg))
        self.solver.comm = comm  # type: ignore[attr-defined]
        plans = plan_spans(n, self.m, comm.world)
        self.plan = plans[comm.rank]
        self.rows_by_rank = [owned_rows(p) for p in plans]
        self.rows = self.rows_by_rank[comm.rank]
        d, dev, dtype = model.state_dim, self.device, model.decoder.weight.dtype
        keep_z = self.batch_mode or cfg.h_init in ("persist", "forward-parallel")
        # this rank's rows only: Z[i] = the state after block rows[i]
        self.Z = torch.zeros(len(self.rows), d, device=dev, dtype=dtype) if keep_z else None
        self.U = (torch.zeros(len(self.rows), d, device=dev, dtype=dtype)
                  if self.solver.uses_duals else None)
        self.z_ready = False
        self._gathered: dict[str, torch.Tensor | None] = {"Z": None, "U": None}
        self._seed_rank()

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """On rank 0: the full free states and duals gathered at the end of the last epoch."""
        return {"solver": self.solver.state_dict(), "Z": self._gathered["Z"],
                "U": self._gathered["U"], "z_ready": self.z_ready}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.solver.load_state_dict(state["solver"])
        for name in ("Z", "U"):
            full, mine = state.get(name), getattr(self, name)
            if full is not None and mine is not None:
                if full.shape[0] != self.blocks.num_blocks:
                    raise ConfigError(f"--resume: the checkpoint's {name} has {full.shape[0]} "
                                      f"rows, this run {self.blocks.num_blocks} blocks")
                mine.copy_(full[self.rows])
        self.z_ready = state["z_ready"]

    def _gather_state(self) -> None:
        n = self.blocks.num_blocks
        for name in ("Z", "U"):
            mine = getattr(self, name)
            self._gathered[name] = (None if mine is None else
                                    self.comm.gather_rows(mine, self.rows_by_rank, n))

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def _forward_rows(self, rows: torch.Tensor, through: int) -> torch.Tensor:
        """The states after blocks ``rows`` when the recurrence runs through the first
        ``through`` blocks of the stream from the zero state, as ``forward_states`` computes
        them (the same calls: bitwise the same), only ``rows`` being kept."""
        model = self.model
        out = torch.zeros(len(rows), model.state_dim, device=self.device,
                          dtype=model.decoder.weight.dtype)
        where = torch.full((self.blocks.num_blocks,), -1, dtype=torch.long)
        where[rows] = torch.arange(len(rows))
        last = through - 1
        was = model.training
        model.eval()
        state = model.unflatten_state(out.new_zeros(1, model.state_dim))
        step = 4096
        for c0 in range(0, last + 1, step):
            c1 = min(c0 + step, last + 1)
            emb = model.encoder(self.blocks.inputs[c0:c1].t())
            for j in range(c0, c1):
                _, state = model.rnn(emb[:, j - c0:j - c0 + 1], state)
                i = int(where[j])
                if i >= 0:
                    out[i] = model.flatten_state(state)[0]
        model.train(was)
        return out

    @torch.no_grad()
    def _init_stored_z(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.h_init in ("forward", "persist"):
            # the whole stream on every rank, so that none waits on another
            self.Z.copy_(self._forward_rows(self.rows, self.blocks.num_blocks))
        elif cfg.h_init == "forward-parallel" and len(self.rows):
            was = model.training
            model.eval()
            self.Z.copy_(model.final_state_flat(self.blocks.inputs[self.rows].t(),
                                                self.Z.new_zeros(len(self.rows), model.state_dim)))
            model.train(was)
        self.z_ready = True

    def _initial_shard_states(self, sp: SpanShard, carried: torch.Tensor) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        if self.batch_mode:
            return self.Z
        if cfg.h_init == "forward":  # the whole span on every rank, this rank's rows kept
            full = forward_states(model, self.blocks.inputs[sp.a:sp.b].t(), carried)
            return full[sp.s - sp.a:sp.e - sp.a]
        if cfg.h_init == "forward-parallel":
            r = self.comm.rank
            has_left, has_right = 0 < r < sp.nonempty, r + 1 < sp.nonempty
            send = self.Z[sp.hi - 1:sp.hi] if has_right else None
            left = self.comm.shift(send, r + 1 if has_right else None,
                                   r - 1 if has_left else None, carried)
            if sp.size == 0:
                return carried.new_zeros(0, model.state_dim)
            first = left if has_left else carried
            entering = torch.cat([first, self.Z[sp.lo:sp.hi - 1]], 0)
            was = model.training
            model.eval()
            with torch.no_grad():
                out = model.final_state_flat(self.blocks.inputs[sp.s:sp.e].t(), entering)
            model.train(was)
            return out
        if cfg.h_init == "zero":
            return carried.new_zeros(sp.size, model.state_dim)
        return self.Z[sp.lo:sp.hi].clone()  # persist

    # ------------------------------------------------------------------ epoch
    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        cfg, model, comm = self.cfg, self.model, self.comm
        set_lr(self.solver.theta_optimizer, lr)
        model.train()
        if self.Z is not None and not self.z_ready:
            self._init_stored_z()
        n, k = self.blocks.num_blocks, cfg.bptt
        carried = torch.zeros(1, model.state_dim, device=self.device,
                              dtype=model.decoder.weight.dtype)
        tot = {"ce": 0.0, "penalty": 0.0, "residual": 0.0, "h_steps": 0}
        terms = StateTerms.from_config(cfg)  # None: the paper's objective
        nx = 0 if terms is None else 2  # the extra terms' values summed over the ranks
        if terms is not None:
            tot.update(kl=0.0, l1=0.0)
        pos = torch.zeros(k, dtype=torch.float64) if cfg.positional_ppl else None
        lam = self.solver.lam
        bar = self.progress(len(self.plan), f"epoch {epoch}")
        comm.reset()
        t0 = time.perf_counter()
        for i, sp in enumerate(self.plan):
            z_init = self._initial_shard_states(sp, carried)
            x, y = self.blocks.span(sp.s, sp.e)
            dual = self.U[sp.lo:sp.hi] if self.U is not None else None
            problem = ShardedBlockProblem(
                model, x, y, carried, z_init, lam, dual, comm=comm, total_blocks=sp.b - sp.a,
                nonempty=sp.nonempty, arctanh=cfg.arctanh, chunk_blocks=cfg.chunk_blocks,
                terms=terms)
            stats: UpdateStats = self.solver.step(problem, epoch)
            if not self.batch_mode:
                carried = problem.carried_out()
            if self.Z is not None:
                self.Z[sp.lo:sp.hi] = problem.z
            local = [stats.ce, stats.penalty, stats.residual]
            if terms is not None:
                local += [stats.kl, stats.l1]
            if pos is not None:
                tok = stats.token_ce if stats.token_ce is not None else torch.zeros(k)
                local += tok.double().cpu().tolist()
            summed = comm.sum(local)
            tot["ce"] += float(summed[0])
            tot["penalty"] += float(summed[1])
            tot["residual"] += float(summed[2])
            tot["h_steps"] += stats.h_steps
            if terms is not None:
                tot["kl"] += float(summed[3])
                tot["l1"] += float(summed[4])
            if pos is not None:
                pos += summed[3 + nx:]
            self._progress(bar, epoch, i + 1, len(self.plan), tot, sp.b, t0)
        bar.close()
        self.solver.end_epoch()
        updates = len(self.plan)
        out: dict[str, Any] = {
            "train_loss": tot["ce"] / n,
            "tokens": n * k,
            "ce": tot["ce"] / n,
            "penalty": tot["penalty"] / n,
            "residual": tot["residual"] / n,
            "dual_norm": (float(comm.sum([float(self.U.norm(dim=1).sum())])[0]) / n
                          if self.U is not None else 0.0),
            "h_steps": tot["h_steps"] / updates,
            "lambda": lam,
            "updates": updates,
        }
        if terms is not None:  # the extra terms, per block
            out.update(kl=tot["kl"] / n, l1=tot["l1"] / n)
        if pos is not None:
            out["positional_ppl"] = [math.exp(min(v / n, 700.0)) for v in pos.tolist()]
        out.update(self._comm_row(updates))
        if self.gather_checkpoints:
            self._gather_state()
        return out


class DDPBPTTTrainer(_DistributedTrainer, BPTTTrainer):
    """Truncated BPTT with ``DistributedDataParallel`` over the stream columns: rank r trains
    columns ``[r·B/P, (r+1)·B/P)`` of the one-process layout of B columns."""

    def setup(self) -> None:
        super().setup()  # the global layout of B columns, the optimiser
        cfg, comm = self.cfg, self.comm
        b, p = cfg.batch_size, comm.world
        if b % p:
            raise ConfigError(f"--batch-size: {b} stream columns do not split evenly over {p} "
                              f"ranks; use a multiple of {p}")
        per = b // p
        full = self.columns
        cols = copy.copy(full)
        cols.inputs = full.inputs[:, comm.rank * per:(comm.rank + 1) * per]
        cols.targets = full.targets[:, comm.rank * per:(comm.rank + 1) * per]
        cols.batch_size = per
        self.columns = cols
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index or torch.cuda.current_device()] if self.device.type == "cuda" \
            else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self._seed_rank()

    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        cfg, model, opt, comm = self.cfg, self.model, self.optimizer, self.comm
        set_lr(opt, lr)
        self.ddp.train()
        params = list(model.parameters())
        nwin = self.columns.num_windows(cfg.bptt)
        accum = nwin if cfg.full_batch else cfg.update_freq
        state = model.init_state(self.columns.batch_size)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        bar = self.progress(nwin, f"epoch {epoch}")
        comm.reset()
        t0, done, updates = time.perf_counter(), 0, 0
        opt.zero_grad(set_to_none=True)
        for w, (x, y) in enumerate(self.columns.windows(cfg.bptt)):
            group = min(accum, nwin - (w // accum) * accum)
            sync = (w + 1) % accum == 0 or w + 1 == nwin
            state = model.detach_state(state)
            with nullcontext() if sync else self.ddp.no_sync():
                logits, state = self.ddp(x, state)
                loss = F.cross_entropy(logits.view(-1, self.ntoken), y.reshape(-1))
                (loss / group).backward()
            loss_sum += loss.detach()
            if sync:
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                updates += 1
                for p in params:  # what DDP all-reduced for this update
                    comm.bytes["theta"] += p.numel() * p.element_size()
            if (w + 1) % 50 == 0 or w + 1 == nwin:
                mean = float(comm.sum([float(loss_sum)])[0]) / comm.world / (w + 1)
                self.check_finite(mean, f"epoch {epoch}, window {w + 1}")
                bar.update(w + 1 - done)
                done = w + 1
                tok_s = done * x.numel() * comm.world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tok_s:,.0f}")
        bar.close()
        out = {"train_loss": mean, "tokens": nwin * cfg.bptt * cfg.batch_size}
        out.update(self._comm_row(updates))
        return out


def make_trainer(cfg: TrainConfig, out: str | Path | None = None, corpus: Any = None,
                 **kw: Any) -> Trainer:
    """The distributed trainer for ``cfg.method`` (inside an initialised process group).
    Every rank passes the same ``out``; rank 0 alone writes there."""
    if cfg.method in BTPROP_METHODS:
        return DistributedBTPROPTrainer(cfg, out, corpus, **kw)
    if cfg.method == "bptt":
        return DDPBPTTTrainer(cfg, out, corpus, **kw)
    raise ConfigError(f"--method: unknown method {cfg.method!r}")


# ============================================================================ command line
RESUME_OVERRIDES = {"epochs", "device", "quiet", "threads", "patience", "dist_timeout"}


class Terminated(BaseException):
    """SIGTERM arrived (torchrun stops the other ranks this way when one fails)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _peek_config(run_dir: str) -> dict[str, Any]:
    """The saved config of ``run_dir`` when this machine can read it (else {})."""
    try:
        return RunDir(run_dir).read_config()
    except (OSError, ValueError):
        return {}


def train_command(given: dict[str, Any]) -> int:
    """``tprop train`` in one rank of a torchrun job (``WORLD_SIZE`` > 1). ``given`` holds the
    parsed flags (as ``tprop.cli.cmd_train`` has them)."""
    from .cli import EXIT_DIVERGED, _fmt, default_out
    from .config import make_config

    given = dict(given)
    resume = given.pop("resume", None)
    saved = _peek_config(resume) if resume is not None else {}
    timeout = float(given.get("dist_timeout") or saved.get("dist_timeout") or DEFAULT_TIMEOUT_S)
    device = resolve_device(given.get("device") or saved.get("device") or "auto")
    backend = init_process_group(device, timeout)
    comm_rank, world = dist.get_rank(), dist.get_world_size()
    signal.signal(signal.SIGTERM, _on_sigterm)
    out: str | None = None
    trainer: Trainer | None = None
    try:
        # 1. the configuration, decided on rank 0 (it alone may see the run directory)
        decided: dict[str, Any] = {}
        if comm_rank == 0:
            try:
                if resume is not None:
                    run = RunDir(resume)
                    if not run.exists():
                        raise ConfigError(f"--resume: {resume} is not a run directory "
                                          "(no config.json)")
                    bad = set(given) - RESUME_OVERRIDES
                    if bad:
                        raise ConfigError("--resume: cannot change "
                                          f"{', '.join(sorted(bad))} of an existing run")
                    cfg = TrainConfig.from_dict(run.read_config()).replace(**given)
                    decided = {"cfg": cfg.to_dict(), "out": str(resume)}
                else:
                    g = dict(given)
                    cfg = make_config(g.pop("preset", None), **g)
                    o = cfg.out or default_out(cfg)
                    if RunDir(o).exists():
                        raise ConfigError(f"--out: {o} already holds a run; continue it with "
                                          f"`tprop train --resume {o}` or choose another --out")
                    decided = {"cfg": cfg.replace(out=str(o)).to_dict(), "out": str(o)}
            except ConfigError as e:
                decided = {"error": str(e)}
        box = [decided]
        dist.broadcast_object_list(box, src=0)
        decided = box[0]
        if "error" in decided:
            if comm_rank == 0:
                raise ConfigError(decided["error"])
            return 2  # rank 0 prints the message
        cfg = TrainConfig.from_dict(decided["cfg"])
        out = decided["out"]
        # 2. the trainer (every rank), and on a resume rank 0's checkpoint
        trainer = make_trainer(cfg, out)
        if resume is not None:
            ckpt = None
            run = RunDir(out)
            if comm_rank == 0 and run.last_ckpt.is_file():
                ckpt = load_checkpoint(run.last_ckpt)
            box = [ckpt]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                trainer.restore(box[0])
            if comm_rank == 0:
                run.truncate_metrics(trainer.epoch)
                if given:
                    run.write_config(cfg.to_dict())
            trainer.log(f"resuming {out} after epoch {trainer.epoch} on {world} ranks")
        else:
            trainer.log(f"run directory: {out}")
        trainer.log(f"distributed: {world} ranks, backend {backend}, "
                    f"--dist-timeout {timeout:g} s")
        summary = trainer.fit()
        trainer.log(f"done ({summary['status']}): best valid ppl "
                    f"{_fmt(summary.get('best_valid_ppl'))} at epoch "
                    f"{summary.get('best_epoch')}, test ppl {_fmt(summary.get('test_ppl'))}")
        code = EXIT_DIVERGED if summary["status"] == "diverged" else 0
        dist.destroy_process_group()
        return code
    except ConfigError:
        if comm_rank == 0:
            raise
        return 2
    except Terminated:
        epoch = trainer.epoch if trainer is not None else 0
        msg = (f"tprop train: rank {comm_rank} of {world}: stopped by SIGTERM (torchrun stops "
               "every rank when one fails)")
        if out is not None and epoch > 0:
            msg += f"; the last checkpoint, {Path(out) / 'last.pt'}, is intact"
        _die(msg + ".", EXIT_TERMINATED)
    except Exception as e:
        if not is_comm_error(e):
            raise
        epoch = trainer.epoch if trainer is not None else 0
        _die(lost_contact_message(comm_rank, world, e, timeout, out, epoch), EXIT_LOST_CONTACT)
    return 1  # pragma: no cover


def _die(message: str, code: int) -> None:
    """Print ``message`` and leave at once: a process group with a dead peer may block an
    orderly interpreter shutdown."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse accepts)."""
    names = {"--np", "--npr", "--npro", "--nproc"}
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        head = tok.split("=", 1)[0]
        if head in names:
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """``tprop train --nproc N``: run ``torchrun --standalone --nproc-per-node N -m tprop
    <argv>`` (one machine, rendezvous on a free local port); return its exit status."""
    if env_world_size() > 1:
        raise ConfigError("--nproc: this process is already one rank of a torchrun job; "
                          "drop --nproc")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "tprop", *strip_nproc(argv)]
    print(f"tprop train: launching {nproc} ranks: torchrun --standalone "
          f"--nproc-per-node={nproc} -m tprop {' '.join(strip_nproc(argv))}", flush=True)
    return subprocess.call(cmd, env=env)
