"""Corpora loaded once per (name, split seed, bytes) and shared: every entry and every seed
trains and is analysed on the same corpus and split, and loading the python corpus takes
about a second."""
from __future__ import annotations

from typing import Dict, Tuple

from ..data import Corpus
from ..train import TrainConfig, corpus_of


class Corpora:
    def __init__(self) -> None:
        self._loaded: Dict[Tuple[str, int, int], Corpus] = {}

    def get(self, train_cfg: TrainConfig) -> Corpus:
        key = (train_cfg.corpus, train_cfg.split_seed, train_cfg.corpus_bytes)
        if key not in self._loaded:
            self._loaded[key] = corpus_of(train_cfg)
        return self._loaded[key]
