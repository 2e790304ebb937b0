"""Truncated BPTT training, run directories, checkpoints, resuming and divergence."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import write_corpus

import tprop.train as tr
from tprop.config import ConfigError, TrainConfig, make_config
from tprop.data import load_corpus
from tprop.evaluate import perplexity
from tprop.inference import load_run
from tprop.train import BPTTTrainer, make_trainer, resume_trainer, train

TIMING_KEYS = {"tokens_per_s", "train_s", "epoch_s", "wall_s"}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny corpus shared by the tests of this module."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny")




def cfg_for(data_dir: Path, **kw: Any) -> TrainConfig:
    base = dict(data_dir=str(data_dir), dataset=None, quiet=True, device="cpu", model="lstm",
                emsize=8, nhid=8, nlayers=1, bptt=4, batch_size=2, eval_batch_size=2,
                train_tokens=401, eval_tokens=200, epochs=1, seed=3)
    base.update(kw)
    return make_config(**base)


# --------------------------------------------------------------------------- reference
def reference_bptt_epoch(params: dict[str, torch.Tensor], data: torch.Tensor, B: int, K: int,
                         lr: float, group_size: int, losses_out: list[float] | None = None
                         ) -> dict[str, torch.Tensor]:
    """One epoch of truncated BPTT for a 1-layer LSTM LM, written from the formulas:
    B contiguous columns, windows of K steps, the state detached at each window boundary,
    mean token cross entropy per window, the gradients of ``group_size`` consecutive windows
    averaged (the last group may be smaller), then p -= lr * grad."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    n = (data.numel() - 1) // B
    inputs = torch.stack([data[b * n:(b + 1) * n] for b in range(B)], dim=1)  # (n, B)
    targets = torch.stack([data[b * n + 1:(b + 1) * n + 1] for b in range(B)], dim=1)
    nwin = n // K
    H = p["rnn.weight_hh_l0"].shape[1]
    h = torch.zeros(B, H, dtype=torch.float64)
    c = torch.zeros(B, H, dtype=torch.float64)
    groups = [list(range(s, min(s + group_size, nwin))) for s in range(0, nwin, group_size)]
    window_losses: list[float] = []
    for group in groups:
        grads = {k: torch.zeros_like(v) for k, v in p.items()}
        for w in group:
            h, c = h.detach(), c.detach()
            losses = []
            for t in range(w * K, (w + 1) * K):
                x = p["encoder.weight"][inputs[t]]
                gates = (x @ p["rnn.weight_ih_l0"].t() + p["rnn.bias_ih_l0"]
                         + h @ p["rnn.weight_hh_l0"].t() + p["rnn.bias_hh_l0"])
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                logits = h @ p["decoder.weight"].t() + p["decoder.bias"]
                losses.append(F.cross_entropy(logits, targets[t], reduction="sum"))
            loss = torch.stack(losses).sum() / (K * B)
            window_losses.append(loss.item())
            gs = torch.autograd.grad(loss, list(p.values()))
            for k, gk in zip(p, gs):
                grads[k] += gk
        with torch.no_grad():
            for k in p:
                p[k] -= lr * grads[k] / len(group)
    out = {k: v.detach() for k, v in p.items()}
    if losses_out is not None:
        losses_out.extend(window_losses)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("update_freq,full_batch", [(1, False), (3, False), (1, True)])
def test_bptt_epoch_matches_reference(corpus_dir: Path, float64, update_freq: int,
                                      full_batch: bool) -> None:
    cfg = cfg_for(corpus_dir, optim="sgd", clip=0.0, lr=0.7, update_freq=update_freq,
                  full_batch=full_batch)
    trainer = make_trainer(cfg)
    init = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert all(v.dtype == torch.float64 for v in init.values())
    summary = trainer.fit()
    assert summary["status"] == "finished" and summary["epochs_run"] == 1

    data = load_corpus(None, str(corpus_dir)).train[:401]
    nwin = (400 // 2) // 4
    assert nwin == 50 and nwin % 3 == 2  # update_freq 3: the last group has 2 windows
    group = nwin if full_batch else update_freq
    losses: list[float] = []
    ref = reference_bptt_epoch(init, data, B=2, K=4, lr=0.7, group_size=group,
                               losses_out=losses)
    # the epoch's training loss is the mean of its windows' losses
    assert len(losses) == nwin
    assert summary["train_ppl_at_best"] == pytest.approx(math.exp(sum(losses) / nwin),
                                                         rel=1e-10)
    got = trainer.model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        moved = (ref[k] - init[k]).norm().item()
        assert moved > 1e-6, f"{k} did not move in the reference: a useless test"
        assert rel_err(got[k], ref[k]) < 1e-10, k
    # a different grouping gives a different trajectory (so the comparison is sharp)
    if group != 1:
        other = reference_bptt_epoch(init, data, B=2, K=4, lr=0.7, group_size=1)
        assert rel_err(other["decoder.bias"], ref["decoder.bias"]) > 1e-6


def test_clipping_bounds_the_update(corpus_dir: Path, float64) -> None:
    lr, clip = 0.5, 1e-3
    cfg = cfg_for(corpus_dir, optim="sgd", clip=clip, lr=lr, full_batch=True)
    trainer = make_trainer(cfg)
    init = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    step = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in
                          zip(trainer.model.parameters(), init)))
    assert step.item() == pytest.approx(lr * clip, rel=1e-4)
    # unclipped, the same single update is much longer
    data = load_corpus(None, str(corpus_dir)).train[:401]
    names = [n for n, _ in trainer.model.named_parameters()]
    ref = reference_bptt_epoch(dict(zip(names, init)), data, 2, 4, lr, group_size=50)
    free = torch.sqrt(sum(((ref[n] - q) ** 2).sum() for n, q in zip(names, init)))
    assert free.item() > 10 * lr * clip


# --------------------------------------------------------------------------- run directory
def _walk(obj: Any, path: str = "") -> None:
    """Fail on anything in a checkpoint that is not a tensor or plain data."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{path}: key {k!r}"
            _walk(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]")
    else:
        assert isinstance(obj, (torch.Tensor, str, int, float, bool, type(None))), \
            f"{path}: {type(obj).__name__}"
        assert not isinstance(obj, torch.nn.Module)


@pytest.fixture(scope="module")
def finished_run(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = cfg_for(corpus_dir, epochs=2, optim="adagrad", lr=0.1, train_tokens=1201,
                  nhid=12, emsize=12)
    summary = train(cfg, out)
    return cfg, out, summary


def test_run_directory_files(finished_run) -> None:
    cfg, out, summary = finished_run
    assert TrainConfig.load(out / "config.json") == cfg
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("epoch", "lr", "train_loss", "train_ppl", "valid_ppl", "tokens_per_s",
                    "wall_s"):
            assert key in r, key
        assert r["train_ppl"] == pytest.approx(math.exp(r["train_loss"]), rel=1e-12)
        assert r["lr"] == 0.1 and r["tokens_per_s"] > 0
    assert rows[1]["wall_s"] >= rows[0]["wall_s"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    best = min(rows, key=lambda r: r["valid_ppl"])
    assert summary["status"] == "finished"
    assert summary["epochs_run"] == 2
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best_valid_ppl"] == pytest.approx(best["valid_ppl"], rel=1e-12)
    assert summary["test_ppl"] is not None and 1 < summary["test_ppl"] < 60


def test_checkpoints_are_plain_data(finished_run) -> None:
    _, out, summary = finished_run
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        _walk(ckpt)
        assert isinstance(ckpt["model"], dict)
        assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_summary_test_ppl_is_best_checkpoint_on_test(finished_run) -> None:
    _, out, summary = finished_run
    run = load_run(out, "best", device="cpu")
    loss, n = run.evaluate("test")
    assert n > 0
    assert perplexity(loss) == pytest.approx(summary["test_ppl"], rel=1e-12)
    # load_run("last") gives the weights of last.pt
    last = load_run(out, "last", device="cpu")
    torch.testing.assert_close(
        last.model.state_dict(),
        torch.load(out / "last.pt", weights_only=True)["model"])


def test_resume_refuses_trajectory_changes(finished_run) -> None:
    _, out, _ = finished_run
    before = (out / "config.json").read_text()
    with pytest.raises(ConfigError, match="lr"):
        resume_trainer(out, lr=0.5)
    with pytest.raises(ConfigError, match="bptt"):
        resume_trainer(out, bptt=7)
    assert (out / "config.json").read_text() == before


# --------------------------------------------------------------------------- resuming
def resume_cfg(corpus_dir: Path, epochs: int) -> TrainConfig:
    return cfg_for(corpus_dir, epochs=epochs, nlayers=2, nhid=12, emsize=12, dropout=0.3,
                   optim="adagrad", lr=0.2, clip=0.5, lrshrink=2.0, tol=1, batch_size=4,
                   bptt=6, train_tokens=1601, eval_batch_size=4)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in TIMING_KEYS}


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight_run(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    train(resume_cfg(corpus_dir, 3), out)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert _metrics(a) == _metrics(b)
    assert len(_metrics(a)) == 3
    assert _summary(a) == _summary(b)
    for ckpt in ("last.pt", "best.pt"):
        pa, pb = _params(a / ckpt), _params(b / ckpt)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), (ckpt, k)
    assert json.loads((a / "config.json").read_text()) == \
        json.loads((b / "config.json").read_text())


def test_resume_after_epoch_equals_straight_run(corpus_dir: Path, straight_run: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(resume_cfg(corpus_dir, 1), out)
    assert first["epochs_run"] == 1
    trainer = resume_trainer(out, epochs=3)
    assert trainer.epoch == 1
    # the schedule and the optimiser come back as they were after epoch 1
    assert (trainer.schedule.best_epoch, trainer.schedule.best) == (1, first["best_valid_ppl"])
    assert trainer.optimizer.state, "adagrad's accumulators were not restored"
    trainer.fit()
    assert_same_run(straight_run, out)


def test_resume_after_crash_mid_epoch(corpus_dir: Path, straight_run: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    original = BPTTTrainer.train_epoch
    crashed = []

    def crashing(self, epoch: int, lr: float):
        if epoch == 2 and not crashed:
            crashed.append(epoch)
            step, calls = self.optimizer.step, []

            def step_then_crash(*a, **k):
                calls.append(1)
                if len(calls) > 5:  # some updates of epoch 2 are done: die mid-epoch
                    raise RuntimeError("simulated crash")
                return step(*a, **k)

            self.optimizer.step = step_then_crash
        return original(self, epoch, lr)

    monkeypatch.setattr(BPTTTrainer, "train_epoch", crashing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(resume_cfg(corpus_dir, 3), out)
    assert crashed == [2]
    assert [r["epoch"] for r in _metrics(out)] == [1]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    resume_trainer(out).fit()
    assert_same_run(straight_run, out)


# --------------------------------------------------------------------------- atomic writes
def test_failed_checkpoint_write_keeps_previous(corpus_dir: Path, straight_run: Path,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    last_saves = []

    def target(f) -> str:
        """The path a file object writes to (atomic writes pass an fdopen'ed temp file)."""
        try:
            return os.readlink(f"/proc/self/fd/{f.fileno()}")
        except (OSError, AttributeError):
            return str(getattr(f, "name", f))

    def flaky_save(obj, f, *a, **k):
        name = target(f)
        if Path(name).name.startswith((".last.pt", "last.pt")):
            last_saves.append(name)
            if len(last_saves) == 2:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError("no space left on device (simulated)")
        return real_save(obj, f, *a, **k)

    import tprop.data.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod.torch, "save", flaky_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="simulated"):
        train(resume_cfg(corpus_dir, 3), out)
    monkeypatch.undo()
    assert len(last_saves) == 2
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")
                 or p.name.startswith(".")]
    assert leftovers == []
    # epoch 2's metrics row was written before its checkpoint failed: resuming drops it
    # and redoes epoch 2, ending where an uninterrupted run ends
    resume_trainer(out).fit()
    assert_same_run(straight_run, out)


# --------------------------------------------------------------------------- divergence
def test_huge_lr_diverges(corpus_dir: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    summary = train(cfg_for(corpus_dir, optim="sgd", lr=1e6, clip=0.0, epochs=3), out)
    assert summary["status"] == "diverged"
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert summary["epochs_run"] == 0
    assert summary["test_ppl"] is None
    assert not (out / "best.pt").exists()
    text = capsys.readouterr().out
    assert "diverged" in text and "max-ppl" in text


def test_divergence_keeps_best_checkpoint(corpus_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    original = BPTTTrainer.train_epoch

    def blow_up_in_epoch_2(self, epoch: int, lr: float):
        return original(self, epoch, 1e6 if epoch == 2 else lr)

    monkeypatch.setattr(BPTTTrainer, "train_epoch", blow_up_in_epoch_2)
    out = tmp_path / "run"
    summary = train(cfg_for(corpus_dir, optim="sgd", lr=0.5, clip=0.0, epochs=3), out)
    assert summary["status"] == "diverged"
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 1
    for v in best["model"].values():
        assert torch.isfinite(v).all()
    run = load_run(out, "best", device="cpu")
    assert perplexity(run.evaluate("test")[0]) == pytest.approx(summary["test_ppl"], rel=1e-12)
    assert "best checkpoint" in capsys.readouterr().out


def test_low_max_ppl_stops_as_diverged(corpus_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    summary = train(cfg_for(corpus_dir, max_ppl=1.5, epochs=3), out)
    assert summary["status"] == "diverged"
    assert summary["epochs_run"] == 0
    assert "1.5" in capsys.readouterr().out


def test_trainer_without_run_dir(corpus_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    summary = make_trainer(cfg_for(corpus_dir, epochs=2)).fit()
    assert summary["status"] == "finished" and summary["test_ppl"] is not None
    assert list(tmp_path.iterdir()) == []


def test_unknown_method_is_config_error(corpus_dir: Path) -> None:
    cfg = cfg_for(corpus_dir)
    cfg.method = "nosuch"
    with pytest.raises(ConfigError):
        tr.make_trainer(cfg)
