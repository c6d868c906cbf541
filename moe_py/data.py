"""Byte-level corpora with a label per byte, and deterministic padded batches.

Built-in corpora need no download:
- "python": the Python standard library's own .py files, found on the running
  interpreter; each byte is labelled with the category of the Python token it
  belongs to (from `tokenize`), for specialisation analysis.
- "synthetic": several generated "languages" with different statistics,
  labelled by domain.
Users' own text files or folders are labelled by byte class (lower, upper, digit, space, ...).
"""
from __future__ import annotations

import builtins
import hashlib
import io
import keyword
import os
import sysconfig
import tokenize
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .config import IGNORE_INDEX

PYTHON_LABELS = ["keyword", "identifier", "builtin", "operator", "number", "string", "comment",
                 "whitespace", "newline", "other"]
_L = {name: i for i, name in enumerate(PYTHON_LABELS)}
_BUILTINS = frozenset(dir(builtins))
_SOFT_KEYWORDS = frozenset(getattr(keyword, "softkwlist", ()))


@dataclass(frozen=True)
class Document:
    tokens: np.ndarray  # uint8 [L] the bytes
    labels: np.ndarray  # int16 [L] a label id per byte
    name: str


@dataclass
class Corpus:
    name: str
    label_names: List[str]
    train: List[Document]
    val: List[Document]

    def describe(self) -> str:
        n_tr = sum(len(d.tokens) for d in self.train)
        n_va = sum(len(d.tokens) for d in self.val)
        return f"{self.name}: {len(self.train)}+{len(self.val)} documents, {n_tr:,}+{n_va:,} bytes (train+val)"


def _stable_fraction(key: str) -> float:
    """A hash of key in [0, 1) that is the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def source_name(doc_name: str) -> str:
    """The file a document came from: pieces of one file ("file#offset") share it; pieces of
    a single text file cut for its own split ("file@i") do not."""
    return doc_name.split("#")[0]


def _split(docs: List[Document], val_fraction: float, split_seed: int) -> Tuple[List[Document], List[Document]]:
    """Train/validation by a stable hash of (split_seed, file): the split depends on the
    corpus and split_seed only, never on the training seed, so every seed and every arm of
    a comparison is evaluated on the same held-out files."""
    train: List[Document] = []
    val: List[Document] = []
    for d in docs:  # pieces of one file stay on the same side (no leakage between them)
        (val if _stable_fraction(f"{split_seed}:{source_name(d.name)}") < val_fraction else train).append(d)
    if not val and len(train) > 1:  # always keep some data on both sides
        val.append(train.pop())
    if not train and len(val) > 1:
        train.append(val.pop(0))
    if not train or not val:
        raise ValueError(f"corpus: {len(docs)} document(s) of {sum(len(d.tokens) for d in docs)} bytes "
                         "are too few for a training and a validation split; give more text")
    return train, val


# ---- Python source --------------------------------------------------------------

def _token_label(tok: tokenize.TokenInfo) -> Optional[int]:
    t = tok.type
    if t == tokenize.NAME:
        if keyword.iskeyword(tok.string) or tok.string in _SOFT_KEYWORDS:
            return _L["keyword"]
        return _L["builtin"] if tok.string in _BUILTINS else _L["identifier"]
    if t == tokenize.OP:
        return _L["operator"]
    if t == tokenize.NUMBER:
        return _L["number"]
    if t == tokenize.STRING or t in _FSTRING_TYPES:
        return _L["string"]
    if t == tokenize.COMMENT:
        return _L["comment"]
    if t in (tokenize.NEWLINE, tokenize.NL):
        return _L["newline"]
    if t in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.ENCODING):
        return None  # whitespace already, or no bytes at all
    return _L["other"]


_FSTRING_TYPES = tuple(getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                       if hasattr(tokenize, n))


def label_python_source(text: str) -> Tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of `text` and a label per byte (PYTHON_LABELS). Bytes between
    tokens (spaces, indentation) are "whitespace". Raises tokenize.TokenError or
    SyntaxError for source that does not tokenize."""
    data = text.encode("utf-8")
    lines = text.splitlines(keepends=True)
    # byte offset of each line start; tokenize counts columns in characters
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln.encode("utf-8")))

    def offset(row: int, col: int) -> int:
        if row - 1 >= len(lines):
            return len(data)
        return starts[row - 1] + len(lines[row - 1][:col].encode("utf-8"))

    labels = np.full(len(data), _L["whitespace"], dtype=np.int16)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        lab = _token_label(tok)
        if lab is None:
            continue
        a, b = offset(*tok.start), offset(*tok.end)
        labels[a:b] = lab
    # a NEWLINE token spans "\n" only; keep "\r" with it
    tokens = np.frombuffer(data, dtype=np.uint8).copy()
    return tokens, labels


def _stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    out: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: os.path.relpath(p, root))


# Bytes kept of one source file: the stdlib has files of up to 750 KB (median 6.5 KB), and
# whole files made two of them 57 % of a 20-file validation split. At 16 KiB a file is at
# most ~8 % of the default corpus's ~200 KB of validation bytes.
MAX_FILE_BYTES = 16 * 1024


def _top_level_pieces(tokens: np.ndarray, labels: np.ndarray, name: str,
                      max_bytes: int = MAX_FILE_BYTES) -> List[Document]:
    """A file cut before each top-level `def`, `class` or decorator: documents of
    very different lengths, as real code has (so short ones give padded rows). Only the
    file's first max_bytes are kept, cut at a piece boundary (a first piece longer than
    that is truncated)."""
    data = tokens.tobytes()
    cuts = [0]
    for marker in (b"\ndef ", b"\nclass ", b"\n@", b"\nasync def "):
        i = data.find(marker)
        while i >= 0:
            cuts.append(i + 1)
            i = data.find(marker, i + 1)
    cuts = sorted(set(cuts)) + [len(data)]
    cuts = [c for c in cuts if c <= max_bytes]
    if len(cuts) == 1:  # one first piece longer than max_bytes: truncated
        cuts.append(max_bytes)
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b - a >= 2:
            # "#" is not used in stdlib file names; the split below keys on the file
            out.append(Document(tokens[a:b], labels[a:b], f"{name}#{a}"))
    return out


def python_source_corpus(max_bytes: int = 4_000_000, val_fraction: float = 0.1, split_seed: int = 0) -> Corpus:
    """The standard library's .py files of the running interpreter, in a fixed
    order (shuffled by a stable hash so that max_bytes takes a mix of packages),
    at most MAX_FILE_BYTES of each, until max_bytes. Split into train/val by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = _stdlib_files()
    if not files:
        raise FileNotFoundError(f"python corpus: no .py files found under {root}")
    files.sort(key=lambda p: _stable_fraction("order:" + os.path.relpath(p, root)))
    docs, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            tokens, labels = label_python_source(text)
        except (UnicodeDecodeError, SyntaxError, tokenize.TokenError, OSError, IndentationError):
            continue
        if len(tokens) < 2:
            continue
        pieces = _top_level_pieces(tokens, labels, os.path.relpath(path, root))
        docs.extend(pieces)
        total += sum(len(d.tokens) for d in pieces)
    train, val = _split(docs, val_fraction, split_seed)
    return Corpus("python", list(PYTHON_LABELS), train, val)


# ---- synthetic languages -------------------------------------------------------------

SYNTHETIC_DOMAINS = ["arithmetic", "brackets", "records", "zipf"]


def _arithmetic(rng: np.random.Generator) -> str:
    lines = []
    for _ in range(int(rng.integers(2, 12))):
        a, b, c = (int(v) for v in rng.integers(0, 100, 3))
        op1, op2 = rng.choice(["+", "-", "*"], 2)
        value = eval(f"{a}{op1}{b}{op2}{c}")  # digits and operators only, made here
        lines.append(f"{a}{op1}{b}{op2}{c}={value}\n")
    return "".join(lines)


def _brackets(rng: np.random.Generator) -> str:
    pairs = ["()", "[]", "{}"]
    out: List[str] = []
    stack: List[str] = []
    for _ in range(int(rng.integers(20, 200))):
        if stack and (rng.random() < 0.45 or len(stack) > 12):
            out.append(stack.pop())
        else:
            p = pairs[int(rng.integers(3))]
            out.append(p[0])
            stack.append(p[1])
    out.extend(reversed(stack))
    return "".join(out) + "\n"


_KEYS = ["name", "id", "city", "age", "color", "size", "tag", "owner"]
_VALUES = ["red", "blue", "oslo", "lima", "kyiv", "alpha", "beta", "gamma", "small", "large"]


def _records(rng: np.random.Generator) -> str:
    lines = []
    for _ in range(int(rng.integers(2, 10))):
        keys = rng.choice(_KEYS, int(rng.integers(2, 5)), replace=False)
        fields = [f"{k}={int(rng.integers(0, 999)) if k in ('id', 'age', 'size') else rng.choice(_VALUES)}"
                  for k in keys]
        lines.append(";".join(fields) + ";\n")
    return "".join(lines)


def _zipf_vocab(seed: int) -> List[str]:
    rng = np.random.default_rng([seed, 77])
    letters = np.array(list("etaoinshrdlucmfwyp"))
    return ["".join(rng.choice(letters, int(rng.integers(1, 8)))) for _ in range(400)]


def _zipf(rng: np.random.Generator, vocab: List[str]) -> str:
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    words = rng.choice(len(vocab), int(rng.integers(10, 120)), p=p)
    return " ".join(vocab[w] for w in words) + ".\n"


def synthetic_corpus(n_docs: int = 2000, split_seed: int = 0, val_fraction: float = 0.1) -> Corpus:
    """n_docs documents, each of one domain (SYNTHETIC_DOMAINS, round robin), every
    byte labelled with its document's domain; lengths vary so batches get padding. The
    domains share bytes (digits, letters, "=", newlines), so the label is not a function
    of the byte: I(byte; domain) < H(domain). split_seed draws the documents and the split."""
    if n_docs < 2:
        raise ValueError(f"n_docs: expected at least 2, got {n_docs}")
    rng = np.random.default_rng([split_seed, 1])
    vocab = _zipf_vocab(split_seed)
    makers = [_arithmetic, _brackets, _records, lambda r: _zipf(r, vocab)]
    docs = []
    for i in range(n_docs):
        d = i % len(makers)
        text = makers[d](rng).encode("ascii")
        docs.append(Document(np.frombuffer(text, np.uint8).copy(), np.full(len(text), d, np.int16),
                             f"{SYNTHETIC_DOMAINS[d]}/{i}"))
    train, val = _split(docs, val_fraction, split_seed)
    return Corpus("synthetic", list(SYNTHETIC_DOMAINS), train, val)


# ---- users' files ------------------------------------------------------------------

# Labels for text that carries no token categories: a fixed class per byte, so that the
# expert-label analysis of prose is meaningful (UTF-8 continuation and lead bytes: "other").
BYTE_CLASSES = ("lower", "upper", "digit", "space", "newline", "punctuation", "other/UTF-8")


def byte_class_labels(tokens: np.ndarray) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.uint8)
    out = np.full(t.shape, 6, np.int16)
    out[(t >= ord("a")) & (t <= ord("z"))] = 0
    out[(t >= ord("A")) & (t <= ord("Z"))] = 1
    out[(t >= ord("0")) & (t <= ord("9"))] = 2
    out[(t == ord(" ")) | (t == ord("\t"))] = 3
    out[(t == ord("\n")) | (t == ord("\r"))] = 4
    punct = np.frombuffer(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", np.uint8)
    out[np.isin(t, punct)] = 5
    return out


def text_corpus(paths: Sequence[str], val_fraction: float = 0.1, split_seed: int = 0) -> Corpus:
    """Files, or folders searched recursively; every byte labelled by its class (BYTE_CLASSES).
    Only regular files are read; files that are not valid UTF-8 text are skipped; a missing
    path raises."""
    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                # only regular files: opening a named pipe or a device would block or never end
                files.extend(path for path in (os.path.join(dirpath, f) for f in sorted(filenames)
                                               if not f.startswith("."))
                             if os.path.isfile(path))
        elif os.path.isfile(p):
            files.append(p)
        elif os.path.exists(p):
            raise ValueError(f"corpus: not a regular file or a folder: {p}")
        else:
            raise FileNotFoundError(f"corpus: no such file or folder: {p}")
    docs = []
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(data) >= 2:
            tokens = np.frombuffer(data, np.uint8).copy()
            docs.append(Document(tokens, byte_class_labels(tokens), path))
    if not docs:
        raise ValueError(f"corpus: no readable UTF-8 text files in {list(paths)}")
    if len(docs) == 1:  # one file: split it into pieces so that validation has data
        d = docs[0]
        pieces = max(2, min(50, len(d.tokens) // 4096))
        bounds = np.linspace(0, len(d.tokens), pieces + 1).astype(int)
        docs = [Document(d.tokens[a:b], d.labels[a:b], f"{d.name}@{i}")  # split apart, unlike "#"
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b - a >= 2]
    train, val = _split(docs, val_fraction, split_seed)
    return Corpus("text", list(BYTE_CLASSES), train, val)


def load_corpus(name_or_path: str, split_seed: int = 0, max_bytes: int = 4_000_000, **kw) -> Corpus:
    """"python" | "synthetic" | a file or folder (comma-separated for several). split_seed
    fixes the train/validation split (and the synthetic corpus's documents)."""
    if name_or_path == "python":
        return python_source_corpus(max_bytes=max_bytes, split_seed=split_seed, **kw)
    if name_or_path == "synthetic":
        return synthetic_corpus(split_seed=split_seed, **kw)
    return text_corpus([p for p in name_or_path.split(",") if p], split_seed=split_seed, **kw)


# ---- batches -------------------------------------------------------------------------

@dataclass
class Batch:
    inputs: np.ndarray  # int64 [B, S]; 0 at padding
    targets: np.ndarray  # int64 [B, S]; the next byte, IGNORE_INDEX where there is none
    mask: np.ndarray  # bool [B, S]; True = real input byte
    labels: np.ndarray  # int64 [B, S]; label of each input byte, -1 at padding


def _fill(windows: List[Tuple[Document, int, int]], B: int, S: int) -> Batch:
    inputs = np.zeros((B, S), np.int64)
    targets = np.full((B, S), IGNORE_INDEX, np.int64)
    mask = np.zeros((B, S), bool)
    labels = np.full((B, S), -1, np.int64)
    for row, (doc, a, b) in enumerate(windows):
        w = doc.tokens[a:b]  # up to S + 1 bytes
        n = min(S, len(w))
        inputs[row, :n] = w[:n]
        mask[row, :n] = True
        labels[row, :n] = doc.labels[a:a + n]
        if len(w) > 1:
            targets[row, :len(w) - 1] = w[1:]
    return Batch(inputs, targets, mask, labels)


class BatchSampler:
    """Batches of B windows of up to seq_len + 1 bytes (inputs, then targets shifted
    by one). `batch(step)` is a pure function of (seed, step), so a resumed run sees
    exactly the batches an uninterrupted one would. Documents are drawn with
    probability proportional to their length and a start uniformly among their
    bytes; a window that runs past the document's end is padded (documents are
    never packed together)."""

    def __init__(self, docs: List[Document], batch_size: int, seq_len: int, seed: int):
        if not docs:
            raise ValueError("docs: expected at least one document")
        self.docs, self.B, self.S, self.seed = docs, batch_size, seq_len, seed
        lengths = np.array([len(d.tokens) for d in docs], dtype=np.float64)
        self.p = lengths / lengths.sum()

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, 7919, step])
        picks = rng.choice(len(self.docs), size=self.B, p=self.p)
        windows = []
        for i in picks:
            doc = self.docs[int(i)]
            L = len(doc.tokens)
            # any start with a next byte: every byte is equally likely to be read,
            # and windows running past a document's end are padded
            start = int(rng.integers(0, L - 1))
            windows.append((doc, start, min(L, start + self.S + 1)))
        return _fill(windows, self.B, self.S)

    def eval_windows(self, max_batches: Optional[int] = None) -> List[Tuple[Document, int, int]]:
        """The held-out sample: non-overlapping windows tiling every document, and, when
        max_batches caps them, a systematic sample of max_batches * B of those windows
        spread evenly over the whole split in document order (so every file contributes
        in proportion to its length), from an offset fixed by the seed."""
        tiles = [(doc, a, min(len(doc.tokens), a + self.S + 1))
                 for doc in self.docs for a in range(0, max(1, len(doc.tokens) - 1), self.S)]
        if max_batches is None or max_batches * self.B >= len(tiles):
            return tiles
        n = max_batches * self.B
        u = np.random.default_rng([self.seed, 104729]).random()
        picks = np.floor((np.arange(n) + u) * len(tiles) / n).astype(np.int64)
        return [tiles[int(i)] for i in picks]

    def iter_eval(self, max_batches: Optional[int] = None) -> Iterator[Batch]:
        """The held-out sample of eval_windows() in batches of B (no randomness beyond the
        seed's fixed offset): validation loss and analysis read the same windows."""
        windows = self.eval_windows(max_batches)
        for i in range(0, len(windows), self.B):
            chunk = windows[i:i + self.B]
            yield _fill(chunk, len(chunk), self.S)


def label_mix(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Share of each label among the labelled bytes (labels >= 0)."""
    lab = np.asarray(labels).reshape(-1)
    counts = np.bincount(lab[lab >= 0], minlength=n_labels).astype(np.float64)
    return counts / max(1.0, counts.sum())


# A validation split where one file holds more than this share of the bytes measures
# that file more than the corpus: corpus_summary says so.
MAX_VAL_FILE_SHARE = 0.10


def largest_file_share(docs: Sequence[Document]) -> Tuple[str, float]:
    """The file holding the most bytes of docs, and its share of them."""
    sizes: dict = {}
    for d in docs:
        sizes[source_name(d.name)] = sizes.get(source_name(d.name), 0) + len(d.tokens)
    if not sizes:
        return "", 0.0
    name = max(sorted(sizes), key=lambda k: sizes[k])
    return name, sizes[name] / sum(sizes.values())


def corpus_summary(corpus: Corpus, sampler: BatchSampler, max_batches: Optional[int]) -> str:
    """Files, bytes, the train/val split, its largest file's share (with a warning above
    MAX_VAL_FILE_SHARE) and the label mix of the evaluated sample."""
    def files(docs):
        return len({d.name.split("#")[0].split("@")[0] for d in docs})

    def nbytes(docs):
        return sum(len(d.tokens) for d in docs)
    windows = sampler.eval_windows(max_batches)
    sample = (np.concatenate([doc.labels[a:a + min(sampler.S, b - a)] for doc, a, b in windows])
              if windows else np.zeros(0, np.int64))
    mix = label_mix(sample, len(corpus.label_names))
    split = label_mix(np.concatenate([d.labels for d in corpus.val]), len(corpus.label_names))
    order = np.argsort(-mix, kind="stable")[:6]
    top = ", ".join(f"{corpus.label_names[i]} {100 * mix[i]:.0f}% (split {100 * split[i]:.0f}%)"
                    for i in order if mix[i] > 0)
    big, share = largest_file_share(corpus.val)
    warn = (f"\nWARNING: {big} is {100 * share:.0f} % of the validation bytes (over "
            f"{100 * MAX_VAL_FILE_SHARE:.0f} %): the validation loss measures that file more than "
            "the corpus; give more or smaller files") if share > MAX_VAL_FILE_SHARE else ""
    return (f"corpus {corpus.name}: train {files(corpus.train)} files, {nbytes(corpus.train):,} bytes; "
            f"val {files(corpus.val)} files, {nbytes(corpus.val):,} bytes (largest file "
            f"{100 * share:.1f} %); evaluated sample {len(windows)} windows from "
            f"{files([w[0] for w in windows])} files; label mix: {top}{warn}")
