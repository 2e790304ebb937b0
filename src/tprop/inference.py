"""Using a finished run: load its checkpoint, evaluate a split, sample text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import _VF

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

    @torch.inference_mode()
    def generate(self, ntokens: int, temperature: float = 1.0, seed: int = 0,
                 threads: int | None = None) -> str:
        """Sample ``ntokens`` tokens from the zero state and return them as text.

        One token at a time is batch-1 work, which more CPU threads only slow down (they
        synchronise at every small matrix product): on the CPU it runs on ``threads`` threads,
        one by default, and torch's setting is restored after."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        before = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(threads or 1)
        try:
            out = self._sample(ntokens, temperature, gen)
        finally:
            torch.set_num_threads(before)
        return detokenize(self.vocab.decode(out), self.format)

    def _sample(self, ntokens: int, temperature: float, gen: torch.Generator) -> list[int]:
        step = one_step(self.model)
        state = step.init()
        eos = self.vocab.stoi.get("<eos>")
        tok = eos if eos is not None else 0
        out = []
        for _ in range(ntokens):
            logits, state = step(tok, state)
            probs = torch.softmax(logits.double().cpu() / temperature, -1)
            u = torch.rand(1, generator=gen, dtype=torch.float64)
            tok = min(int(torch.searchsorted(torch.cumsum(probs, 0), u)), probs.numel() - 1)
            out.append(tok)
        return out


class one_step:  # noqa: N801 - used like a function
    """One token through the model: ``(token id, state) -> (logits (V,), state)``.

    torch's fused ``nn.LSTM``/``nn.GRU``/``nn.RNN`` pay a set-up per call that dwarfs one step
    at batch 1; their single-step cells (``lstm_cell`` …) on each layer's weights compute the
    same step without it. Other recurrent modules run through the model itself."""

    def __init__(self, model: RNNLM) -> None:
        self.model = model
        rnn = model.rnn
        self.cell = ({"LSTM": _VF.lstm_cell, "GRU": _VF.gru_cell, "RNN_TANH": _VF.rnn_tanh_cell}
                     .get(getattr(rnn, "mode", ""))) if isinstance(rnn, nn.RNNBase) else None
        if self.cell is not None:
            self.weights = [[getattr(rnn, f"{n}_l{layer}") for n in
                             ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                            for layer in range(rnn.num_layers)]

    def init(self) -> Any:
        state = self.model.init_state(1)
        if self.cell is None:
            return state
        if isinstance(state, tuple):  # per layer (h, c) of shape (1, H)
            return [(h, c) for h, c in zip(state[0], state[1])]
        return list(state)

    def __call__(self, token: int, state: Any) -> tuple[torch.Tensor, Any]:
        model = self.model
        x = model.encoder.weight[token].unsqueeze(0)
        if self.cell is None:
            logits, state = model(torch.tensor([[token]], device=x.device), state)
            return logits[0, 0], state
        new = []
        for weights, s in zip(self.weights, state):
            s = self.cell(x, s, *weights)
            x = s[0] if isinstance(s, tuple) else s
            new.append(s)
        return torch.addmv(model.decoder.bias, model.decoder.weight, x[0]), new


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
