"""Tests of the data pipeline: readers, tokenizer, the token-file cache, samplers and unigram entropy."""

from __future__ import annotations

import json
import math
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv2.tokenizer import TokenizerError
from dsv2.training import data
from dsv2.training.data import (
    DataError,
    TokenDataset,
    build_token_dataset,
    default_corpus_sources,
    iter_documents,
    load_tokenizer,
    resolve_sources,
    save_tokenizer,
    special_token_ids,
    token_files,
    train_tokenizer,
    unigram_entropy,
)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_docs(n: int, words: int = 40) -> list[str]:
    """Distinct, deterministic documents with a repetitive vocabulary (so BPE has merges to learn)."""
    return [f"doc {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_docs(200) + ["héllo wörld ✓ 你好 🙂"], vocab_size=400)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), "utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- readers


def test_text_file_and_folder_rules(tmp_path: Path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "__pycache__").mkdir()
    (root / "b.txt").write_text("bee", "utf-8")
    (root / "a.md").write_text("ay", "utf-8-sig")  # the byte-order mark is not part of the text
    (root / "sub" / "c.py").write_text("print('c')", "utf-8")
    (root / "sub" / "deeper" / "d.rst").write_text("dee", "utf-8")
    (root / "sub" / "skip.csv").write_text("not,picked", "utf-8")  # suffix not taken from folders
    (root / "empty.txt").write_text("  \n", "utf-8")  # blank: skipped
    (root / "bin.txt").write_bytes(b"GIF89a\x00\x01\x02")  # NUL byte: binary, skipped
    (root / "latin1.txt").write_bytes(b"caf\xe9")  # invalid UTF-8: replaced, not an error
    (root / ".hidden" / "h.txt").write_text("hidden", "utf-8")
    (root / "__pycache__" / "x.py").write_text("cached", "utf-8")

    docs = list(iter_documents([root]))
    assert docs == ["ay", "bee", "caf\ufffd", "print('c')", "dee"]  # sorted paths: a, b, bin, empty, latin1, sub/
    assert list(iter_documents(str(root / "b.txt"))) == ["bee"]  # a bare string is one source


def test_glob_and_dedup(tmp_path: Path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name, "utf-8")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "z.txt").write_text("z", "utf-8")
    assert list(iter_documents([str(tmp_path / "x*.txt")])) == ["x1.txt", "x2.txt"]
    assert list(iter_documents([str(tmp_path / "**" / "z.txt")])) == ["z"]
    # A file reached by two sources is read once, at its first appearance.
    files = resolve_sources([tmp_path / "y.txt", str(tmp_path / "*.txt")])
    assert [f.name for f in files] == ["y.txt", "x1.txt", "x2.txt"]


def parquet():
    """pyarrow is optional for dsv2 (only parquet sources need it): skip, not fail, without it."""
    return pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")


def test_jsonl_and_parquet(tmp_path: Path):
    pa, pq = parquet()
    jl = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    with jl.open("a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"text": ""}) + "\n")  # blank line and empty text: skipped
    pq.write_table(pa.table({"text": ["three", None, "four"], "n": [3, 0, 4]}), tmp_path / "b.parquet")
    assert list(iter_documents([tmp_path])) == ["one", "two", "three", "four"]


def test_reader_errors(tmp_path: Path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "no_text.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n', "utf-8")
    (tmp_path / "not_str.jsonl").write_text('{"text": 3}\n', "utf-8")
    (tmp_path / "bad.jsonl").write_text("{oops\n", "utf-8")
    cases = [
        (str(tmp_path / "nothing*.txt"), "matches no files"),
        (tmp_path / "missing.txt", "does not exist"),
        (tmp_path / "empty_dir", "holds no files"),
        (tmp_path / "no_text.jsonl", r"no_text.jsonl:2: .*\"text\""),
        (tmp_path / "not_str.jsonl", "expected a string"),
        (tmp_path / "bad.jsonl", "not valid JSON"),
    ]
    for source, match in cases:
        with pytest.raises(DataError, match=match):
            list(iter_documents([source]))
    with pytest.raises(DataError, match="no data sources"):
        list(iter_documents([]))


def test_parquet_without_text_column(tmp_path: Path):
    pa, pq = parquet()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match='no "text" column'):
        list(iter_documents([tmp_path / "x.parquet"]))


def test_max_bytes_is_a_deterministic_prefix(tmp_path: Path):
    (tmp_path / "a.txt").write_text("abc", "utf-8")
    (tmp_path / "b.txt").write_text("déf", "utf-8")  # é is 2 bytes
    assert list(iter_documents([tmp_path], max_bytes=5)) == ["abc", "d"]  # a cut never splits a character
    assert list(iter_documents([tmp_path], max_bytes=4)) == ["abc", "d"]
    assert list(iter_documents([tmp_path], max_bytes=3)) == ["abc"]
    assert list(iter_documents([tmp_path], max_bytes=0)) == []


def test_stdlib_corpus():
    files = default_corpus_sources()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not any({"site-packages", "test", "tests", "__pycache__"} & set(f.relative_to(root).parts) for f in files)
    assert any(f.name == "argparse.py" for f in files)
    docs = list(iter_documents(["stdlib"], max_bytes=100_000))
    assert sum(len(d.encode()) for d in docs) == 100_000
    assert docs == list(iter_documents(["stdlib"], max_bytes=100_000))
    tok = train_tokenizer(docs, vocab_size=512)
    text = docs[0][:2000]
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(text).ids) < 0.6 * len(text.encode())  # BPE learnt common pieces of Python


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["def f(x):\n    return x + 1\n", "  leading spaces", "héllo wörld ✓ 你好 🙂 \t\r\n"])
def test_tokenizer_round_trip(tokenizer, text: str):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert 0 not in ids and 1 not in ids  # special tokens never appear from plain text


def test_tokenizer_specials_save_load(tokenizer, tmp_path: Path):
    assert tokenizer.get_vocab_size() <= 400
    assert [tokenizer.token_to_id(t) for t in data.DEFAULT_SPECIAL_TOKENS] == [0, 1, 2]
    assert special_token_ids(tokenizer) == (0, 1)
    path = save_tokenizer(tokenizer, tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for where in (path, path.parent):
        loaded = load_tokenizer(where)
        assert loaded.encode("héllo beta").ids == tokenizer.encode("héllo beta").ids
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)


def test_special_ids_by_other_names_and_fallback():
    ds = train_tokenizer(["a b c"], 300, special_tokens=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"))
    assert special_token_ids(ds) == (0, 1)
    llama = train_tokenizer(["a b c"], 300, special_tokens=("<unk>", "<s>", "</s>"))
    assert special_token_ids(llama) == (1, 2)
    bare = train_tokenizer(["a b c"], 300, special_tokens=())
    assert special_token_ids(bare) == (None, None)
    assert special_token_ids(bare, bos_id=7, eos_id=8) == (7, 8)


# ---------------------------------------------------------------------------------------------------- token files


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    assert len(tokens) == 0 or tokens[-1] == eos
    out, cur = [], []
    for t in tokens.tolist():
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def test_build_token_dataset(tokenizer, tmp_path: Path):
    docs = make_docs(60)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    ds = build_token_dataset([src], tokenizer, tmp_path / "tok", val_fraction=0.2, seed=1, show_progress=False)

    assert ds.train.dtype == np.uint16 and isinstance(ds.train, np.memmap)
    train_docs, val_docs = split_docs(np.asarray(ds.train), 1), split_docs(np.asarray(ds.val), 1)
    decoded = [tokenizer.decode(d) for d in train_docs + val_docs]
    # Documents are joined with EOS, each lands whole in exactly one split, in corpus order within a split.
    assert sorted(decoded) == sorted(docs)
    train_text = [tokenizer.decode(d) for d in train_docs]
    assert train_text == [d for d in docs if d in set(train_text)]
    assert 3 <= len(val_docs) <= 25

    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["n_tokens"] == {"train": len(ds.train), "val": len(ds.val)}
    assert meta["n_documents"] == {"train": len(train_docs), "val": len(val_docs)}
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 1 and meta["bos_id"] == 0
    assert meta["vocab_size"] == tokenizer.get_vocab_size()
    assert load_tokenizer(tmp_path / "tok").to_str() == tokenizer.to_str()
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.endswith(".tmp")]

    # Same inputs elsewhere: the same split. Another seed: another split.
    again = build_token_dataset([src], tokenizer, tmp_path / "tok2", val_fraction=0.2, seed=1, show_progress=False)
    assert np.array_equal(again.val, ds.val) and np.array_equal(again.train, ds.train)
    other = build_token_dataset([src], tokenizer, tmp_path / "tok3", val_fraction=0.2, seed=2, show_progress=False)
    assert not np.array_equal(other.val, ds.val)
    assert len(other.train) + len(other.val) == len(ds.train) + len(ds.val)


def test_cache_reused_and_rebuilt(tokenizer, tmp_path: Path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    out = tmp_path / "tok"
    calls = []
    real = token_files._write_token_files
    monkeypatch.setattr(token_files, "_write_token_files", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = build_token_dataset([src], tokenizer, out, val_fraction=0.1, show_progress=False)
    mtime = (out / "train.bin").stat().st_mtime_ns
    second = build_token_dataset([src], tokenizer, out, val_fraction=0.1, show_progress=False)
    assert len(calls) == 1 and (out / "train.bin").stat().st_mtime_ns == mtime
    assert second.fingerprint == first.fingerprint
    assert TokenDataset.open(out).fingerprint == first.fingerprint

    build_token_dataset([src], tokenizer, out, val_fraction=0.3, show_progress=False)  # a setting changed
    assert len(calls) == 2
    write_jsonl(src, make_docs(21))  # the corpus changed
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))
    changed = build_token_dataset([src], tokenizer, out, val_fraction=0.3, show_progress=False)
    assert len(calls) == 3 and changed.meta["n_documents"]["train"] + changed.meta["n_documents"]["val"] == 21

    # A truncated data file (e.g. a crash or a copy gone wrong) is detected and rebuilt, never trusted.
    with (out / "train.bin").open("r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="stale"):
        TokenDataset.open(out)
    build_token_dataset([src], tokenizer, out, val_fraction=0.3, show_progress=False)
    assert len(calls) == 4


def test_crash_leaves_no_valid_cache(tokenizer, tmp_path: Path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(10))
    out = tmp_path / "tok"
    build_token_dataset([src], tokenizer, out, val_fraction=0.1, show_progress=False)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(token_files, "encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        build_token_dataset([src], tokenizer, out, val_fraction=0.5, show_progress=False)
    assert not (out / "meta.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_tiny_corpus_still_gets_validation(tokenizer, tmp_path: Path):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(3))
    ds = build_token_dataset([src], tokenizer, tmp_path / "tok", val_fraction=1e-9, show_progress=False)
    assert ds.meta["n_documents"] == {"train": 2, "val": 1}
    assert tokenizer.decode(split_docs(np.asarray(ds.val), 1)[0]) == make_docs(3)[2]
    none = build_token_dataset([src], tokenizer, tmp_path / "tok0", val_fraction=0.0, show_progress=False)
    assert none.meta["n_documents"] == {"train": 3, "val": 0} and len(none.val) == 0


def test_build_argument_errors(tokenizer, tmp_path: Path):
    src = write_jsonl(tmp_path / "docs.jsonl", ["x"])
    with pytest.raises(DataError, match="val_fraction"):
        build_token_dataset([src], tokenizer, tmp_path / "t", val_fraction=1.0)
    with pytest.raises(DataError, match="eos_id"):
        build_token_dataset([src], tokenizer, tmp_path / "t", eos_id=10**6)
    bare = train_tokenizer(["a b"], 300, special_tokens=())
    with pytest.raises(DataError, match="EOS"):
        build_token_dataset([src], bare, tmp_path / "t")


def test_uint32_for_large_vocab():
    assert data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32
    assert data.token_dtype(102400) == np.uint32


# ---------------------------------------------------------------------------------------------------- samplers


def fake_dataset(tmp_path: Path, n_train: int = 1000, n_val: int = 95) -> TokenDataset:
    """A token folder whose tokens are their own positions (mod 65536), so windows are easy to check."""
    for name, n in (("train", n_train), ("val", n_val)):
        np.arange(n, dtype=np.uint16).tofile(tmp_path / f"{name}.bin")
    meta = {
        "fingerprint": "x",
        "dtype": "uint16",
        "vocab_size": 65536,
        "eos_id": 1,
        "n_tokens": {"train": n_train, "val": n_val},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return TokenDataset.open(tmp_path)


def assert_windows(x: torch.Tensor, y: torch.Tensor, seq_len: int, n: int):
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == seq_len
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
    assert torch.equal(x, x[:, :1] + torch.arange(seq_len))  # contiguous windows
    assert int(y.max()) < n


def test_batch_windows_and_split_errors(tmp_path: Path):
    ds = fake_dataset(tmp_path)
    x, y = ds.batch_for_step(0, 8, 16)
    assert_windows(x, y, 16, 1000)
    # The very last token can be a target: a split of seq_len + 1 tokens has exactly one window.
    x, y = ds.batch_for_step(0, 4, 94, split="val")
    assert torch.equal(x[0], torch.arange(94)) and int(y[0, -1]) == 94
    with pytest.raises(DataError, match="needs"):
        ds.batch_for_step(0, 1, 95, split="val")
    with pytest.raises(DataError, match="unknown split"):
        ds.batch_for_step(0, 1, 4, split="test")


def test_batch_for_step_resumable_and_world_independent(tmp_path: Path):
    ds = fake_dataset(tmp_path)
    straight = [ds.batch_for_step(k, 8, 16, seed=3) for k in range(6)]
    for x, y in straight:
        assert_windows(x, y, 16, 1000)
    # Resuming at step 4 (a fresh call, no state carried over) gives the batches of the straight run.
    assert torch.equal(ds.batch_for_step(4, 8, 16, seed=3)[0], straight[4][0])
    assert not torch.equal(straight[0][0], straight[1][0])
    assert not torch.equal(ds.batch_for_step(0, 8, 16, seed=4)[0], straight[0][0])
    for world in (2, 4, 8):
        parts = [ds.batch_for_step(5, 8, 16, seed=3, rank=r, world=world) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), straight[5][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), straight[5][1])
    with pytest.raises(DataError):
        ds.batch_for_step(0, 8, 16, rank=0, world=3)
    with pytest.raises(DataError):
        ds.batch_for_step(0, 8, 16, rank=2, world=2)


def test_val_batches(tmp_path: Path):
    ds = fake_dataset(tmp_path, n_val=95)
    batches = list(ds.val_batches(batch_size=4, seq_len=10))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]  # (95 - 1) // 10 = 9 windows
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x[:, 0], torch.arange(0, 90, 10))
    assert torch.equal(x.reshape(-1), torch.arange(90))
    assert [b[0].tolist() for b in batches] == [b[0].tolist() for b in ds.val_batches(4, 10)]
    assert len(list(ds.val_batches(4, 10, max_batches=2))) == 2
    shards = [torch.cat([b[0] for b in ds.val_batches(4, 10, rank=r, world=2)]) for r in range(2)]
    assert sorted(torch.cat(shards)[:, 0].tolist()) == list(range(0, 90, 10))


def test_end_to_end_sampling_from_built_dataset(tokenizer, tmp_path: Path):
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(40))
    ds = build_token_dataset([src], tokenizer, tmp_path / "tok", val_fraction=0.1, show_progress=False)
    x, y = ds.batch_for_step(0, 4, 32)
    assert x.shape == (4, 32) and int(x.max()) < ds.vocab_size
    assert len(list(ds.val_batches(2, 16))) >= 1


# ---------------------------------------------------------------------------------------------------- entropy


def test_unigram_entropy():
    # counts 2, 1, 1 of 4: H = -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2
    assert unigram_entropy(np.array([5, 5, 7, 9], dtype=np.uint16)) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy(torch.tensor([[3, 3], [3, 3]])) == 0.0
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))
    with pytest.raises(DataError):
        unigram_entropy(np.array([], dtype=np.int64))
