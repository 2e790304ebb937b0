"""Analyses of a trained model's dynamics: the largest Lyapunov exponent of its recurrence.

Driven by a corpus, the recurrence ``s_t = f(x_t, s_{t−1})`` has step Jacobians ``J_t``; the
largest Lyapunov exponent is ``λ = lim (1/T) Σ_t log ‖J_t v_{t−1}‖`` with ``v`` renormalised
after every step. It predicts how the exact parallel recurrence converges (Gonzalez et al.,
2025): a Jacobi sweep shrinks the error entering block j by about ``exp(λ K)`` per block of
K steps, so contracting dynamics (λ < 0) converge in a few sweeps and chaotic ones (λ > 0)
need all M − 1. ``J_t v`` is measured by central differences in float64 through the model's
own recurrent call (any cell), for several stream columns at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .data.layout import StreamColumns
from .models import RNNLM, eval_mode


@torch.no_grad()
def lyapunov(model: RNNLM, data: torch.Tensor, columns: int = 4, steps: int = 2000,
             burn_in: int = 100, eps: float = 1e-6, seed: int = 0) -> dict[str, Any]:
    """The largest Lyapunov exponent (per step, natural log) of ``model``'s recurrence driven
    by ``data``: ``columns`` stream columns, ``burn_in`` steps to forget the zero state, then
    ``steps`` steps measured. Returns the mean over columns, their spread and values."""
    original = next(model.parameters()).dtype
    model.double()
    try:
        with eval_mode(model):
            per_column = _exponents(model, data, columns, steps, burn_in, eps, seed)
    finally:
        model.to(original)
    mean = sum(per_column) / len(per_column)
    spread = math.sqrt(sum((x - mean) ** 2 for x in per_column) / max(1, len(per_column) - 1))
    return {"lyapunov": mean, "lyapunov_std": spread, "per_column": per_column,
            "columns": columns, "steps": steps, "burn_in": burn_in}


def _exponents(model: RNNLM, data: torch.Tensor, columns: int, steps: int, burn_in: int,
               eps: float, seed: int) -> list[float]:
    cols = StreamColumns(data.to(next(model.parameters()).device), columns)
    if cols.length < burn_in + steps:
        raise ValueError(f"the split holds {cols.length} steps per column, fewer than "
                         f"--burn-in {burn_in} + --steps {steps}")
    emb = model.encoder(cols.inputs[: burn_in + steps])  # (T, B, E)
    d = model.state_dim
    s = torch.zeros(columns, d, dtype=emb.dtype, device=emb.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(columns, d, generator=g, dtype=emb.dtype).to(emb.device)
    v = v / v.norm(dim=1, keepdim=True)
    total = torch.zeros(columns, dtype=torch.float64, device=emb.device)
    for t in range(burn_in + steps):
        x = emb[t:t + 1].repeat(1, 3, 1)  # the same token for s, s + εv, s − εv
        batch = torch.cat([s, s + eps * v, s - eps * v], 0)
        _, state = model.rnn(x, model.unflatten_state(batch))
        nxt = model.flatten_state(state)
        s, plus, minus = nxt[:columns], nxt[columns:2 * columns], nxt[2 * columns:]
        jv = (plus - minus) / (2 * eps)
        norm = jv.norm(dim=1).clamp_min(1e-300)
        if t >= burn_in:
            total += norm.log()
        v = jv / norm.unsqueeze(1)
    return (total / steps).tolist()


def sweeps_needed(lam: float, block: int, blocks: int, tol: float = 1e-5,
                  initial_error: float = 1.0) -> int:
    """The Jacobi sweeps a window of ``blocks`` blocks of ``block`` steps needs when each sweep
    contracts the entering error by ``exp(λ·K)``: at most M − 1 (exact)."""
    if lam >= 0:
        return max(0, blocks - 1)
    need = math.ceil(math.log(tol / initial_error) / (lam * block))
    return max(1, min(blocks - 1, need))
