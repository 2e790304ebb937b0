"""What is specific to ``torch.distributed``: the process group, the communication strategy on
it (:class:`DistComm`), the local relaunch under torchrun, and fault handling.

Everything else a distributed run does is the one-process code with this strategy in place of
``tprop.comm.LocalComm``; ``docs/distributed.md`` is the user's guide and holds the cost
model. Launched by ``torchrun`` (``torchrun --nproc-per-node N -m tprop train ...``, on one
machine or many) or by ``tprop train --nproc N`` on one machine. Backends: gloo on the CPU,
NCCL on CUDA devices (each rank on GPU ``LOCAL_RANK``).

Faults: a rank that dies is noticed by the others at their next exchange (the connection
closes); a rank that hangs, after ``--dist-timeout`` seconds. They then stop with the message
of :func:`lost_contact_message` and exit with status ``EXIT_LOST_CONTACT``; the last
checkpoint is written atomically and stays intact. SIGTERM (torchrun stops the other ranks
this way when one fails) exits with ``EXIT_TERMINATED`` and a one-line message.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .comm import Declined, LocalComm
from .config import ConfigError
from .rundir import RunDir
from .system import resolve_device

T = TypeVar("T")

EXIT_LOST_CONTACT = 4  # exit status of a rank that lost contact with another one
EXIT_TERMINATED = 143  # stopped by SIGTERM (torchrun stops every rank when one fails)
DEFAULT_TIMEOUT_S = 120.0
LOST_CONTACT = "lost contact with another rank"

# Phrases of the errors gloo / NCCL / the c10d store raise when a peer is gone or silent.
_COMM_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe",
                 "peer", "socket", "store", "c10d")


# ============================================================================ the strategy
class DistComm(LocalComm):
    """The exchanges of one rank of an initialised process group, with the bytes it hands to
    them (by kind) and the wall time spent in them (waiting for slower ranks included)."""

    def __init__(self, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(device, timeout_s)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = str(dist.get_backend())

    @contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def _count(self, kind: str, t: torch.Tensor) -> None:
        self.bytes[kind] += t.numel() * t.element_size()

    def all_reduce_(self, t: torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        with self._timed():
            dist.all_reduce(t)
        self._count(kind, t)
        return t

    def all_max_(self, t: torch.Tensor, kind: str = "scalars") -> torch.Tensor:
        with self._timed():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self._count(kind, t)
        return t

    def norm(self, t: torch.Tensor | None) -> float:
        sq = 0.0 if t is None else float(t.detach().double().pow(2).sum())
        return float(self.sum([sq])[0]) ** 0.5

    def reduce_grads_(self, params: Sequence[torch.Tensor], divisor: float,
                      kind: str = "theta") -> None:
        for p in params:
            if p.grad is None:  # a rank without blocks in this update
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.all_reduce_(flat, kind)
        flat.div_(divisor)
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()

    def broadcast_(self, t: torch.Tensor, src: int = 0, kind: str = "broadcast") -> torch.Tensor:
        with self._timed():
            dist.broadcast(t, src)
        if self.rank == src:
            self._count(kind, t)
        return t

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        box = [obj]
        with self._timed():
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def decide(self, fn: Callable[[], T], error: type[Exception] = Exception) -> T:
        result: dict[str, Any] = {}
        if self.rank == 0:
            try:
                result = {"value": fn()}
            except error as e:
                result = {"error": e}
        result = self.broadcast_object(result)
        if "error" in result:
            if self.rank == 0:
                raise result["error"]
            raise Declined(str(result["error"]))
        return result["value"]

    def all_gather(self, t: torch.Tensor, kind: str = "gather") -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        with self._timed():
            dist.all_gather(out, t.contiguous())
        self._count(kind, t)
        return out

    def gather_rows(self, local: torch.Tensor, rows: Sequence[torch.Tensor],
                    total: int) -> torch.Tensor | None:
        width = max(1, max(len(r) for r in rows))
        pad = local.new_zeros(width, *local.shape[1:])
        pad[: local.shape[0]] = local
        bufs = [torch.empty_like(pad) for _ in range(self.world)] if self.rank == 0 else None
        with self._timed():
            dist.gather(pad, bufs, dst=0)
        self._count("gather", local)
        if self.rank != 0:
            return None
        full = local.new_zeros(total, *local.shape[1:])
        for r, idx in enumerate(rows):
            full[idx.to(full.device)] = bufs[r][: len(idx)]
        return full

    def shift(self, send: torch.Tensor | None, to: int | None, recv_from: int | None,
              like: torch.Tensor, kind: str = "boundary") -> torch.Tensor | None:
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

    def data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] \
            if dev.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, module: torch.nn.Module) -> Any:
        return module.no_sync() if hasattr(module, "no_sync") else nullcontext()

    @contextmanager
    def guard(self, where: Callable[[], tuple[str | None, int]]) -> Iterator[None]:
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            yield
        except Terminated:
            out, epoch = where()
            msg = (f"tprop train: rank {self.rank} of {self.world}: stopped by SIGTERM "
                   "(torchrun stops every rank when one fails)")
            if out is not None and epoch > 0:
                msg += f"; the last checkpoint, {Path(out) / 'last.pt'}, is intact"
            _die(msg + ".", EXIT_TERMINATED)
        except Exception as e:
            if not is_comm_error(e):
                raise
            out, epoch = where()
            _die(lost_contact_message(self.rank, self.world, e, self.timeout_s, out, epoch),
                 EXIT_LOST_CONTACT)

    def close(self) -> None:
        """Leave the process group together: a barrier first, so that no rank tears down its
        connections while another is still in its last exchange (gloo aborts a process whose
        peer closes under it: "terminate called without an active exception")."""
        if dist.is_initialized():
            try:
                dist.barrier()
            except Exception as e:  # a peer already gone: nothing left to wait for
                if not is_comm_error(e):
                    raise
            dist.destroy_process_group()
            gc.collect()  # the exchanges' work objects freed now, not in the interpreter's exit


# ============================================================================ process group
def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


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
    STARTED[0] = True
    return backend


STARTED = [False]  # whether this process has joined a process group (the CLI's exit reads it)


def _peek_config(run_dir: str | Path) -> dict[str, Any]:
    """The saved config of ``run_dir`` when this machine can read it (else {})."""
    try:
        return RunDir(run_dir).read_config()
    except (OSError, ValueError):
        return {}


def connect(options: dict[str, Any], resume: str | Path | None = None) -> DistComm:
    """Join the torchrun job and return this rank's strategy; the device and timeout come from
    ``options`` or, when resuming, the saved config."""
    saved = _peek_config(resume) if resume is not None else {}
    timeout = float(options.get("dist_timeout") or saved.get("dist_timeout")
                    or DEFAULT_TIMEOUT_S)
    device = resolve_device(options.get("device") or saved.get("device") or "auto")
    init_process_group(device, timeout)
    return DistComm(device, timeout)


# ============================================================================ faults
class Terminated(BaseException):
    """SIGTERM arrived (torchrun stops the other ranks this way when one fails)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


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


def _die(message: str, code: int) -> None:
    """Print ``message`` and leave at once: a process group with a dead peer may block an
    orderly interpreter shutdown."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


# ============================================================================ local launch
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


LAUNCHED_ENV = "TPROP_LAUNCHED"  # tprop.cli: set in the ranks `tprop train --nproc` starts
_AGENT = "import sys; from tprop.distributed import run_agent; sys.exit(run_agent(sys.argv[1:]))"
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """``tprop train --nproc N``: run ``torchrun --standalone --nproc-per-node N -m tprop
    <argv>`` (one machine, rendezvous on a free local port); return the exit status of the
    rank that failed first (0 when all succeeded; 128 + the signal for a signal).

    The ranks print their own messages; torchrun's report of a failure is not shown.
    Ctrl-C, SIGTERM and SIGHUP reach the ranks once, through torchrun, which stops them."""
    if env_world_size() > 1:
        raise ConfigError("--nproc: this process is already one rank of a torchrun job; "
                          "drop --nproc")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[LAUNCHED_ENV] = "1"
    args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "tprop", *strip_nproc(argv)]
    print(f"tprop train: launching {nproc} ranks: torchrun {' '.join(args)}", flush=True)
    # torchrun in a process group of its own: a signal reaches it once, from here
    proc = subprocess.Popen([sys.executable, "-c", _AGENT, *args], env=env, process_group=0)

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 - rc if rc < 0 else rc


def first_failure_status(failures: dict[int, Any]) -> int:
    """The exit status to report for torchrun's failed ranks (``{rank: ProcessFailure}``):
    the first to fail, preferring a rank's own failure to a consequence of another's (lost
    contact, stopped by SIGTERM); a signal as 128 + its number."""

    def status(f: Any) -> int:
        code = int(getattr(f, "exitcode", 1) or 1)
        return 128 - code if code < 0 else code

    consequences = (EXIT_LOST_CONTACT, EXIT_TERMINATED)
    order = sorted(failures, key=lambda r: (status(failures[r]) in consequences,
                                            getattr(failures[r], "timestamp", 0), r))
    return status(failures[order[0]]) if order else 1


def run_agent(args: Sequence[str]) -> int:
    """torchrun with ``args`` in this process (the child ``launch_local`` starts); the exit
    status of :func:`first_failure_status`, without torchrun's own report."""
    import logging

    quiet = "LOGLEVEL" not in os.environ  # torchrun's own log level, if the user sets one
    if quiet:
        os.environ["LOGLEVEL"] = "CRITICAL"  # read as torchrun's modules make their loggers
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if quiet:
        del os.environ["LOGLEVEL"]  # not passed on to the ranks
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(list(args)))
    except ChildFailedError as e:
        return first_failure_status(e.failures)
    except SignalException as e:
        return 128 + int(e.sigval)
    except Exception as e:  # noqa: BLE001 - the agent's own failure: one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tprop train: torchrun failed: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0
