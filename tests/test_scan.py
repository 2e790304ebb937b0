"""The associative scan against a hand-written loop over the linear recurrence (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from tprop.scan import apply_prefix, compose, levels, linear_scan, prefix_pairs


def loop(c: torch.Tensor, b: torch.Tensor, x0: torch.Tensor | None, diagonal: bool,
         reverse: bool = False, transpose: bool = False) -> torch.Tensor:
    """x_j = C_j x_{j-1} + b_j written out, one position at a time."""
    n = b.shape[0]
    x = torch.zeros_like(b[0]) if x0 is None else x0.clone()
    out = [None] * n
    order = range(n - 1, -1, -1) if reverse else range(n)
    for j in order:
        cj = c[j]
        if diagonal:
            x = cj * x + b[j]
        else:
            m = cj.transpose(-1, -2) if transpose else cj
            x = torch.einsum("...ik,...k->...i", m, x) + b[j]
        out[j] = x
    return torch.stack(out, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 64, 100])
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("reverse,transpose", [(False, False), (True, True), (True, False)])
def test_scan_equals_the_loop(n: int, diagonal: bool, reverse: bool, transpose: bool) -> None:
    g = torch.Generator().manual_seed(n)
    D, B = 4, 3
    shape = (n, B, D) if diagonal else (n, B, D, D)
    c = 0.6 * (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)
    b = torch.randn(n, B, D, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    for start in (None, x0):
        got = linear_scan(c, b, start, reverse=reverse, transpose=transpose)
        want = loop(c, b, start, diagonal, reverse, transpose)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_levels_are_log2() -> None:
    assert [levels(n) for n in (1, 2, 3, 4, 5, 8, 9, 1000)] == [0, 1, 2, 2, 3, 3, 4, 10]
    for n in (3, 17, 100):
        assert levels(n) == math.ceil(math.log2(n))


def test_block_diagonal_two_by_two() -> None:
    """A 2×2-block-diagonal coefficient is the dense case with the unit as a batch dim."""
    g = torch.Generator().manual_seed(0)
    n, U = 9, 5
    c = torch.rand(n, U, 2, 2, generator=g, dtype=torch.float64) - 0.5
    b = torch.randn(n, U, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(linear_scan(c, b), loop(c, b, None, False), atol=1e-12)


def test_prefix_composition_splits_a_sequence() -> None:
    """Scanning two halves and composing their summaries equals scanning the whole: what a
    sharded scan exchanges."""
    g = torch.Generator().manual_seed(3)
    n, D = 11, 3
    c = 0.5 * torch.randn(n, D, D, generator=g, dtype=torch.float64)
    b = torch.randn(n, D, generator=g, dtype=torch.float64)
    x0 = torch.randn(D, generator=g, dtype=torch.float64)
    whole = linear_scan(c, b, x0)
    p1, q1 = prefix_pairs(c[:4], b[:4])
    p2, q2 = prefix_pairs(c[4:], b[4:])
    first = apply_prefix(p1, q1, x0)
    second = apply_prefix(p2, q2, first[-1])
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-12)
    tot = compose((p2[-1], q2[-1]), (p1[-1], q1[-1]))
    assert torch.allclose(tot[0] @ x0 + tot[1], whole[-1], atol=1e-12)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="fit neither"):
        linear_scan(torch.zeros(3, 2, 5), torch.zeros(3, 4))
