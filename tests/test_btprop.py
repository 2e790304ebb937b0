"""Block TPROP training end to end: the BPTT trajectory identity, initialisations of the free
states, batch mode, metrics, resuming and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_corpus
from test_objective import ref_block, ref_sequential

import tprop.btprop as btp
from tprop.cli import main
from tprop.comm import SpanShard
from tprop.config import ConfigError, TrainConfig, make_config
from tprop.objective import BlockProblem
from tprop.rundir import RunDir
from tprop.train import make_trainer, resume_trainer, train

K = 4




@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny corpus (vocabulary 12) shared by this module's tests."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny", n_train=800, n_eval=200,
                        vocab=12)


def cfg_for(data_dir: Path, **kw: Any) -> TrainConfig:
    base = dict(data_dir=str(data_dir), dataset=None, quiet=True, device="cpu", model="lstm",
                emsize=4, nhid=5, nlayers=1, bptt=K, batch_size=1, eval_batch_size=2,
                train_tokens=161, eval_tokens=120, epochs=2, seed=3, optim="sgd", lr=0.5,
                clip=0.5, dropout=0.0, tol=10, max_ppl=1e9, method="pm",
                blocks_per_update=5, h_steps=2, h_optim="sgd", h_lr=0.1, theta_steps=1)
    base.update(kw)
    return make_config(**base)


def metrics(run: Path) -> list[dict]:
    return RunDir(run).read_metrics()


def last_ckpt(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


def spy_problems(monkeypatch: pytest.MonkeyPatch, on_new=None) -> list[dict]:
    """Record every BlockProblem the trainer builds: the problem, and clones of what it was
    initialised with (z_init may be the trainer's own Z, updated later)."""
    seen: list[dict] = []

    class Spy(BlockProblem):
        def __init__(self, model, inputs, targets, z_fixed, z_init, lam, dual=None, **kw):
            rec = {"z_init": z_init.detach().clone(), "z_fixed": z_fixed.detach().clone(),
                   "dual": None if dual is None else dual.detach().clone(),
                   "inputs": inputs.clone(), "lam": lam}
            if on_new is not None:
                on_new(rec, model)
            super().__init__(model, inputs, targets, z_fixed, z_init, lam, dual, **kw)
            rec["problem"] = self
            seen.append(rec)

    monkeypatch.setattr(btp, "BlockProblem", Spy)
    return seen


# --------------------------------------------------------------------------- BPTT trajectory
@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("gru", 1), ("lstm", 1), ("lstm", 2)])
def test_pm_one_block_per_update_walks_the_bptt_trajectory(corpus_dir: Path, tmp_path: Path,
                                                           float64, cell: str,
                                                           nlayers: int) -> None:
    common = dict(model=cell, nlayers=nlayers, epochs=3, lr=0.7, clip=0.3)
    bptt = tmp_path / "bptt"
    pm = tmp_path / "pm"
    train(cfg_for(corpus_dir, method="bptt", batch_size=1, **common), bptt)
    train(cfg_for(corpus_dir, method="pm", blocks_per_update=1, h_init="forward", h_steps=0,
                  theta_steps=1, **common), pm)
    mb, mp = metrics(bptt), metrics(pm)
    assert [r["epoch"] for r in mb] == [r["epoch"] for r in mp] == [1, 2, 3]
    for rb, rp in zip(mb, mp):
        assert rp["valid_ppl"] == pytest.approx(rb["valid_ppl"], rel=1e-9, abs=0)
        assert rp["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-9, abs=0)
        assert rp["residual"] < 1e-12 and rp["penalty"] < 1e-20
    assert mb[-1]["valid_ppl"] != mb[0]["valid_ppl"]  # it did train
    pb, pp = last_ckpt(bptt)["model"], last_ckpt(pm)["model"]
    assert pb.keys() == pp.keys()
    for k in pb:
        assert pp[k].dtype == torch.float64
        assert torch.allclose(pp[k], pb[k], rtol=1e-9, atol=1e-12), k


def test_pm_two_blocks_per_update_is_bptt_with_update_freq_2(corpus_dir: Path, tmp_path: Path,
                                                             float64) -> None:
    """M = 2 blocks per update (forward init, no h-step) averages two windows' gradients:
    BPTT with update_freq 2; not BPTT with one update per window (the check can fail)."""
    common = dict(model="gru", epochs=2, lr=0.7, clip=0.3)
    pm = train(cfg_for(corpus_dir, method="pm", blocks_per_update=2, h_steps=0, **common),
               tmp_path / "pm")
    b2 = train(cfg_for(corpus_dir, method="bptt", update_freq=2, **common), tmp_path / "b2")
    b1 = train(cfg_for(corpus_dir, method="bptt", **common), tmp_path / "b1")
    mp, m2 = metrics(tmp_path / "pm"), metrics(tmp_path / "b2")
    for rp, r2 in zip(mp, m2):
        assert rp["valid_ppl"] == pytest.approx(r2["valid_ppl"], rel=1e-9, abs=0)
    assert pm["best_valid_ppl"] == pytest.approx(b2["best_valid_ppl"], rel=1e-9, abs=0)
    assert abs(pm["best_valid_ppl"] - b1["best_valid_ppl"]) > 1e-6 * b1["best_valid_ppl"]


# --------------------------------------------------------------------------- initialisations
def test_forward_parallel_pass_matches_its_definition(corpus_dir: Path, float64) -> None:
    tr = make_trainer(cfg_for(corpus_dir, h_init="forward-parallel", blocks_per_update=5))
    n, D = tr.blocks.num_blocks, tr.model.state_dim
    assert tr.Z is not None and tr.Z.shape == (n, D)
    g = torch.Generator().manual_seed(0)
    tr.Z.copy_(torch.rand(n, D, generator=g) - 0.5)
    carried = torch.rand(1, D, generator=g) - 0.5
    P = dict(tr.model.named_parameters())
    tr.model.train()
    spans = {sp.a: sp for sp in tr.plan}  # one process: this rank's shard is the whole span
    for a, b in ((0, 5), (5, 10), (35, n)):
        sp = spans[a]
        assert (sp.s, sp.e) == (a, b)
        with torch.no_grad():
            expect = torch.cat([
                ref_block(P, tr.model, tr.blocks.inputs[j], tr.blocks.targets[j],
                          carried if j == a else tr.Z[j - 1:j])[1]
                for j in range(a, b)])
        got = tr.parallel_pass(sp, carried)
        assert got.shape == (b - a, D)
        assert torch.allclose(got, expect, rtol=1e-10, atol=1e-12)
        assert torch.allclose(tr.initial_free_states(sp, carried), expect, rtol=1e-10,
                              atol=1e-12)
        # forward initialisation instead: the sequential pass from the carried state
        tr.cfg.h_init = "forward"
        with torch.no_grad():
            seq = ref_sequential(P, tr.model, tr.blocks.inputs[a:b].t(), carried)
        assert torch.allclose(tr.initial_free_states(sp, carried), seq, rtol=1e-10,
                              atol=1e-12)
        assert not torch.allclose(seq, expect, atol=1e-6)  # the two really differ
        tr.cfg.h_init = "zero"
        assert torch.equal(tr.initial_free_states(sp, carried), torch.zeros(b - a, D))
        tr.cfg.h_init = "persist"
        kept = tr.initial_free_states(sp, carried)
        assert torch.equal(kept, tr.Z[a:b]) and kept.data_ptr() != tr.Z[a:b].data_ptr()
        tr.cfg.h_init = "forward-parallel"
    assert tr.model.training  # mode restored


def test_forward_parallel_in_training(corpus_dir: Path, float64,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each update's free states come from one parallel pass from the stored free states
    (the previous epoch's values for the span's blocks), the carried state entering it."""
    checks: list[bool] = []

    def on_new(rec: dict, model) -> None:
        tr = holder["tr"]
        P = dict(model.named_parameters())
        # the span's first block: the span whose tokens these are
        x = rec["inputs"]
        s = next(a for a in range(0, tr.blocks.num_blocks, tr.m)
                 if torch.equal(tr.blocks.inputs[a:a + x.shape[1]].t(), x))
        with torch.no_grad():
            expect = torch.cat([
                ref_block(P, model, tr.blocks.inputs[j], tr.blocks.targets[j],
                          rec["z_fixed"] if j == s else tr.Z[j - 1:j])[1]
                for j in range(s, s + x.shape[1])])
        checks.append(torch.allclose(rec["z_init"], expect, rtol=1e-10, atol=1e-12))

    holder: dict = {}
    seen = spy_problems(monkeypatch, on_new)
    tr = make_trainer(cfg_for(corpus_dir, h_init="forward-parallel", blocks_per_update=10,
                              epochs=2))
    holder["tr"] = tr
    tr.fit()
    n_spans = math.ceil(tr.blocks.num_blocks / 10)
    assert len(seen) == len(checks) == 2 * n_spans
    assert all(checks)
    # the carried state: the previous span's final state, from the last forward pass
    for prev, cur in zip(seen, seen[1:]):
        if cur["z_fixed"].abs().sum() == 0:  # a new epoch starts from zero
            continue
        assert torch.equal(cur["z_fixed"], prev["problem"].last_final)


def test_batch_mode_keeps_Z_and_U_across_epochs(corpus_dir: Path, float64,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_problems(monkeypatch)
    cfg = cfg_for(corpus_dir, method="admm", blocks_per_update="all", h_init="forward",
                  u_start=1, epochs=3, h_steps=3, theta_steps=2)
    tr = make_trainer(cfg)
    n, D = tr.blocks.num_blocks, tr.model.state_dim
    P = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
    with torch.no_grad():
        z_first = ref_sequential(P, tr.model, tr.blocks.inputs.t(), torch.zeros(1, D))
    after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (Z, U) at the end of each epoch
    orig_end = tr.solver.end_epoch

    def end_epoch() -> None:
        after.append((tr.Z.detach().clone(), tr.U.detach().clone()))
        # the stored Z is the update's final free states
        assert torch.equal(tr.Z.detach(), seen[-1]["problem"].z.detach())
        orig_end()

    tr.solver.end_epoch = end_epoch
    tr.fit()
    assert len(seen) == len(after) == 3  # one update per epoch
    assert all(r["inputs"].shape == (K, n) for r in seen)
    # h_init applies once: epoch 1 starts from the forward pass, later epochs from the stored Z
    assert torch.allclose(seen[0]["z_init"], z_first, rtol=1e-10, atol=1e-12)
    assert torch.equal(seen[0]["dual"], torch.zeros(n, D))
    for (z_prev, u_prev), cur in zip(after, seen[1:]):
        assert torch.equal(cur["z_init"], z_prev)
        assert torch.equal(cur["dual"], u_prev)
        assert cur["dual"].abs().max() > 0
        assert not torch.allclose(cur["z_init"], seen[0]["z_init"])
        assert torch.equal(cur["z_fixed"], torch.zeros(1, D))
    assert torch.equal(tr.Z.detach(), after[-1][0]) and torch.equal(tr.U.detach(), after[-1][1])
    assert not torch.equal(after[0][1], after[1][1])  # the duals moved in epoch 2


def test_lambda_mult_reaches_J(corpus_dir: Path, float64,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The penalty each θ-evaluation reports is (λ_e / 2) Σ‖F_j − z_{j+1}‖² with
    λ_e = λ · lambda_mult^(e−1) in epoch e: the multiplied λ reaches J, not the flag's."""
    records: list[tuple[float, float]] = []  # (penalty reported, Σ‖F − z‖² at that point)
    orig = BlockProblem.evaluate

    def evaluate(self, **kw):
        if kw.get("theta"):
            with torch.no_grad():
                entering = torch.cat([self.z_fixed, self.z[:-1]], 0)
                F_ = torch.cat([ref_block(dict(self.model.named_parameters()), self.model,
                                          self.inputs[:, j], self.targets[:, j],
                                          entering[j:j + 1])[1]
                                for j in range(self.num_blocks)])
                sq = float((F_ - self.z).pow(2).sum())
            res = orig(self, **kw)
            records.append((res.penalty, sq))
            return res
        return orig(self, **kw)

    monkeypatch.setattr(BlockProblem, "evaluate", evaluate)
    tr = make_trainer(cfg_for(corpus_dir, method="pm", h_init="zero", h_steps=0, theta_steps=1,
                              lam=0.5, lambda_mult=3.0, epochs=3, blocks_per_update=10))
    tr.fit()
    per_epoch = math.ceil(tr.blocks.num_blocks / 10)
    assert len(records) == 3 * per_epoch
    for i, (pen, sq) in enumerate(records):
        lam = 0.5 * 3.0 ** (i // per_epoch)
        assert sq > 1e-3
        assert pen == pytest.approx(0.5 * lam * sq, rel=1e-9), (i, pen / (0.5 * sq))


@pytest.mark.parametrize("method", ["pm", "admm", "alm"])
def test_carried_state_is_the_last_evaluations(corpus_dir: Path, float64, method: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The state carried into the next update is the span's final state as the update's last
    evaluation of J computed it (no extra pass: not recomputed after a dual step)."""
    finals: dict[int, list[torch.Tensor]] = {}
    orig = BlockProblem.evaluate

    def evaluate(self, **kw):
        res = orig(self, **kw)
        finals.setdefault(id(self), []).append(self.last_final.clone())
        return res

    monkeypatch.setattr(BlockProblem, "evaluate", evaluate)
    seen = spy_problems(monkeypatch)
    tr = make_trainer(cfg_for(corpus_dir, method=method, blocks_per_update=10, u_start=1,
                              h_init="forward", h_steps=2, theta_steps=2, alm_max_steps=2,
                              epochs=1, lr=0.5))
    tr.fit()
    moved = 0
    for prev, cur in zip(seen, seen[1:]):
        last = finals[id(prev["problem"])][-1]
        assert torch.equal(cur["z_fixed"], last)
        # the final state at the point the update moved to (what a dual step's pass sees)
        moved += not torch.allclose(prev["problem"].final_states()[-1:], last, atol=1e-9)
    assert moved > 0  # the two really differ, so the check above can fail


def test_initialisation_passes_run_without_dropout(corpus_dir: Path, float64) -> None:
    """forward and forward-parallel initialisations are the no-dropout recurrence even while
    the model trains with dropout (inter-layer and embedding)."""
    tr = make_trainer(cfg_for(corpus_dir, h_init="forward-parallel", dropout=0.5, nlayers=2,
                              blocks_per_update=5))
    n, D = tr.blocks.num_blocks, tr.model.state_dim
    g = torch.Generator().manual_seed(1)
    tr.Z.copy_(torch.rand(n, D, generator=g) - 0.5)
    carried = torch.rand(1, D, generator=g) - 0.5
    P = dict(tr.model.named_parameters())
    tr.model.train()
    sp = tr.plan[1]
    with torch.no_grad():
        expect = torch.cat([ref_block(P, tr.model, tr.blocks.inputs[j], tr.blocks.targets[j],
                                      carried if j == sp.a else tr.Z[j - 1:j])[1]
                            for j in range(sp.a, sp.b)])
        seq = ref_sequential(P, tr.model, tr.blocks.inputs[sp.a:sp.b].t(), carried)
    for _ in range(2):  # no mask is drawn: the same value twice, the reference's
        assert torch.allclose(tr.parallel_pass(sp, carried), expect, rtol=1e-10, atol=1e-12)
        tr.cfg.h_init = "forward"
        assert torch.allclose(tr.initial_free_states(sp, carried), seq, rtol=1e-10,
                              atol=1e-12)
        tr.cfg.h_init = "forward-parallel"
    assert tr.model.training


@pytest.mark.parametrize("cell,nlayers", [("gru", 2), ("lstm", 1), ("lstm", 2),
                                           ("diag-lstm", 2)])
def test_forward_initialisation_of_a_ranks_shard(corpus_dir: Path, float64, cell: str,
                                                 nlayers: int) -> None:
    """A rank's forward-initialised free states are its rows of the sequential pass through
    the whole span, from the carried state (none for a rank without blocks)."""
    tr = make_trainer(cfg_for(corpus_dir, model=cell, nlayers=nlayers, blocks_per_update=8))
    D = tr.model.state_dim
    carried = torch.rand(1, D, generator=torch.Generator().manual_seed(2)) - 0.5
    P = dict(tr.model.named_parameters())
    a, b = 8, 16
    with torch.no_grad():
        if cell.startswith("diag-"):  # the module over blocks a … j as one sequence
            m, flat = tr.model, tr.blocks.inputs[a:b].reshape(-1, 1)
            seq = torch.cat([m.flatten_state(m.rnn(m.encoder(flat[:(j + 1) * K]),
                                                   m.unflatten_state(carried))[1])
                             for j in range(b - a)])
        else:
            seq = ref_sequential(P, tr.model, tr.blocks.inputs[a:b].t(), carried)
    for s, e in ((a, b), (a, a + 3), (a + 3, a + 6), (a + 6, b), (b, b)):
        sp = SpanShard(a, b, s, e, 0, 2)
        got = tr.initial_free_states(sp, carried)
        assert got.shape == (e - s, D)
        assert torch.allclose(got, seq[s - a:e - a], rtol=1e-10, atol=1e-12), (s, e)


def test_stored_states_and_duals_carry_no_autograd_history(corpus_dir: Path) -> None:
    tr = make_trainer(cfg_for(corpus_dir, method="admm", blocks_per_update=5,
                              h_init="persist", u_start=1, epochs=1))
    tr.fit()
    assert tr.Z.grad_fn is None and not tr.Z.requires_grad
    assert tr.U.grad_fn is None and not tr.U.requires_grad


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("method", ["pm", "admm", "alm"])
def test_metrics_rows(corpus_dir: Path, tmp_path: Path, method: str) -> None:
    cfg = cfg_for(corpus_dir, method=method, epochs=2, u_start=1, h_init="zero",
                  positional_ppl=True, alm_max_steps=2, h_steps=3, lam=0.5, lambda_mult=2.0)
    train(cfg, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("ce", "penalty", "residual", "dual_norm", "h_steps", "lambda", "valid_ppl"):
            assert key in r and math.isfinite(r[key]), key
        assert r["h_steps"] == (2 if method == "alm" else 3)
        assert r["residual"] > 0 and r["penalty"] > 0
        assert r["ce"] == r["train_loss"]
        assert (r["dual_norm"] > 0) == (method != "pm")
        pos = r["positional_ppl"]
        assert isinstance(pos, list) and len(pos) == K
        assert all(math.isfinite(p) and p > 1 for p in pos)
        # the mean over positions of the log perplexities is the mean token cross entropy
        assert sum(math.log(p) for p in pos) / K == pytest.approx(r["ce"], rel=1e-5)
    assert [r["lambda"] for r in rows] == [0.5, 1.0]


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("bpu", [5, "all"])
def test_resume_equals_straight_run(corpus_dir: Path, tmp_path: Path,
                                    bpu: int | str) -> None:
    def cfg(epochs: int) -> TrainConfig:
        return cfg_for(corpus_dir, method="admm", u_start=2, dropout=0.2, epochs=epochs,
                       blocks_per_update=bpu, h_init="forward", h_optim="adagrad", h_lr=0.05,
                       optim="adagrad", lr=0.1, lambda_mult=1.5, theta_steps=2)

    straight, split = tmp_path / "straight", tmp_path / "split"
    train(cfg(3), straight)
    first = train(cfg(1), split)
    assert first["epochs_run"] == 1
    tr = resume_trainer(split, epochs=3)
    assert tr.epoch == 1 and tr.solver.lam == pytest.approx(1.5)
    tr.fit()
    ma, mb = metrics(straight), metrics(split)
    assert [r["epoch"] for r in ma] == [r["epoch"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb):
        for key in ("valid_ppl", "train_loss", "penalty", "residual", "dual_norm", "lambda"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    assert ma[0]["dual_norm"] == 0 and ma[1]["dual_norm"] > 0  # duals from epoch 2 on
    ca, cb = last_ckpt(straight), last_ckpt(split)
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["method_state"], cb["method_state"]
    assert torch.equal(sa["U"], sb["U"]) and sa["U"].abs().max() > 0
    if bpu == "all":
        assert torch.equal(sa["Z"], sb["Z"])
    else:
        assert sa["Z"] is None and sb["Z"] is None
    assert sa["solver"]["state"] == sb["solver"]["state"]


# --------------------------------------------------------------------------- command line
SMALL = ["--model", "gru", "--emsize", "4", "--nhid", "5", "--bptt", "4", "--eval-batch-size",
         "2", "--train-tokens", "121", "--eval-tokens", "100", "--quiet", "--device", "cpu",
         "--max-ppl", "1e9"]


def test_cli_batch_mode_run(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--method", "pm", "--blocks-per-update", "all", "--data-dir",
               str(corpus_dir), "--out", str(out), "--epochs", "2", "--h-steps", "2",
               "--h-optim", "sgd", "--h-lr", "0.1", "--lambda", "2", "--optim", "sgd",
               "--lr", "0.5", *SMALL])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "pm" and cfg["blocks_per_update"] == "all" and cfg["lam"] == 2.0
    rows = metrics(out)
    assert len(rows) == 2 and all(r["updates"] == 1 and r["h_steps"] == 2 for r in rows)
    st = last_ckpt(out)["method_state"]
    assert st["Z"] is not None and st["Z"].shape == (30, 5) and st["Z"].abs().max() > 0


@pytest.mark.parametrize("args,flag", [
    (["--blocks-per-update", "0"], "--blocks-per-update"),
    (["--blocks-per-update", "some"], "--blocks-per-update"),
    (["--lambda", "-1"], "--lambda"),
    (["--lambda", "0"], "--lambda"),
    (["--h-init", "nope"], "--h-init"),
    (["--h-optim", "adam"], "--h-optim"),
    (["--h-steps", "-1"], "--h-steps"),
])
def test_cli_errors(corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                    args: list[str], flag: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--method", "pm", "--data-dir", str(corpus_dir), "--out", str(out),
              *SMALL, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("field,value,flag", [
    ("blocks_per_update", 0, "--blocks-per-update"),
    ("blocks_per_update", "some", "--blocks-per-update"),
    ("lam", -1.0, "--lambda"),
    ("h_init", "nope", "--h-init"),
])
def test_config_rejects_bad_block_settings(corpus_dir: Path, field: str, value: Any,
                                           flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        cfg_for(corpus_dir, **{field: value})
