"""tprop's BPTT trainer against a minimal plain PyTorch loop: same model, same tokens.

Both train the Zaremba-small PTB model (2x200 LSTM, 20 steps, batch 20, SGD) on the first
``--tokens`` training tokens, in one process, alternating ``--repeats`` times (plain first in
odd repeats, tprop first in even ones). The ratio reported is the median of the per-repeat
ratios (each pair measured back to back, so slow drifts of the machine cancel); the median
tokens/s of each side is printed beside it. Ends with one JSON line.

    python benchmarks/bench_bptt.py [--tokens 60000] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tprop.config import make_config
from tprop.data import load_corpus
from tprop.system import tune_allocator
from tprop.train import make_trainer


def plain_loop(data: torch.Tensor, ntoken: int, seed: int, bptt: int, bs: int, lr: float,
               clip: float) -> float:
    """The canonical word_language_model loop; returns tokens/s."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Embedding(ntoken, 200)
            self.rnn = nn.LSTM(200, 200, 2)
            self.dec = nn.Linear(200, ntoken)
            for p in self.parameters():
                nn.init.uniform_(p, -0.1, 0.1)

        def forward(self, x, h):
            out, h = self.rnn(self.enc(x), h)
            return self.dec(out), h

    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = (data.numel() - 1) // bs
    src = data[: n * bs].view(bs, n).t()
    tgt = data[1 : n * bs + 1].view(bs, n).t()
    h = (torch.zeros(2, bs, 200), torch.zeros(2, bs, 200))
    nwin = n // bptt
    t0 = time.perf_counter()
    for w in range(nwin):
        x, y = src[w * bptt:(w + 1) * bptt], tgt[w * bptt:(w + 1) * bptt]
        h = tuple(s.detach() for s in h)
        logits, h = model(x, h)
        loss = F.cross_entropy(logits.view(-1, ntoken), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return nwin * bptt * bs / (time.perf_counter() - t0)


def tprop_epoch(cfg, corpus) -> float:
    trainer = make_trainer(cfg, None, corpus)
    t0 = time.perf_counter()
    stats = trainer.train_epoch(1, cfg.lr)
    return stats["tokens"] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_allocator()  # tprop does this; do it first so both sides get it
    cfg = make_config("zaremba-small", train_tokens=args.tokens, eval_tokens=1000, quiet=True,
                      device="cpu", data_dir=args.data_dir)
    corpus = load_corpus(cfg.dataset, cfg.data_dir)
    data = corpus.train[: args.tokens]
    ntok = len(corpus.vocab)
    plain: list[float] = []
    ours: list[float] = []

    def run_plain() -> None:
        plain.append(plain_loop(data, ntok, cfg.seed, cfg.bptt, cfg.batch_size, cfg.lr,
                                cfg.clip))

    def run_tprop() -> None:
        ours.append(tprop_epoch(cfg, corpus))

    for r in range(args.repeats):
        for f in ((run_plain, run_tprop) if r % 2 == 0 else (run_tprop, run_plain)):
            f()
        print(f"repeat {r + 1}: plain {plain[-1]:,.0f} tok/s | tprop {ours[-1]:,.0f} tok/s"
              f" | ratio {ours[-1] / plain[-1]:.3f}")
    ratio = statistics.median(t / p for t, p in zip(ours, plain))
    p, t = statistics.median(plain), statistics.median(ours)
    print(f"model: 2x200 LSTM, vocab {ntok}, bptt {cfg.bptt}, batch {cfg.batch_size}; "
          f"{args.tokens:,} tokens; threads {torch.get_num_threads()}; allocator tuned: {tuned}")
    print(f"median of {args.repeats}: plain {p:,.0f} tok/s, tprop {t:,.0f} tok/s; "
          f"median paired ratio {ratio:.3f}")
    print(json.dumps({"tprop_tokens_per_s": round(t, 1), "plain_tokens_per_s": round(p, 1),
                      "ratio": round(ratio, 4)}))

if __name__ == "__main__":
    main()
