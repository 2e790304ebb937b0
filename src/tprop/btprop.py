"""Block TPROP training: batch and minibatch modes over the block layout.

Minibatch (``blocks_per_update = M``): each update covers M consecutive blocks; the state
entering the span is carried (detached) from the previous update, and the span's free states
are first initialised (``h_init``): ``forward`` runs the recurrence through the span from the
carried state; ``forward-parallel`` runs one parallel pass from the stored free states;
``zero``; ``persist`` keeps the stored values. Batch (``all``): one update covers every block,
and the free states and duals persist from epoch to epoch (``h_init`` applies once).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .config import ConfigError
from .constraints import StateTerms
from .data.layout import Blocks
from .objective import BlockProblem, forward_states
from .optim import build_optimizer, set_lr
from .solvers import SOLVERS, SolverSettings, UpdateStats
from .train import TRAINERS, Trainer


class BTPROPTrainer(Trainer):
    """Trains by the penalty method, ADMM or ALM (``cfg.method``) on blocks of ``cfg.bptt``."""

    def _layout(self) -> int:
        """The block layout, batch or minibatch mode and M; returns N (number of blocks)."""
        try:
            self.blocks = Blocks(self.train_data, self.cfg.bptt)
        except ValueError as e:
            raise ConfigError(f"--block-size: {e}") from None
        n = self.blocks.num_blocks
        self.batch_mode = self.cfg.blocks_per_update == "all"
        self.m = n if self.batch_mode else min(int(self.cfg.blocks_per_update), n)
        return n

    def setup(self) -> None:
        cfg, model = self.cfg, self.model
        n = self._layout()
        theta_opt = build_optimizer(model.parameters(), cfg.optim, cfg.lr)
        self.solver = SOLVERS[cfg.method](model, theta_opt, SolverSettings.from_config(cfg))
        d = model.state_dim
        dev, dtype = self.device, model.decoder.weight.dtype
        # stored free states: Z[j] = the state after block j (entering block j+1)
        keep_z = self.batch_mode or cfg.h_init in ("persist", "forward-parallel")
        self.Z = torch.zeros(n, d, device=dev, dtype=dtype) if keep_z else None
        self.U = torch.zeros(n, d, device=dev, dtype=dtype) if self.solver.uses_duals else None
        self.z_ready = False  # stored Z initialised?

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {"solver": self.solver.state_dict(), "Z": self.Z, "U": self.U,
                "z_ready": self.z_ready}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.solver.load_state_dict(state["solver"])
        for name in ("Z", "U"):
            if state[name] is not None and getattr(self, name) is not None:
                getattr(self, name).copy_(state[name])
        self.z_ready = state["z_ready"]

    # ------------------------------------------------------------------ helpers
    def _init_stored_z(self) -> None:
        """First values of the stored free states (before the first update)."""
        cfg = self.cfg
        zero = torch.zeros(1, self.model.state_dim, device=self.device,
                           dtype=self.Z.dtype)
        if cfg.h_init in ("forward", "persist"):
            self.Z.copy_(forward_states(self.model, self.blocks.inputs.t(), zero))
        elif cfg.h_init == "forward-parallel":
            self.Z.copy_(self._parallel_pass(0, self.blocks.num_blocks, zero))
        self.z_ready = True

    @torch.no_grad()
    def _parallel_pass(self, a: int, b: int, carried: torch.Tensor) -> torch.Tensor:
        """Final states of blocks a … b-1 run in parallel from their stored entering states."""
        entering = torch.cat([carried, self.Z[a:b - 1]], 0)
        was = self.model.training
        self.model.eval()
        out = self.model.final_state_flat(self.blocks.inputs[a:b].t(), entering)
        self.model.train(was)
        return out

    def _initial_free_states(self, a: int, b: int, carried: torch.Tensor) -> torch.Tensor:
        h_init = self.cfg.h_init
        if self.batch_mode:
            return self.Z
        if h_init == "forward":
            return forward_states(self.model, self.blocks.inputs[a:b].t(), carried)
        if h_init == "forward-parallel":
            return self._parallel_pass(a, b, carried)
        if h_init == "zero":
            return torch.zeros(b - a, self.model.state_dim, device=self.device,
                               dtype=carried.dtype)
        return self.Z[a:b].clone()  # persist

    # ------------------------------------------------------------------ epoch
    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        set_lr(self.solver.theta_optimizer, lr)
        model.train()
        if self.Z is not None and not self.z_ready:
            self._init_stored_z()
        n, m, k = self.blocks.num_blocks, self.m, cfg.bptt
        spans = [(a, min(a + m, n)) for a in range(0, n, m)]
        carried = torch.zeros(1, model.state_dim, device=self.device,
                              dtype=model.decoder.weight.dtype)
        tot = {"ce": 0.0, "penalty": 0.0, "residual": 0.0, "h_steps": 0}
        terms = StateTerms.from_config(cfg)  # None: the paper's objective
        if terms is not None:
            tot.update(kl=0.0, l1=0.0)
        pos = torch.zeros(k, device=self.device) if cfg.positional_ppl else None
        lam = self.solver.lam
        bar = self.progress(len(spans), f"epoch {epoch}")
        t0 = time.perf_counter()
        for i, (a, b) in enumerate(spans):
            z_init = self._initial_free_states(a, b, carried)
            x, y = self.blocks.span(a, b)
            dual = self.U[a:b] if self.U is not None else None
            problem = BlockProblem(model, x, y, carried, z_init, lam, dual,
                                   arctanh=cfg.arctanh, chunk_blocks=cfg.chunk_blocks,
                                   terms=terms)
            stats: UpdateStats = self.solver.step(problem, epoch)
            carried = problem.last_final
            if self.Z is not None:
                self.Z[a:b] = problem.z
            for key in tot:
                tot[key] += getattr(stats, key)
            if pos is not None and stats.token_ce is not None:
                pos += stats.token_ce
            self._progress(bar, epoch, i + 1, len(spans), tot, b, t0)
        bar.close()
        self.solver.end_epoch()
        out: dict[str, Any] = {
            "train_loss": tot["ce"] / n,  # Σ_j L_j / K summed, / N blocks = mean token CE
            "tokens": n * k,
            "ce": tot["ce"] / n,
            "penalty": tot["penalty"] / n,  # per block
            "residual": tot["residual"] / n,  # mean ‖F_j − z_{j+1}‖
            "dual_norm": float(self.U.norm(dim=1).mean()) if self.U is not None else 0.0,
            "h_steps": tot["h_steps"] / len(spans),  # mean per update
            "lambda": lam,
            "updates": len(spans),
        }
        if terms is not None:  # the extra terms, per block
            out.update(kl=tot["kl"] / n, l1=tot["l1"] / n)
        if pos is not None:
            out["positional_ppl"] = [math.exp(min(v / n, 700.0)) for v in pos.tolist()]
        return out

    def _progress(self, bar: Any, epoch: int, done: int, total: int, tot: dict[str, float],
                  blocks: int, t0: float) -> None:
        """Every 20 updates: stop on divergence, refresh the progress bar."""
        if done % 20 and done != total:
            return
        mean = tot["ce"] / blocks  # Σ_j L_j / K over the first `blocks` blocks -> per token
        self.check_finite(mean, f"epoch {epoch}, update {done}")
        bar.update(done - bar.n)
        bar.set_postfix(ce=f"{mean:.3f}", pen=f"{tot['penalty'] / blocks:.3g}",
                        tok_s=f"{blocks * self.cfg.bptt / (time.perf_counter() - t0):,.0f}")

    def epoch_line_extra(self, row: dict[str, Any]) -> str:
        return (f" | pen {row['penalty']:.3g} res {row['residual']:.3g}"
                f" h {row['h_steps']:.1f}")


for _name in SOLVERS:
    TRAINERS[_name] = BTPROPTrainer
