"""Corpora and batches: labels line up with bytes, splits and batches are deterministic."""
import os
import subprocess
import sys

import numpy as np
import pytest

from moe_py import data

SOURCE = 'def f(x):  # añadir\n    return x + 42 * len("é")\n'


def label_of(text, tokens, labels, fragment, names=data.PYTHON_LABELS):
    raw = text.encode("utf-8")
    i = raw.index(fragment.encode("utf-8"))
    return {names[l] for l in labels[i:i + len(fragment.encode("utf-8"))]}


def test_python_labels_line_up_with_bytes_including_non_ascii():
    tokens, labels = data.label_python_source(SOURCE)
    assert tokens.tobytes() == SOURCE.encode("utf-8") and len(labels) == len(tokens)
    assert label_of(SOURCE, tokens, labels, "def") == {"keyword"}
    assert label_of(SOURCE, tokens, labels, "return") == {"keyword"}
    assert label_of(SOURCE, tokens, labels, "# añadir") == {"comment"}
    assert label_of(SOURCE, tokens, labels, "42") == {"number"}
    assert label_of(SOURCE, tokens, labels, "len") == {"builtin"}
    assert label_of(SOURCE, tokens, labels, '"é"') == {"string"}  # 4 bytes, quotes included
    assert label_of(SOURCE, tokens, labels, "+") == {"operator"}
    assert label_of(SOURCE, tokens, labels, "    ") == {"whitespace"}
    # after the two-byte "ñ" the offsets still match: ")" closing len(...) is an operator
    assert label_of(SOURCE, tokens, labels, '")') == {"string", "operator"}
    assert data.PYTHON_LABELS[labels[SOURCE.encode().index(b"\n")]] == "newline"


@pytest.fixture(scope="module")
def python_corpus():
    return data.python_source_corpus(max_bytes=200_000)


def test_stdlib_corpus_is_found_split_by_file_and_deterministic(python_corpus):
    c = python_corpus
    assert c.train and c.val
    files = lambda docs: {d.name.split("#")[0] for d in docs}
    assert not files(c.train) & files(c.val)
    for d in c.train[:50]:
        assert len(d.tokens) == len(d.labels)
        assert d.labels.min() >= 0 and d.labels.max() < len(c.label_names)
    again = data.python_source_corpus(max_bytes=200_000)
    assert [d.name for d in again.train] == [d.name for d in c.train]


def test_synthetic_domains_are_well_formed():
    c = data.synthetic_corpus(n_docs=40, split_seed=1)
    docs = c.train + c.val
    assert {int(d.labels[0]) for d in docs} == set(range(len(data.SYNTHETIC_DOMAINS)))
    for d in docs:
        text = d.tokens.tobytes().decode()
        kind = data.SYNTHETIC_DOMAINS[int(d.labels[0])]
        if kind == "arithmetic":
            for line in text.splitlines():
                expr, value = line.split("=")
                assert eval(expr) == int(value)
        elif kind == "brackets":
            stack = []
            for ch in text.strip():
                if ch in "([{":
                    stack.append(")]}"["([{".index(ch)])
                else:
                    assert stack.pop() == ch
            assert not stack


def test_batches_are_deterministic_aligned_and_padded(python_corpus):
    s = data.BatchSampler(python_corpus.train, 16, 64, seed=3)
    a, b, c = s.batch(5), s.batch(5), s.batch(6)
    for f in ("inputs", "targets", "mask", "labels"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.inputs, c.inputs)
    assert a.inputs.dtype == np.int64 and a.mask.dtype == bool and a.inputs.shape == (16, 64)
    # targets are the next input wherever both are real
    both = a.mask[:, 1:] & (a.targets[:, :-1] != -100)
    assert np.array_equal(a.targets[:, :-1][both], a.inputs[:, 1:][both])
    pad = ~a.mask
    assert (a.inputs[pad] == 0).all() and (a.targets[pad] == -100).all() and (a.labels[pad] == -1).all()
    # short documents give padded rows
    short = data.synthetic_corpus(n_docs=30).train
    sb = data.BatchSampler(short, 8, 256, 0).batch(0)
    assert (~sb.mask).any()


def test_eval_iteration_covers_documents_in_order(python_corpus):
    s = data.BatchSampler(python_corpus.val, 4, 32, seed=0)
    batches = list(s.iter_eval())
    assert sum(int(b.mask.sum()) for b in batches) >= sum(len(d.tokens) for d in python_corpus.val) - len(python_corpus.val)
    capped = list(s.iter_eval(max_batches=2))
    assert len(capped) == 2 and [b.inputs.tolist() for b in capped] == \
        [b.inputs.tolist() for b in s.iter_eval(max_batches=2)]  # deterministic


def test_the_evaluated_sample_matches_the_split():
    """The capped sample spreads over the whole validation split: its label mix is the
    split's to within a few points, and it draws from many files, not the first one."""
    corpus = data.python_source_corpus(max_bytes=2_000_000, split_seed=0)
    s = data.BatchSampler(corpus.val, 16, 128, seed=0)
    windows = s.eval_windows(max_batches=8)
    assert len(windows) == 128
    sample = np.concatenate([doc.labels[a:a + min(128, b - a)] for doc, a, b in windows])
    split = np.concatenate([d.labels for d in corpus.val])
    n = len(corpus.label_names)
    diff = np.abs(data.label_mix(sample, n) - data.label_mix(split, n))
    assert diff.max() < 0.05, dict(zip(corpus.label_names, diff.round(3)))
    files = {doc.name.split("#")[0] for doc, _, _ in windows}
    all_files = {d.name.split("#")[0] for d in corpus.val}
    assert len(files) >= 0.5 * min(len(all_files), 128)
    assert "label mix" in data.corpus_summary(corpus, s, 8)


@pytest.mark.parametrize("name", ["python", "synthetic"])
def test_the_split_depends_on_the_split_seed_not_on_the_seed(name, tmp_path):
    """Two runs with different --seed read the same validation files and windows; another
    --split-seed moves them."""
    from moe_py.train import TrainConfig, corpus_of, val_sampler_of
    names = {}
    for seed, split_seed in ((0, 0), (1, 0), (7, 0), (0, 3)):
        tc = TrainConfig(corpus=name, seed=seed, split_seed=split_seed, corpus_bytes=400_000)
        corpus = corpus_of(tc)
        windows = val_sampler_of(corpus, tc).eval_windows(tc.eval_batches)
        names[seed, split_seed] = ([d.name for d in corpus.val], [(w[0].name, w[1]) for w in windows])
    assert names[0, 0] == names[1, 0] == names[7, 0]
    assert names[0, 3][0] != names[0, 0][0]


def test_a_run_made_before_split_seed_keeps_its_split():
    from moe_py.train import TrainConfig
    old = TrainConfig.from_dict({"seed": 4, "steps": 10})
    assert old.split_seed == 4  # its split was made from its seed
    assert TrainConfig.from_dict({"seed": 4, "split_seed": 0}).split_seed == 0


def test_no_file_dominates_the_python_validation_split():
    for split_seed in (0, 1, 2):
        corpus = data.python_source_corpus(max_bytes=2_000_000, split_seed=split_seed)
        name, share = data.largest_file_share(corpus.val)
        assert share <= data.MAX_VAL_FILE_SHARE, (split_seed, name, share)
        assert all(len(d.tokens) <= data.MAX_FILE_BYTES for d in corpus.val + corpus.train)


def test_the_summary_warns_when_one_file_dominates_validation(tmp_path):
    (tmp_path / "zbig.txt").write_text("x" * 50_000)  # sorted last: never the one moved to train
    for i in range(30):
        (tmp_path / f"small{i}.txt").write_text("y" * 300)
    corpus = data.load_corpus(str(tmp_path), val_fraction=0.9999)
    summary = data.corpus_summary(corpus, data.BatchSampler(corpus.val, 4, 32, 0), 2)
    assert "WARNING: " in summary and "of the validation bytes" in summary


def test_text_corpus_from_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# title\nsome text\n" * 40)
    c = data.load_corpus(str(tmp_path))
    assert c.label_names == list(data.BYTE_CLASSES) and len(c.train) + len(c.val) == 2
    single = data.load_corpus(str(tmp_path / "a.txt"))
    assert single.train and single.val
    with pytest.raises(FileNotFoundError, match="no/such"):
        data.load_corpus(str(tmp_path / "no/such"))


def test_a_named_pipe_in_a_corpus_folder_does_not_hang(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 2000)
    os.mkfifo(tmp_path / "pipe.txt")
    code = f"from moe_py.data import load_corpus; c = load_corpus({str(tmp_path)!r}); print(len(c.train))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(ValueError, match="not a regular file"):
        from moe_py.data import load_corpus
        load_corpus(str(tmp_path / "pipe.txt"))
