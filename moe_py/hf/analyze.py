"""`python -m moe_py analyze-hf MODEL_DIR --corpus PATH --out DIR`: the routing analysis of
`analyze` (analysis.json with the same keys, and the same routing plots) for a local
transformers MoE checkpoint (a save_pretrained folder; nothing is downloaded).

Tokens: the checkpoint's own tokenizer when the folder has one (a fast tokenizer: each token
takes the label of its first byte, through the offsets it reports); otherwise the corpus's
bytes are the token ids, which needs a vocabulary of at least 256 (docs/design.md, "Routing
analysis of Hugging Face models").
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import BatchSampler, Corpus, Document, load_corpus
from ..report import routing_report, write_report
from .routing import collect_routing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SAMPLE_SEED = 0  # the systematic sample's offset (BatchSampler.eval_windows), fixed
INIT_SEED = 0  # torch's seed for the model at initialisation


def _valid_utf8(data: bytes) -> Tuple[int, int]:
    """[a, b): data without the partial UTF-8 characters a cut left at its two ends."""
    a = 0
    while a < len(data) and a < 3 and 0x80 <= data[a] < 0xC0:  # continuation bytes
        a += 1
    for b in range(len(data), max(a, len(data) - 4), -1):
        try:
            data[a:b].decode("utf-8")
            return a, b
        except UnicodeDecodeError:
            continue
    return a, a


def tokenized_documents(docs: Sequence[Document], tokenizer) -> List[Document]:
    """Each document as the tokenizer's ids, every token labelled with the label of its first
    byte (a token without characters, e.g. a special one, is unlabelled: -1)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("model_dir: its tokenizer is not a fast one; labelling tokens by their bytes "
                         "needs the character offsets only a fast tokenizer (tokenizer.json) reports")
    out = []
    for d in docs:
        raw = d.tokens.tobytes()
        a, b = _valid_utf8(raw)
        try:
            text = raw[a:b].decode("utf-8")
        except UnicodeDecodeError:
            continue  # not UTF-8 text at all: nothing a tokenizer reads
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int64)
        if ids.size < 2:
            continue
        # byte offset of each character: the labels are per byte, the offsets per character
        char_bytes = np.array([len(c.encode("utf-8")) for c in text], np.int64)
        byte_at = a + np.concatenate([[0], np.cumsum(char_bytes)])
        starts = np.array([s for s, _ in enc["offset_mapping"]], np.int64)
        ends = np.array([e for _, e in enc["offset_mapping"]], np.int64)
        labels = np.where(ends > starts, d.labels[np.minimum(byte_at[starts], len(raw) - 1)], -1)
        out.append(Document(ids, labels.astype(np.int16), d.name))
    if not out:
        raise ValueError("corpus: no document gave two or more tokens")
    return out


def _tokenizer_of(model_dir: str):
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _load_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model_dir: no such folder: {model_dir}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"model_dir: {model_dir} has no config.json (not a save_pretrained folder)")
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)


def analyze_hf(model_dir: str, corpus_path: str, out_dir: str, batches: Optional[int] = 8,
               seq_len: int = 256, batch_size: int = 8, init: bool = True, plots: bool = True,
               corpus: Optional[Corpus] = None) -> Dict[str, Any]:
    """Route `batches` batches of `batch_size` windows of `seq_len` tokens of the corpus
    (every document of it, train and validation split alike; a systematic sample as
    analyze's, None: all windows) through the checkpoint and write out_dir/analysis.json
    and the plots. init: also route the same tokens through the architecture freshly
    initialised (torch seed INIT_SEED), for the *_at_init keys (False: they are None)."""
    for name, v in (("batches", batches), ("seq_len", seq_len), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    model = _load_model(model_dir)
    tokenizer = _tokenizer_of(model_dir)
    corpus = corpus if corpus is not None else load_corpus(corpus_path)
    docs = sorted(corpus.train + corpus.val, key=lambda d: d.name)
    spell: Callable[[Sequence[int]], Any] = bytes
    if tokenizer is not None:
        docs = tokenized_documents(docs, tokenizer)
        spell = lambda ids: tokenizer.decode(list(ids))  # noqa: E731
    elif model.config.vocab_size < 256:
        raise ValueError(f"model_dir: {model_dir} has no tokenizer and a vocabulary of "
                         f"{model.config.vocab_size} < 256, so its ids cannot be the corpus's bytes")
    sampler = BatchSampler(docs, batch_size, seq_len, SAMPLE_SEED)
    sample = list(sampler.iter_eval(batches))
    ids = [(b.inputs, b.mask) for b in sample]
    routing = collect_routing(model, ids)
    labels = np.concatenate([b.labels.reshape(-1) for b in sample])
    init_routers = None
    if init:
        from transformers import AutoModelForCausalLM
        torch.manual_seed(INIT_SEED)
        fresh = AutoModelForCausalLM.from_config(model.config)
        init_routers = collect_routing(fresh, ids).routers
        del fresh
    os.makedirs(out_dir, exist_ok=True)
    n_bytes = sum(len(d.tokens) for d in corpus.train + corpus.val)
    result: Dict[str, Any] = {
        "run": out_dir, "model": os.path.abspath(model_dir), "step": None, "corpus": corpus.name,
        "corpus_summary": (f"corpus {corpus.name}: {len(docs)} documents, {n_bytes:,} bytes, "
                           f"{sum(len(d.tokens) for d in docs):,} tokens "
                           f"({'the checkpoint tokenizer' if tokenizer is not None else 'bytes as token ids'}); "
                           f"evaluated sample {sum(len(b.inputs) for b in sample)} windows of {seq_len}"),
        "tokenizer": type(tokenizer).__name__ if tokenizer is not None else "bytes",
        "architecture": type(model).__name__, "moe_layers": routing.layer_names,
        "score_functions": routing.score_functions}
    result.update(routing_report(routing.routers, labels, routing.tokens, routing.mask, corpus.label_names,
                                 seq_len, init_routers, spell))
    return write_report(out_dir, result, routing.routers, labels, routing.mask, plots)
