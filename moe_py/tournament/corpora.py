"""Corpora loaded once per (name, seed, bytes) and shared: every entry of one seed trains
and is analysed on the same corpus, and loading the python corpus takes about a second."""
from __future__ import annotations

from typing import Dict, Tuple

from ..data import Corpus, load_corpus


class Corpora:
    def __init__(self) -> None:
        self._loaded: Dict[Tuple[str, int, int], Corpus] = {}

    def get(self, name: str, seed: int, max_bytes: int) -> Corpus:
        key = (name, seed, max_bytes)
        if key not in self._loaded:
            self._loaded[key] = load_corpus(name, seed=seed, max_bytes=max_bytes)
        return self._loaded[key]
