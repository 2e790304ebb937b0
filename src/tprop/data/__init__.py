"""Corpora, vocabularies and the layouts (BPTT columns, TPROP blocks) of token streams.

The names below load their module on first use (PEP 562), so that torch-free parts such as
``tprop.data.synth`` import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **{name: "corpus" for name in ("EOS", "FORMATS", "SPLITS", "UNK", "Corpus", "CorpusError",
                                   "Vocab", "default_cache_dir", "detokenize",
                                   "load_corpus_dir", "tokenize")},
    **{name: "layout" for name in ("Blocks", "StreamColumns")},
    **{name: "registry" for name in ("CORPORA", "CorpusInfo", "find_corpus", "load_corpus",
                                     "resolve_corpus")},
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
