"""Distributed training (gloo on 127.0.0.1, 2 processes, tiny models, float64): the same run on
2 ranks and on 1 gives the same parameters, free states and duals (Block TPROP, batch and
minibatch, every solver; BPTT with DDP); runs resume on another number of ranks; a rank that
dies or hangs makes the other stop with the documented message within the timeout.

The ranks are started directly (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment, as
torchrun sets them) or by torchrun itself (the command-line tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_corpus

from tprop.cli import main
from tprop.comm import owned_rows, plan_spans, split
from tprop.config import ConfigError, make_config
from tprop.distributed import (
    EXIT_LOST_CONTACT,
    LOST_CONTACT,
    is_comm_error,
    lost_contact_message,
    strip_nproc,
)
from tprop.rundir import RunDir
from tprop.train import make_trainer

TESTS = Path(__file__).resolve().parent
K = 4
TOL = 1e-10

# The runs compared between 1 and 2 ranks: (name, config overrides). 40 blocks of K = 4.
# The free states are optimised by sgd or nag here, not adagrad: adagrad's first step is
# lr·g/(|g| + 1e-10), which turns a gradient that is zero up to rounding (the last free state's
# at a forward-initialised point) into a step of ~1e-8·lr made of rounding noise; one process
# alone moves by ~1e-8 when only --chunk-blocks changes. θ is trained by adagrad and nag.
CASES: list[tuple[str, dict[str, Any]]] = [
    # batch mode (flagship): PM with the reparametrisation and clipped h-steps
    ("pm-batch", dict(method="pm", blocks_per_update="all", epochs=3, h_steps=3, theta_steps=2,
                      arctanh=True, h_clip=0.05, h_optim="nag", h_lr=0.1,
                      optim="adagrad", lr=0.1)),
    # batch ADMM: dual steps (clipped, global norm), forward-parallel initialisation
    ("admm-batch", dict(method="admm", blocks_per_update="all", epochs=3, u_start=1,
                        u_clip=0.05, h_init="forward-parallel", h_steps=2, theta_steps=2,
                        h_optim="nag", h_lr=0.05)),
    # minibatch: 7-block spans (the last one 5), forward init, joint ALM steps
    ("alm-mini", dict(method="alm", blocks_per_update=7, epochs=2, alm_max_steps=3, u_start=1,
                      h_clip=0.01, h_optim="nag", h_lr=0.1, optim="nag", lr=0.1)),
    # minibatch: the last span is 1 block (rank 1 idle in it), persist, positional ppl;
    # validation in 3 columns (2 on rank 0, 1 on rank 1)
    ("pm-mini", dict(method="pm", blocks_per_update=13, epochs=2, h_init="persist",
                     positional_ppl=True, h_steps=2, eval_batch_size=3)),
    # minibatch ADMM with forward-parallel initialisation (stored states exchanged);
    # validation in 1 column (rank 1 has none)
    ("admm-mini", dict(method="admm", blocks_per_update=9, epochs=2, u_start=1,
                       h_init="forward-parallel", h_steps=1, theta_steps=1,
                       eval_batch_size=1)),
    # BPTT: DDP over 4 columns (2 per rank), updates of 2 windows
    ("bptt", dict(method="bptt", batch_size=4, update_freq=2, epochs=2, optim="adagrad",
                  lr=0.1)),
    # the diagonal cells: DDP BPTT, and block-parallel PM
    ("bptt-diag", dict(method="bptt", model="diag-gru", batch_size=4, epochs=2)),
    ("pm-diag", dict(method="pm", model="diag-lstm", blocks_per_update="all", epochs=2,
                     h_steps=2, h_optim="nag", h_lr=0.1)),
]


def cfg_dict(data_dir: Path | str, **kw: Any) -> dict[str, Any]:
    base = dict(data_dir=str(data_dir), dataset=None, quiet=True, device="cpu", model="lstm",
                emsize=4, nhid=5, nlayers=1, bptt=K, batch_size=1, eval_batch_size=2,
                train_tokens=161, eval_tokens=120, epochs=2, seed=3, optim="sgd", lr=0.5,
                clip=0.5, dropout=0.0, tol=10, max_ppl=1e9, method="pm",
                blocks_per_update=5, h_steps=2, h_optim="sgd", h_lr=0.1, theta_steps=1,
                dtype="float64", dist_timeout=30.0)
    base.update(kw)
    return base


def final_state(trainer: Any) -> dict[str, Any]:
    """Parameters, free states and duals (full tensors, gathered to rank 0) after a run; every
    rank calls it."""
    ms = trainer.method_state()
    z, u = ms.get("Z"), ms.get("U")
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "Z": None if z is None else z.detach().clone(),
            "U": None if u is None else u.detach().clone()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_same(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    for k, v in ref["model"].items():
        assert v.dtype == torch.float64
        assert rel_err(got["model"][k], v) < TOL, f"{what}: parameter {k}"
    for name in ("Z", "U"):
        if ref[name] is None:
            assert got[name] is None, f"{what}: {name}"
        else:
            assert got[name].shape == ref[name].shape
            assert ref[name].abs().sum() > 0, f"{what}: {name} is all zero (nothing tested)"
            assert rel_err(got[name], ref[name]) < TOL, f"{what}: {name}"


# ----------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TPROP_OFFLINE="1", TPROP_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def start_ranks(argv: list[str], world: int, tmp: Path, cwd: Path | None = None
                ) -> list[subprocess.Popen]:
    """``world`` processes running ``python <argv>`` as the ranks of one job (what torchrun
    would start, without its agent)."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = env_for(tmp, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd or tmp,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, so + se))
    return out


def torchrun(args: list[str], tmp: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "tprop", *args]
    return subprocess.run(cmd, env=env_for(tmp), cwd=tmp, capture_output=True, text=True,
                          timeout=180)


def _worker(data_dir: str, out: str) -> None:
    """One rank of the 1-vs-2-ranks comparison: every case of CASES in turn."""
    import torch.distributed as dist

    from tprop import distributed
    from tprop.config import TrainConfig

    torch.set_num_threads(1)
    distributed.init_process_group(torch.device("cpu"), 60)
    comm = distributed.DistComm(torch.device("cpu"), 60)
    results = {}
    for name, kw in CASES:
        cfg = TrainConfig.from_dict(cfg_dict(data_dir, **kw)).validate()
        trainer = make_trainer(cfg, None, comm=comm)
        summary = trainer.fit()
        res = final_state(trainer)
        res["status"] = summary["status"]
        res["best_valid_ppl"] = trainer.schedule.best
        res["bytes"] = trainer.comm.bytes.copy()
        results[name] = res
    bad = TrainConfig.from_dict(cfg_dict(data_dir, method="bptt", batch_size=3)).validate()
    try:
        make_trainer(bad, None, comm=comm)
    except ConfigError as e:
        results["indivisible"] = str(e)
    torch.save(results, f"{out}.{dist.get_rank()}")
    comm.close()  # a barrier, then the group destroyed
    os._exit(0)  # the results are saved: no gloo teardown at interpreter exit


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("dcorpus") / "tiny", n_train=800, n_eval=200,
                        vocab=12)


@pytest.fixture(scope="module")
def two_rank_results(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> list[dict[str, Any]]:
    """Every case of CASES trained on 2 ranks (one launch); the results of both ranks."""
    tmp = tmp_path_factory.mktemp("dist2")
    out = tmp / "results.pt"
    code = (f"import test_distributed as t; t._worker({str(corpus_dir)!r}, {str(out)!r})")
    runs = finish(start_ranks(["-c", code], 2, tmp), timeout=300)
    assert [rc for rc, _ in runs] == [0, 0], "\n".join(text[-3000:] for _, text in runs)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


# ----------------------------------------------------------------------------- unit tests
def test_split_is_balanced_and_nonempty_ranks_form_a_prefix() -> None:
    assert split(7, 2) == [(0, 4), (4, 7)]
    assert split(1, 3) == [(0, 1), (1, 1), (1, 1)]
    for count in range(0, 12):
        for world in range(1, 5):
            shards = split(count, world)
            sizes = [e - s for s, e in shards]
            assert sum(sizes) == count and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)
            assert all(shards[i][1] == shards[i + 1][0] for i in range(world - 1))


def test_plan_covers_every_block_once() -> None:
    for n, m, world in ((40, 13, 2), (40, 40, 3), (10, 3, 4), (5, 5, 8)):
        plans = plan_spans(n, m, world)
        rows = torch.cat([owned_rows(p) for p in plans])
        assert sorted(rows.tolist()) == list(range(n))
        for p in plans:
            assert [sp.lo for sp in p] == [sum(q.size for q in p[:i]) for i in range(len(p))]


def test_strip_nproc() -> None:
    assert strip_nproc(["train", "--nproc", "2", "--epochs", "3"]) == ["train", "--epochs", "3"]
    assert strip_nproc(["train", "--nproc=4", "--quiet"]) == ["train", "--quiet"]
    assert strip_nproc(["train", "--npro", "4"]) == ["train"]


def test_config_fields() -> None:
    cfg = make_config(dataset="ptb", dtype="float64", dist_timeout=5)
    assert cfg.dtype == "float64" and cfg.dist_timeout == 5
    with pytest.raises(ConfigError, match="--dtype"):
        make_config(dataset="ptb", dtype="float16")
    with pytest.raises(ConfigError, match="--dist-timeout"):
        make_config(dataset="ptb", dist_timeout=0)


def test_dtype_float64_single_process(corpus_dir: Path) -> None:
    trainer = make_trainer(make_config(**cfg_dict(corpus_dir, epochs=1, blocks_per_update="all")))
    assert trainer.model.decoder.weight.dtype == torch.float64
    assert trainer.Z.dtype == torch.float64
    trainer.fit()


def test_comm_errors_and_message() -> None:
    closed = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                          "closed by peer [127.0.0.1]:9134")
    assert is_comm_error(closed)
    assert is_comm_error(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                                      "waiting 4000ms for recv operation to complete"))
    assert not is_comm_error(ValueError("bad value"))
    msg = lost_contact_message(1, 2, closed, 30, "runs/x", 3)
    assert msg.startswith(f"tprop train: rank 1 of 2: {LOST_CONTACT} (")
    assert "runs/x/last.pt" in msg and "--dist-timeout 30 s" in msg


def test_nproc_inside_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch, corpus_dir: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data-dir", str(corpus_dir), "--nproc", "2"])
    assert e.value.code == 2
    assert "--nproc: this process is already one rank" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 1 vs 2 ranks
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_two_ranks_equal_one(name: str, corpus_dir: Path,
                             two_rank_results: list[dict[str, Any]]) -> None:
    kw = dict(CASES)[name]
    trainer = make_trainer(make_config(**cfg_dict(corpus_dir, **kw)))
    summary = trainer.fit()
    assert summary["status"] == "finished"
    ref = final_state(trainer)
    got0, got1 = two_rank_results[0][name], two_rank_results[1][name]
    assert got0["status"] == "finished"
    for got in (got0, got1):  # validation, shared out over the ranks
        assert abs(got["best_valid_ppl"] / summary["best_valid_ppl"] - 1) < TOL
    assert_same(got0, ref, f"{name}, rank 0")
    for k, v in got0["model"].items():  # the ranks hold the very same parameters
        assert torch.equal(got1["model"][k], v), f"{name}: ranks disagree on {k}"
    if kw["method"] != "bptt":
        assert got0["bytes"]["theta"] > 0
        if kw.get("blocks_per_update") == "all" or kw.get("h_steps", 2) > 0:
            assert got0["bytes"]["boundary"] > 0


# ----------------------------------------------------------------------------- command line
def _last(run: Path) -> dict[str, Any]:
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ms = ckpt["method_state"]
    return {"model": ckpt["model"], "Z": ms.get("Z"), "U": ms.get("U"), "epoch": ckpt["epoch"]}


def _train_args(corpus_dir: Path, out: Path, epochs: int) -> list[str]:
    return ["train", "--data-dir", str(corpus_dir), "--quiet", "--device", "cpu",
            "--model", "lstm", "--emsize", "4", "--nhid", "5", "--bptt", str(K),
            "--eval-batch-size", "2", "--train-tokens", "161", "--eval-tokens", "120",
            "--seed", "3", "--optim", "adagrad", "--lr", "0.1", "--tol", "10",
            "--max-ppl", "1e9", "--method", "admm", "--blocks-per-update", "all",
            "--u-start", "1", "--h-steps", "2", "--h-optim", "sgd", "--h-lr", "0.1",
            "--theta-steps", "2", "--dtype", "float64", "--epochs", str(epochs),
            "--out", str(out)]


@pytest.fixture(scope="module")
def straight_run(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 3 epochs in one process, uninterrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(_train_args(corpus_dir, out, 3)) == 0
    return out


def _compare_runs(run: Path, ref: Path) -> None:
    got, want = _last(run), _last(ref)
    assert got["epoch"] == want["epoch"] == 3
    assert_same(got, want, str(run))
    rows, ref_rows = RunDir(run).read_metrics(), RunDir(ref).read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r, q in zip(rows, ref_rows):
        assert abs(r["valid_loss"] - q["valid_loss"]) < TOL * q["valid_loss"]


def test_torchrun_two_ranks_then_resume_on_one(corpus_dir: Path, straight_run: Path,
                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = torchrun(_train_args(corpus_dir, run, 2), tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert log.count("epoch   1 |") == 1 and "distributed: 2 ranks, backend gloo" in log
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    ckpt = _last(run)
    assert ckpt["Z"].shape[0] == 40 and ckpt["U"].shape[0] == 40  # gathered, full
    # resume in one process
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    _compare_runs(run, straight_run)


@pytest.mark.slow
def test_one_rank_then_resume_on_two_with_nproc(corpus_dir: Path, straight_run: Path,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    assert main(_train_args(corpus_dir, run, 1)) == 0
    monkeypatch.chdir(tmp_path)
    for k, v in env_for(tmp_path).items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--nproc", "2"]) == 0
    assert "resuming" in (run / "train.log").read_text()
    _compare_runs(run, straight_run)


def test_bptt_batch_not_divisible_is_refused(two_rank_results: list[dict[str, Any]]) -> None:
    for res in two_rank_results:
        assert res["indivisible"].startswith("--batch-size: 3 stream columns do not split "
                                             "evenly over 2 ranks")


@pytest.mark.slow
def test_config_error_under_two_ranks(corpus_dir: Path, tmp_path: Path) -> None:
    """Rank 0 prints the error once; both ranks exit with status 2; nothing is written."""
    args = _train_args(corpus_dir, tmp_path / "run", 1)
    args[args.index("admm")] = "bptt"
    args += ["--batch-size", "3"]
    runs = finish(start_ranks(["-m", "tprop", *args], 2, tmp_path))
    assert [rc for rc, _ in runs] == [2, 2]
    assert "--batch-size: 3 stream columns do not split evenly over 2 ranks" in runs[0][1]
    assert "--batch-size" not in runs[1][1]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- faults
def _wait_for(path: Path, procs: list[subprocess.Popen], limit: float = 120) -> None:
    t0 = time.monotonic()
    while not path.is_file():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a rank exited early: {p.communicate()}")
        assert time.monotonic() - t0 < limit, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_lost_rank_stops_the_other(sig: int, corpus_dir: Path, tmp_path: Path) -> None:
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) after the first epoch: rank 0 exits with
    EXIT_LOST_CONTACT and the documented message within the timeout, last.pt intact."""
    timeout = 4
    run = tmp_path / "run"
    args = _train_args(corpus_dir, run, 10_000)
    args += ["--dist-timeout", str(timeout), "--train-tokens", "801", "--tol", "1000000"]
    procs = start_ranks(["-m", "tprop", *args], 2, tmp_path)
    try:
        _wait_for(run / "last.pt", procs)
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(procs[1].pid, sig)
        try:
            so, se = procs[0].communicate(timeout=timeout + 20)
        except subprocess.TimeoutExpired:
            raise AssertionError("rank 0 did not stop") from None
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.communicate()
    assert procs[0].returncode == EXIT_LOST_CONTACT, so + se
    assert f"tprop train: rank 0 of 2: {LOST_CONTACT}" in se
    assert f"{run / 'last.pt'} (written by rank 0), is intact" in se
    limit = 5 if sig == signal.SIGKILL else timeout + 10
    assert waited < limit
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] >= 1 and ckpt["method_state"]["Z"].shape[0] == 200


# ----------------------------------------------------------------------------- tprop --nproc
def test_first_failure_status() -> None:
    """`tprop train --nproc` reports the status of the rank that failed first, preferring a
    rank's own failure to what it caused in the others (lost contact, SIGTERM)."""
    from types import SimpleNamespace as F

    from tprop.distributed import first_failure_status

    assert first_failure_status({0: F(exitcode=2, timestamp=5), 1: F(exitcode=2, timestamp=5)}) == 2
    assert first_failure_status({0: F(exitcode=4, timestamp=5), 1: F(exitcode=-9, timestamp=5)}) \
        == 137
    assert first_failure_status({0: F(exitcode=143, timestamp=4), 1: F(exitcode=3, timestamp=6)}) \
        == 3
    assert first_failure_status({1: F(exitcode=1, timestamp=7), 0: F(exitcode=1, timestamp=6)}) \
        == 1
    assert first_failure_status({0: F(exitcode=4, timestamp=5)}) == EXIT_LOST_CONTACT


def _nproc(args: list[str], tmp: Path, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tprop", *args, "--nproc", "2"],
                            env=env_for(tmp), cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_nproc_config_error_exits_2_without_torchrun_report(corpus_dir: Path,
                                                           tmp_path: Path) -> None:
    """The docs' exit status 2 (not torchrun's 1), rank 0's one-line message, no report."""
    args = _train_args(corpus_dir, tmp_path / "run", 1)
    args[args.index("admm")] = "bptt"
    args += ["--batch-size", "3"]
    p = _nproc(args, tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert "--batch-size: 3 stream columns do not split evenly over 2 ranks" in err
    assert err.count("error:") == 1, err
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nproc_ctrl_c_exits_130_and_the_run_resumes(corpus_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the launcher's process group) reaches the ranks once, through torchrun:
    they stop, the launcher exits with 130 and no traceback, and the run resumes."""
    run = tmp_path / "run"
    args = _train_args(corpus_dir, run, 10_000) + ["--tol", "1000000"]
    p = _nproc(args, tmp_path, start_new_session=True)
    try:
        _wait_for(run / "last.pt", [p])
        time.sleep(0.3)
        os.killpg(p.pid, signal.SIGINT)
        so, se = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 130, so[-2000:] + se[-3000:]
    assert "Traceback" not in se and "ChildFailedError" not in se, se[-3000:]
    assert f"continue with: tprop train --resume {run}" in so
    done = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert main(["train", "--resume", str(run), "--epochs", str(done + 1)]) == 0


def test_comm_check_script_with_gloo(tmp_path: Path) -> None:
    """scripts/comm_check.py (the single-GPU NCCL check of docs/distributed.md) passes with
    gloo on 2 ranks: every DistComm operation returns what it must."""
    script = TESTS.parent / "scripts" / "comm_check.py"
    runs = finish(start_ranks([str(script), "--backend", "gloo"], 2, tmp_path))
    assert [rc for rc, _ in runs] == [0, 0], "\n".join(t[-2000:] for _, t in runs)
    lines = [json.loads(ln) for _, text in runs for ln in text.splitlines()
             if ln.startswith("{")]
    assert len(lines) == 2 and all(all(v for k, v in ln.items() if isinstance(v, bool))
                                   for ln in lines)
