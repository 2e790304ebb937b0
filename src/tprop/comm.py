"""The communication strategy of a run, and the shard plan.

Every trainer, solver, objective and evaluation takes a :class:`Comm`. This module's
:class:`LocalComm` is the one-process run: world size 1, rank 0, every reduction the
identity and every exchange a no-op; ``tprop.distributed.DistComm`` implements the same
operations on ``torch.distributed``. The one-process run is therefore the world-size-1 case
of the very code a run on P processes executes.

The shard plan says which blocks of an update each rank owns: contiguous shards, the first
``count mod world`` ranks taking one more (:func:`split`), so that the ranks holding blocks
always form a prefix.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


# ============================================================================ the shard plan
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

    @property
    def total(self) -> int:
        """Blocks in the whole update (all ranks)."""
        return self.b - self.a


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


# ============================================================================ the strategy
class LocalComm:
    """One process (world size 1). Subclasses replace the operations for several ranks.

    Each operation counts the bytes it hands over by kind (``bytes``) and the wall time spent
    in it (``seconds``); here nothing crosses, so both stay zero.
    """

    rank: int = 0
    world: int = 1
    backend: str = "local"

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 120.0) -> None:
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds = 0.0

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that logs, shows progress and writes the run directory."""
        return self.rank == 0

    def reset(self) -> None:
        self.bytes = defaultdict(int)
        self.seconds = 0.0

    # ----------------------------------------------------------------- reductions
    def all_reduce_(self, t: torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        """In-place SUM over ranks."""
        return t

    def all_max_(self, t: torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        """In-place MAX over ranks."""
        return t

    def sum(self, values: Sequence[float] | torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        """Float64 sum over ranks of a vector of numbers (on the CPU)."""
        t = torch.as_tensor(values, dtype=torch.float64).reshape(-1).clone()
        return self.all_reduce_(t.to(self.device), kind).cpu()

    def max(self, value: float, kind: str = "scalars") -> float:
        """The largest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.all_max_(t, kind)[0])

    def norm(self, t: torch.Tensor | None) -> float:
        """2-norm of a tensor sharded over the ranks (float64; None counts as empty)."""
        return 0.0 if t is None else float(t.detach().double().norm())

    def reduce_grads_(self, params: Sequence[torch.Tensor], divisor: float,
                      kind: str = "theta") -> None:
        """Sum every parameter's ``.grad`` over the ranks, then divide it by ``divisor``."""
        for p in params:
            if p.grad is not None:
                p.grad.div_(divisor)

    # ----------------------------------------------------------------- broadcast, gather
    def broadcast_(self, t: torch.Tensor, src: int = 0, kind: str = "broadcast") -> torch.Tensor:
        return t

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
        return obj

    def decide(self, fn: Callable[[], T], error: type[Exception] = Exception) -> T:
        """Run ``fn`` on rank 0 and hand its result to every rank. An ``error`` it raises is
        raised again on rank 0 and replaced on the others by :class:`Declined` (rank 0
        reports it)."""
        return fn()

    def all_gather(self, t: torch.Tensor, kind: str = "gather") -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on every rank), in rank order."""
        return [t]

    def gather_rows(self, local: torch.Tensor, rows: Sequence[torch.Tensor],
                    total: int) -> torch.Tensor | None:
        """Assemble on rank 0 the ``(total, D)`` tensor whose rows ``rows[r]`` rank r holds
        (``local``, in that order); None on the other ranks."""
        full = local.new_zeros(total, *local.shape[1:])
        full[rows[0].to(full.device)] = local
        return full

    # ----------------------------------------------------------------- point to point
    def shift(self, send: torch.Tensor | None, to: int | None, recv_from: int | None,
              like: torch.Tensor, kind: str = "boundary") -> torch.Tensor | None:
        """Send ``send`` to rank ``to`` and receive a tensor shaped as ``like`` from rank
        ``recv_from`` (either may be None), both posted before either is waited."""
        if to is not None or recv_from is not None:
            raise ValueError("a one-process run has no other rank to exchange with")
        return None

    # ----------------------------------------------------------------- data parallelism
    def data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module a data-parallel step calls (DDP over the ranks; the model itself)."""
        return model

    def no_sync(self, module: torch.nn.Module) -> Any:
        """Context in which a data-parallel backward accumulates without all-reducing."""
        return nullcontext()

    # ----------------------------------------------------------------- faults
    @contextmanager
    def guard(self, where: Callable[[], tuple[str | None, int]]) -> Iterator[None]:
        """Turn the loss of another rank inside the block into the documented message and exit
        status; ``where()`` gives the run directory and the epochs done (for the message)."""
        yield

    def close(self) -> None:
        """Leave the process group (nothing to leave here)."""

    def rank_seed(self, seed: int, epoch: int) -> int | None:
        """The seed of this rank's own random draws (dropout masks) from ``epoch`` on, or None
        on rank 0, which keeps the run's stream."""
        if self.rank == 0:
            return None
        return seed + 1_000_003 * self.rank + 7919 * epoch

    def bytes_row(self, updates: int) -> dict[str, Any]:
        """The per-epoch metrics of the exchanges (empty for a one-process run)."""
        if self.world == 1:
            return {}
        return {"world_size": self.world,
                "comm_bytes_per_update": sum(self.bytes.values()) / max(updates, 1),
                "comm_s": self.seconds}


class Declined(Exception):
    """On a rank other than 0: rank 0 refused the run (and printed why)."""


LOCAL = LocalComm()


def global_norm(comm: LocalComm, tensors: Sequence[torch.Tensor | None]) -> float:
    """2-norm of several sharded tensors together."""
    return math.sqrt(sum(comm.norm(t) ** 2 for t in tensors))
