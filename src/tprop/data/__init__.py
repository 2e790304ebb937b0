"""Corpora, vocabularies and the layouts (BPTT columns, TPROP blocks) of token streams."""

from .corpus import (
    EOS,
    FORMATS,
    SPLITS,
    UNK,
    Corpus,
    CorpusError,
    Vocab,
    default_cache_dir,
    detokenize,
    load_corpus_dir,
    tokenize,
)
from .layout import Blocks, StreamColumns
from .registry import CORPORA, CorpusInfo, find_corpus, load_corpus, resolve_corpus

__all__ = [
    "CORPORA", "EOS", "FORMATS", "SPLITS", "UNK", "Blocks", "Corpus", "CorpusError",
    "CorpusInfo", "StreamColumns", "Vocab", "default_cache_dir", "detokenize", "find_corpus",
    "load_corpus", "load_corpus_dir", "resolve_corpus", "tokenize",
]
