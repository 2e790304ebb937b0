"""Associative scans for linear recurrences, in plain PyTorch (CPU and CUDA).

The linear recurrence ``x_j = C_j x_{j-1} + b_j`` (``j = 0 … n-1``, ``x_{-1} = x0``, zero by
default) is solved by an inclusive Hillis–Steele scan over the pairs ``(C, b)`` with the
associative composition

    (C₂, b₂) ∘ (C₁, b₁) = (C₂ C₁, C₂ b₁ + b₂),

⌈log₂ n⌉ levels, each one batched operation over all positions. The prefix pair of position j,
``(P_j, q_j) = (C_j, b_j) ∘ … ∘ (C_0, b_0)``, gives ``x_j = P_j x0 + q_j``.

Coefficients come in two structures, told apart by their shape against ``b``'s ``(n, …, D)``:

* dense: ``C`` is ``(n, …, D, D)`` (Newton with full block Jacobians; a matmul per combine);
* diagonal: ``C`` has ``b``'s shape (quasi-Newton, or cells whose step Jacobian is diagonal by
  design; an elementwise product per combine). A 2×2-block-diagonal coefficient is the dense
  case with the unit as a batch dimension (``C`` ``(n, …, U, 2, 2)``, ``b`` ``(n, …, U, 2)``).
"""

from __future__ import annotations

import math

import torch


def is_diagonal(c: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``c`` holds diagonal coefficients for ``b`` (else dense matrices)."""
    if c.shape == b.shape:
        return True
    if c.shape == b.shape + b.shape[-1:]:
        return False
    raise ValueError(f"coefficients {tuple(c.shape)} fit neither the diagonal nor the dense "
                     f"structure of values {tuple(b.shape)}")


def _apply(c: torch.Tensor, x: torch.Tensor, diagonal: bool) -> torch.Tensor:
    return c * x if diagonal else (c @ x.unsqueeze(-1)).squeeze(-1)


def _compose(c2: torch.Tensor, b2: torch.Tensor, c1: torch.Tensor, b1: torch.Tensor,
             diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₂, b₂) ∘ (c₁, b₁): first (c₁, b₁), then (c₂, b₂)."""
    return (c2 * c1 if diagonal else c2 @ c1), _apply(c2, b1, diagonal) + b2


def levels(n: int) -> int:
    """The levels of an inclusive scan over ``n`` positions: ⌈log₂ n⌉."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def prefix_pairs(c: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inclusive prefix compositions ``(P_j, q_j)`` of the pairs along dim 0."""
    diagonal = is_diagonal(c, b)
    n = b.shape[0]
    p, q = c, b
    shift = 1
    for _ in range(levels(n)):
        cp, cq = _compose(p[shift:], q[shift:], p[:-shift], q[:-shift], diagonal)
        p = torch.cat([p[:shift], cp], 0)
        q = torch.cat([q[:shift], cq], 0)
        shift *= 2
    return p, q


def compose(second: tuple[torch.Tensor, torch.Tensor], first: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``second ∘ first`` of two pairs (of any structure, told apart by shape)."""
    diagonal = is_diagonal(second[0], second[1])
    return _compose(second[0], second[1], first[0], first[1], diagonal)


def apply_prefix(p: torch.Tensor, q: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
    """``x_j = P_j x0 + q_j`` (just ``q`` when ``x0`` is None, i.e. zero)."""
    if x0 is None:
        return q
    return _apply(p, x0.unsqueeze(0).expand_as(q), is_diagonal(p, q)) + q


def linear_scan(c: torch.Tensor, b: torch.Tensor, x0: torch.Tensor | None = None,
                reverse: bool = False, transpose: bool = False) -> torch.Tensor:
    """Solve ``x_j = C_j x_{j-1} + b_j`` along dim 0 from ``x_{-1} = x0`` (zero when None).

    ``reverse`` runs from the last position to the first (``x_j = C_j x_{j+1} + b_j``);
    ``transpose`` uses ``C_jᵀ`` (dense coefficients), as an adjoint recurrence needs.
    """
    diagonal = is_diagonal(c, b)
    if transpose and not diagonal:
        c = c.transpose(-1, -2)
    if reverse:
        c, b = c.flip(0), b.flip(0)
    x = apply_prefix(*prefix_pairs(c, b), x0)
    return x.flip(0) if reverse else x
