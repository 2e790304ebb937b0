"""The learning-rate schedule / stopping rule and the optimisers by name."""

from __future__ import annotations

import math

import pytest
import torch

from tprop.optim import LRSchedule, build_optimizer, set_lr


def test_fixed_decay_zaremba() -> None:
    s = LRSchedule(base_lr=1.0, lr_decay=0.5, lr_decay_start=5)
    for e in (1, 2, 3, 4):
        assert s.lr(e) == 1.0
    assert s.lr(5) == 0.5
    assert s.lr(6) == 0.25
    assert s.lr(13) == 1.0 / 512
    # the formula: base * decay ** max(0, e - start + 1)
    s2 = LRSchedule(base_lr=0.3, lr_decay=0.8, lr_decay_start=3)
    for e in range(1, 12):
        assert s2.lr(e) == pytest.approx(0.3 * 0.8 ** max(0, e - 3 + 1), rel=1e-15)


def test_no_decay_is_constant() -> None:
    s = LRSchedule(base_lr=0.7)
    assert [s.lr(e) for e in range(1, 6)] == [0.7] * 5


def test_plateau_annealing_divides_and_restarts_count() -> None:
    s = LRSchedule(base_lr=1.0, lrshrink=4.0, tol=2)
    assert s.step(1, 100.0) is True
    assert s.lr(2) == 1.0
    assert s.step(2, 110.0) is False  # 1 bad epoch: no change yet
    assert s.lr(3) == 1.0
    assert s.step(3, 105.0) is False  # 2 bad epochs: shrink
    assert s.lr(4) == 0.25
    assert s.step(4, 101.0) is False  # count restarted: 1 bad since the shrink
    assert s.lr(5) == 0.25
    assert s.step(5, 102.0) is False  # 2 bad since the shrink: shrink again
    assert s.lr(6) == 1.0 / 16
    assert not s.stop  # annealing never stops a run by itself
    assert s.step(6, 90.0) is True  # new best resets the counts, keeps the lr
    assert (s.best, s.best_epoch) == (90.0, 6)
    assert s.lr(7) == 1.0 / 16
    assert s.step(7, 95.0) is False
    assert s.lr(8) == 1.0 / 16  # one bad epoch after a best: not yet
    assert s.step(8, 95.0) is False
    assert s.lr(9) == 1.0 / 64


def test_annealing_combines_with_fixed_decay() -> None:
    s = LRSchedule(base_lr=1.0, lrshrink=2.0, tol=1, lr_decay=0.5, lr_decay_start=2)
    s.step(1, 10.0)
    s.step(2, 11.0)  # shrink by 2
    assert s.lr(3) == pytest.approx(0.5**2 / 2)


def test_equal_perplexity_is_not_an_improvement() -> None:
    s = LRSchedule(base_lr=1.0, lrshrink=1.0, tol=1)
    assert s.step(1, 10.0) is True
    assert s.step(2, 10.0) is False
    assert s.stop


def test_without_annealing_stops_after_tol_bad_epochs() -> None:
    s = LRSchedule(base_lr=1.0, lrshrink=1.0, tol=3)
    s.step(1, 50.0)
    s.step(2, 51.0)
    s.step(3, 52.0)
    assert not s.stop
    s.step(4, 40.0)  # new best: count restarts
    s.step(5, 41.0)
    s.step(6, 41.0)
    assert not s.stop
    s.step(7, 41.0)
    assert s.stop
    assert s.lr(8) == 1.0  # never annealed


def test_patience_stops_even_with_annealing() -> None:
    s = LRSchedule(base_lr=1.0, lrshrink=2.0, tol=1, patience=3)
    s.step(1, 10.0)
    s.step(2, 11.0)
    s.step(3, 11.0)
    assert not s.stop
    assert s.lr(4) == 0.25
    s.step(4, 11.0)
    assert s.stop


def test_nan_perplexity_is_a_bad_epoch() -> None:
    s = LRSchedule(base_lr=1.0, lrshrink=1.0, tol=1)
    s.step(1, 10.0)
    assert s.step(2, math.nan) is False
    assert s.best == 10.0 and s.stop


def test_state_dict_round_trip() -> None:
    s = LRSchedule(base_lr=2.0, lrshrink=3.0, tol=1, patience=5, lr_decay=0.9, lr_decay_start=2)
    s.step(1, 20.0)
    s.step(2, 25.0)
    s.step(3, 26.0)
    state = s.state_dict()
    assert all(isinstance(v, (int, float, bool, type(None))) for v in state.values())
    t = LRSchedule(base_lr=1.0)
    t.load_state_dict(state)
    assert t == s
    assert [t.lr(e) for e in range(1, 8)] == [s.lr(e) for e in range(1, 8)]
    # the copy goes on exactly as the original
    for e, v in ((4, 27.0), (5, 19.0), (6, 30.0)):
        assert t.step(e, v) == s.step(e, v)
        assert t == s


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("nag", torch.optim.SGD),
                                      ("adagrad", torch.optim.Adagrad),
                                      ("adam", torch.optim.Adam),
                                      ("rmsprop", torch.optim.RMSprop)])
def test_build_optimizer_names(name: str, cls: type) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], name, 0.05)
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.05
    if name == "nag":
        assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"]
    set_lr(opt, 0.01)
    assert opt.param_groups[0]["lr"] == 0.01


def test_build_optimizer_unknown() -> None:
    with pytest.raises(ValueError, match="lbfgs"):
        build_optimizer([torch.nn.Parameter(torch.ones(1))], "lbfgs", 0.1)


def test_sgd_is_plain_gradient_descent() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=torch.float64))
    opt = build_optimizer([p], "sgd", 0.3)
    for _ in range(3):  # no momentum or other state: every step is p - lr * g
        g = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        # exact up to rounding: torch computes p + (-lr) * g with one fused rounding,
        # which can differ from (p - lr * g) by one unit in the last place
        torch.testing.assert_close(p.detach(), before - 0.3 * g, rtol=4e-16, atol=4e-16)
