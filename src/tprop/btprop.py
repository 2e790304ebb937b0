"""Block TPROP training (``--method pm|admm|alm``): batch and minibatch modes over the block
layout.

Minibatch (``blocks_per_update = M``): each update covers M consecutive blocks; the state
entering the span is carried (detached) from the previous update, and the span's free states
are first initialised (``h_init``): ``forward`` runs the recurrence through the span from the
carried state; ``forward-parallel`` runs one parallel pass from the stored free states;
``zero``; ``persist`` keeps the stored values. Batch (``all``): one update covers every block,
and the free states and duals persist from epoch to epoch (``h_init`` applies once).

On several ranks (docs/distributed.md) every update's blocks are cut into contiguous shards,
one per rank (``tprop.comm.plan_spans``): rank r owns blocks ``[s_r, e_r)``, the free states
*after* them and their duals, so every penalty term is local; the only coupling is that its
first block enters from rank r−1's last free state, exchanged by the problem at every
evaluation. The forward initialisation runs in full on every rank (exact, and no rank waits
on another), each keeping its own rows; checkpoints gather the rows to rank 0, so a run
resumes on any number of ranks.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .comm import SpanShard, owned_rows, plan_spans
from .config import ConfigError
from .constraints import StateTerms
from .data.layout import Blocks
from .models import eval_mode
from .objective import BlockProblem, Terms, forward_states
from .optim import build_optimizer, set_lr
from .solvers import SOLVERS, SolverSettings
from .trainer import Trainer


class BTPROPTrainer(Trainer):
    """Trains by the penalty method, ADMM or ALM (``cfg.method``) on blocks of ``cfg.bptt``."""

    def setup(self) -> None:
        cfg, model, comm = self.cfg, self.model, self.comm
        try:
            self.blocks = Blocks(self.train_data, cfg.bptt)
        except ValueError as e:
            raise ConfigError(f"--block-size: {e}") from None
        n = self.blocks.num_blocks
        self.batch_mode = cfg.blocks_per_update == "all"
        self.m = n if self.batch_mode else min(int(cfg.blocks_per_update), n)
        theta_opt = build_optimizer(model.parameters(), cfg.optim, cfg.lr)
        self.solver = SOLVERS[cfg.method](model, theta_opt, SolverSettings.from_config(cfg))
        plans = plan_spans(n, self.m, comm.world)
        self.plan = plans[comm.rank]
        self.rows_by_rank = [owned_rows(p) for p in plans]
        self.rows = self.rows_by_rank[comm.rank]
        d, dev, dtype = model.state_dim, self.device, model.decoder.weight.dtype
        keep_z = self.batch_mode or cfg.h_init in ("persist", "forward-parallel")
        # this rank's rows: Z[i] = the state after block rows[i] (entering block rows[i] + 1)
        self.Z = torch.zeros(len(self.rows), d, device=dev, dtype=dtype) if keep_z else None
        self.U = (torch.zeros(len(self.rows), d, device=dev, dtype=dtype)
                  if self.solver.uses_duals else None)
        self.z_ready = False  # stored Z initialised?
        self.terms = StateTerms.from_config(cfg)  # None: the paper's objective

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """The full free states and duals (gathered to rank 0)."""
        n = self.blocks.num_blocks
        full = {name: (None if getattr(self, name) is None else
                       self.comm.gather_rows(getattr(self, name), self.rows_by_rank, n))
                for name in ("Z", "U")}
        return {"solver": self.solver.state_dict(), **full, "z_ready": self.z_ready}

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

    # ------------------------------------------------------------------ initialisation
    def _zero_state(self, rows: int = 1) -> torch.Tensor:
        return torch.zeros(rows, self.model.state_dim, device=self.device,
                           dtype=self.model.decoder.weight.dtype)

    @torch.no_grad()
    def _init_stored_z(self) -> None:
        """First values of the stored free states (before the first update)."""
        cfg, model = self.cfg, self.model
        if cfg.h_init in ("forward", "persist"):
            # the whole stream on every rank, so that none waits on another
            self.Z.copy_(forward_states(model, self.blocks.inputs.t(), self._zero_state(),
                                        rows=self.rows))
        elif cfg.h_init == "forward-parallel" and len(self.rows):
            with eval_mode(model):
                self.Z.copy_(model.final_state_flat(self.blocks.inputs[self.rows].t(),
                                                    self._zero_state(len(self.rows))))
        self.z_ready = True

    @torch.no_grad()
    def parallel_pass(self, sp: SpanShard, carried: torch.Tensor) -> torch.Tensor:
        """Final states of this rank's blocks of the span, run in parallel from their stored
        entering states (the previous rank's last stored state entering its first)."""
        r, comm = self.comm.rank, self.comm
        has_left, has_right = 0 < r < sp.nonempty, r + 1 < sp.nonempty
        send = self.Z[sp.hi - 1:sp.hi] if has_right else None
        left = (comm.shift(send, r + 1 if has_right else None, r - 1 if has_left else None,
                           carried) if comm.world > 1 else None)
        if sp.size == 0:
            return carried.new_zeros(0, self.model.state_dim)
        entering = torch.cat([left if has_left else carried, self.Z[sp.lo:sp.hi - 1]], 0)
        with eval_mode(self.model):
            return self.model.final_state_flat(self.blocks.inputs[sp.s:sp.e].t(), entering)

    def initial_free_states(self, sp: SpanShard, carried: torch.Tensor) -> torch.Tensor:
        """This rank's free states at the start of an update (``h_init``)."""
        h_init = self.cfg.h_init
        if self.batch_mode:
            return self.Z
        if h_init == "forward":  # the span up to this rank's last block, on every rank
            if sp.size == 0:
                return carried.new_zeros(0, self.model.state_dim)
            states = forward_states(self.model, self.blocks.inputs[sp.a:sp.e].t(), carried)
            return states[sp.s - sp.a:]
        if h_init == "forward-parallel":
            return self.parallel_pass(sp, carried)
        if h_init == "zero":
            return carried.new_zeros(sp.size, self.model.state_dim)
        return self.Z[sp.lo:sp.hi].clone()  # persist

    # ------------------------------------------------------------------ epoch
    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        cfg, model, comm = self.cfg, self.model, self.comm
        set_lr(self.solver.theta_optimizer, lr)
        model.train()
        if self.Z is not None and not self.z_ready:
            self._init_stored_z()
        k = cfg.bptt
        carried = self._zero_state()
        tot, h_steps = Terms(), 0
        pending: list[float] | None = None  # this rank's terms since they were last summed
        lam = self.solver.lam
        bar = self.progress(len(self.plan), f"epoch {epoch}")
        t0 = time.perf_counter()
        for i, sp in enumerate(self.plan):
            z_init = self.initial_free_states(sp, carried)
            x, y = self.blocks.span(sp.s, sp.e)
            dual = self.U[sp.lo:sp.hi] if self.U is not None else None
            problem = BlockProblem(model, x, y, carried, z_init, lam, dual, arctanh=cfg.arctanh,
                                   chunk_blocks=cfg.chunk_blocks, terms=self.terms, comm=comm,
                                   shard=sp)
            with self.precision.autocast():  # the free states, duals and terms stay float32
                stats = self.solver.step(problem, epoch)
            if not self.batch_mode:
                carried = problem.carried_out()
            if self.Z is not None:
                self.Z[sp.lo:sp.hi] = problem.z
            if cfg.positional_ppl and stats.token_ce is None:  # a rank without blocks
                stats.token_ce = torch.zeros(k)
            vec = stats.vector()
            pending = vec if pending is None else [a + b for a, b in zip(pending, vec)]
            h_steps += stats.h_steps
            if self._reports(i + 1, len(self.plan)):  # sum over the ranks now and then only
                tot = tot + Terms.from_vector(comm.sum(pending), cfg.positional_ppl)
                pending = None
                self._progress(bar, epoch, i + 1, tot, sp.b, t0)
        bar.close()
        self.solver.end_epoch()
        return self._epoch_stats(tot, h_steps, lam)

    def _epoch_stats(self, tot: Terms, h_steps: int, lam: float) -> dict[str, Any]:
        n, updates = self.blocks.num_blocks, len(self.plan)
        out: dict[str, Any] = {
            "train_loss": tot.ce / n,  # Σ_j L_j / K summed, / N blocks = mean token CE
            "tokens": n * self.cfg.bptt,
            "ce": tot.ce / n,
            "penalty": tot.penalty / n,  # per block
            "residual": tot.residual / n,  # mean ‖F_j − z_{j+1}‖
            "dual_norm": (float(self.comm.sum([float(self.U.norm(dim=1).sum())])[0]) / n
                          if self.U is not None else 0.0),
            "h_steps": h_steps / updates,  # mean per update
            "lambda": lam,
            "updates": updates,
        }
        if self.terms is not None:  # the extra terms, per block
            out.update(kl=tot.kl / n, l1=tot.l1 / n)
        if tot.token_ce is not None:
            out["positional_ppl"] = [math.exp(min(v / n, 700.0)) for v in tot.token_ce.tolist()]
        return out

    @staticmethod
    def _reports(done: int, total: int) -> bool:
        """Whether the progress is reported after ``done`` of ``total`` updates: every 20."""
        return done % 20 == 0 or done == total

    def _progress(self, bar: Any, epoch: int, done: int, tot: Terms, blocks: int,
                  t0: float) -> None:
        """Stop on divergence, refresh the progress bar."""
        mean = tot.ce / blocks  # Σ_j L_j / K over the first `blocks` blocks -> per token
        self.check_finite(mean, f"epoch {epoch}, update {done}")
        bar.update(done - bar.n)
        bar.set_postfix(ce=f"{mean:.3f}", pen=f"{tot.penalty / blocks:.3g}",
                        tok_s=f"{blocks * self.cfg.bptt / (time.perf_counter() - t0):,.0f}")

    def epoch_line_extra(self, row: dict[str, Any]) -> str:
        return (f" | pen {row['penalty']:.3g} res {row['residual']:.3g}"
                f" h {row['h_steps']:.1f}")
