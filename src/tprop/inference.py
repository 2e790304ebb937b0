"""Using a finished run: load its checkpoint, evaluate a split, sample text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import decode_strings, load_checkpoint
from .config import ConfigError, TrainConfig
from .data import Corpus, Vocab, detokenize, load_corpus
from .evaluate import evaluate
from .models import RNNLM
from .rundir import RunDir
from .system import resolve_device


@dataclass
class LoadedRun:
    """A run's config, its model (on ``device``, eval mode), vocabulary and, if loaded, corpus."""

    cfg: TrainConfig
    model: RNNLM
    vocab: Vocab
    format: str
    device: torch.device
    corpus: Corpus | None = None

    def evaluate(self, split: str = "test", batch_size: int | None = None,
                 recurrence: Any = None, block_size: int | None = None) -> tuple[float, int]:
        """Mean token cross entropy and tokens scored on ``split`` (cut as in training);
        ``recurrence`` (``RecurrenceSettings``) with ``block_size`` evaluates with the exact
        parallel recurrence."""
        if self.corpus is None:
            raise ConfigError("this run was loaded without its corpus")
        data = self.corpus.split(split)
        data = data[: self.cfg.train_tokens if split == "train" else self.cfg.eval_tokens]
        return evaluate(self.model, data.to(self.device), batch_size or self.cfg.eval_batch_size,
                        recurrence=recurrence, block_size=block_size)

    @torch.no_grad()
    def generate(self, ntokens: int, temperature: float = 1.0, seed: int = 0) -> str:
        """Sample ``ntokens`` tokens from the zero state and return them as text."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        state = self.model.init_state(1)
        eos = self.vocab.stoi.get("<eos>")
        x = torch.tensor([[eos if eos is not None else 0]], device=self.device)
        out = []
        for _ in range(ntokens):
            logits, state = self.model(x, state)
            probs = torch.softmax(logits[-1, 0].double().cpu() / temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(nxt)
            x.fill_(nxt)
        return detokenize(self.vocab.decode(out), self.format)


def load_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    *,
    device: str = "auto",
    data_dir: str | None = None,
    need_data: bool = True,
) -> LoadedRun:
    """Load ``best.pt`` or ``last.pt`` of a run directory (and its corpus when ``need_data``)."""
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json)")
    path = run.best_ckpt if checkpoint == "best" else run.last_ckpt
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {path.name} (did the run finish an epoch?)")
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    dev = resolve_device(device)
    model = RNNLM(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    corpus = None
    vocab = Vocab(decode_strings(ckpt["vocab"]))
    if need_data:
        corpus = load_corpus(cfg.dataset, data_dir or cfg.data_dir, fmt=cfg.format)
        if corpus.vocab != vocab:
            raise ConfigError(f"the corpus found for {run_dir} has a different vocabulary from "
                              "the one the run was trained on; pass --data-dir to the right one")
    return LoadedRun(cfg, model, vocab, ckpt["format"], dev, corpus)
