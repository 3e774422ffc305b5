"""Token files: the corpus tokenized once into flat train.bin / val.bin that training memory-maps, and the batches.

Why it is shaped this way:

* A training step costs a slice of a file, not a tokenizer call, and every rank reads the same bytes.
* The cache is keyed by a fingerprint of (source files, tokenizer, split settings); a second build with the
  same inputs returns at once, a changed input rebuilds. Files are written to temporaries and moved into
  place (files.py), and ``meta.json`` is written last (and removed first on rebuild), so a crash never leaves
  files that look like a valid cache.
* The batch of training step ``k`` is a pure function of ``(seed, k, row)``: resuming at step ``k`` sees the
  same data as a straight run, and a global batch is the same whatever the number of ranks sharing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ...files import atomic_write, finish, temp_path
from .readers import DataError, PathLike, as_list, iter_documents, sources_fingerprint
from .tokenizer import EOS_NAMES, TOKENIZER_FILE, encode_batch, special_token_ids

META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1

# Documents are tokenized in chunks so encode_batch can use all cores while memory stays bounded.
_ENCODE_CHUNK_DOCS = 256
_ENCODE_CHUNK_CHARS = 4_000_000
# Domain tags keep the split hash and the window hash independent even for equal (seed, index) pairs.
_SPLIT_DOMAIN = 0x5B17
_WINDOW_DOMAIN = 0x3A11


# ----------------------------------------------------------------------------------------------------
# Counter-based hashing (splitmix64): pure functions of their keys, so no RNG state is saved or replayed.
# ----------------------------------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(keys: Sequence[int], last: np.ndarray) -> np.ndarray:
    """A 64-bit hash of (keys..., each element of ``last``), vectorized over ``last``."""
    with np.errstate(over="ignore"):  # the wrap-around of uint64 arithmetic is the point
        h = np.zeros(1, dtype=np.uint64)
        for k in keys:
            h = _mix(h ^ np.uint64(k & 0xFFFFFFFFFFFFFFFF))
        return _mix(h ^ last.astype(np.uint64))


def _unit_interval(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ----------------------------------------------------------------------------------------------------
# Token files
# ----------------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32: half the file for small vocabularies."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _memmap(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    size = path.stat().st_size if path.is_file() else -1
    if size != n_tokens * dtype.itemsize:
        raise DataError(f"{path}: {size} bytes, expected {n_tokens} tokens of {dtype} ({META_FILE} is stale?)")
    if n_tokens == 0:
        return np.empty(0, dtype=dtype)  # mmap of an empty file is an error
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


@dataclass(frozen=True, eq=False)  # arrays have no truth value to compare by
class TokenDataset:
    """Read-only view of a built token folder: ``train`` / ``val`` are memory-mapped 1-D token arrays."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]

    @classmethod
    def open(cls, directory: PathLike) -> TokenDataset:
        """Open a folder written by build_token_dataset (e.g. on ranks other than the one that built it)."""
        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{d} is not a built token folder (no {META_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        arrays = {s: _memmap(d / f"{s}.bin", dtype, meta["n_tokens"][s]) for s in SPLITS}
        return cls(directory=d, train=arrays["train"], val=arrays["val"], meta=meta)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.train if name == "train" else self.val

    def _windows(self, split: str, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.split(split)
        idx = starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
        window = torch.from_numpy(np.array(tokens[idx], dtype=np.int64))  # a plain, writable copy
        return window[:, :-1], window[:, 1:]

    def _n_starts(self, split: str, seq_len: int) -> int:
        n = len(self.split(split))
        if seq_len < 1 or n < seq_len + 1:
            raise DataError(f"the {split} split has {n} tokens; a window of seq_len={seq_len} needs {seq_len + 1}")
        return n - seq_len

    def batch_for_step(
        self,
        step: int,
        global_batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch of ``step``: rows [rank*b, (rank+1)*b), b = global/world.

        Row ``i`` of step ``k`` starts at hash(seed, k, i) mod (n - seq_len): a pure function, so resuming at
        step k, or changing ``world``, yields exactly the same global batch (windows drawn with replacement).
        """
        if world < 1 or not 0 <= rank < world or global_batch_size % world:
            raise DataError(f"global_batch_size={global_batch_size} cannot be split over rank {rank} of {world}")
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        n_starts = self._n_starts(split, seq_len)
        per_rank = global_batch_size // world
        rows = np.arange(rank * per_rank, (rank + 1) * per_rank, dtype=np.uint64)
        starts = _hash((_WINDOW_DOMAIN, seed, step), rows) % np.uint64(n_starts)
        return self._windows(split, starts, seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping validation windows (starts 0, T, 2T, ...) in order, so every evaluation sees
        the same tokens. Window j belongs to rank j % world; the last batch may be smaller than batch_size."""
        if world < 1 or not 0 <= rank < world or batch_size < 1:
            raise DataError(f"bad val_batches arguments: batch_size={batch_size}, rank={rank}, world={world}")
        n_windows = (len(self.val) - 1) // seq_len if seq_len >= 1 else 0
        if n_windows == 0:
            raise DataError(f"the val split has {len(self.val)} tokens; too few for one window of {seq_len}")
        starts = np.arange(rank, n_windows, world, dtype=np.int64) * seq_len
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._windows("val", starts[i : i + batch_size], seq_len)


def build_token_dataset(
    sources: PathLike | Iterable[PathLike],
    tokenizer: Tokenizer,
    out_dir: PathLike,
    val_fraction: float = 0.01,
    seed: int = 0,
    eos_id: int | None = None,
    max_bytes: int | None = None,
    show_progress: bool = True,
) -> TokenDataset:
    """Tokenize ``sources`` into ``out_dir`` (train.bin, val.bin, meta.json, tokenizer.json), or reuse it.

    Each document is followed by ``eos_id`` (found by name in the tokenizer when None). Document ``i`` goes to
    validation when hash(seed, i) < val_fraction (a per-document coin, so appending documents does not move
    earlier ones); if that leaves one split empty while there are >= 2 documents and val_fraction > 0, the
    last document of the other split moves there, so tiny corpora still get a validation loss.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if eos_id is None:
        eos_id = special_token_ids(tokenizer)[1]
        if eos_id is None:
            raise DataError(f"no EOS token among {EOS_NAMES} in the tokenizer; pass eos_id")
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"eos_id={eos_id} is outside the tokenizer's vocabulary [0, {vocab_size})")
    dtype = token_dtype(vocab_size)
    tok_json = tokenizer.to_str()
    settings = {
        "version": FORMAT_VERSION,
        "sources": sources_fingerprint(sources),
        "tokenizer_sha256": hashlib.sha256(tok_json.encode("utf-8")).hexdigest(),
        "eos_id": eos_id,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_bytes": max_bytes,
        "dtype": dtype.name,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()

    meta_path = out / META_FILE
    if meta_path.is_file():
        try:
            cached = TokenDataset.open(out)
            if cached.fingerprint == fingerprint:
                return cached
        except (ValueError, KeyError, TypeError):  # DataError and JSON errors are ValueErrors
            pass  # unreadable or stale cache: rebuild it below

    out.mkdir(parents=True, exist_ok=True)
    # Remove the marker first: from here until the new meta.json lands, the folder is not a valid cache.
    meta_path.unlink(missing_ok=True)
    counts = _write_token_files(sources, tokenizer, out, dtype, eos_id, val_fraction, seed, max_bytes, show_progress)
    atomic_write(out / TOKENIZER_FILE, tokenizer.to_str(pretty=True).encode("utf-8"))
    bos_id, _ = special_token_ids(tokenizer)
    meta = {
        "format": "dsv2-tokens",
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "bos_id": bos_id,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_bytes": max_bytes,
        "sources": [os.fspath(s) for s in as_list(sources)],
        "n_files": len(settings["sources"]),
        "tokenizer_sha256": settings["tokenizer_sha256"],
        **counts,
    }
    atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return TokenDataset.open(out)


def _write_token_files(
    sources: PathLike | Iterable[PathLike],
    tokenizer: Tokenizer,
    out: Path,
    dtype: np.dtype,
    eos_id: int,
    val_fraction: float,
    seed: int,
    max_bytes: int | None,
    show_progress: bool,
) -> dict[str, dict[str, int]]:
    """Stream the documents into train.bin / val.bin; return {"n_tokens": {...}, "n_documents": {...}}."""
    tmp = {s: temp_path(out, f"{s}.bin") for s in SPLITS}
    n_tokens = dict.fromkeys(SPLITS, 0)
    n_docs = dict.fromkeys(SPLITS, 0)
    last_start = dict.fromkeys(SPLITS, 0)  # token offset of each split's last document, for the fix-up below
    eos = np.array([eos_id], dtype=dtype)
    try:
        files = {s: tmp[s].open("wb") for s in SPLITS}
        try:
            doc_index = 0
            with tqdm(desc="tokenizing", unit="doc", disable=not show_progress) as bar:
                for chunk in _chunks(iter_documents(sources, max_bytes=max_bytes)):
                    indices = np.arange(doc_index, doc_index + len(chunk), dtype=np.uint64)
                    is_val = _unit_interval(_hash((_SPLIT_DOMAIN, seed), indices)) < val_fraction
                    for doc_ids, v in zip(encode_batch(tokenizer, chunk), is_val, strict=True):
                        s = "val" if v else "train"
                        arr = np.concatenate([np.asarray(doc_ids, dtype=dtype), eos])
                        files[s].write(arr.tobytes())
                        last_start[s] = n_tokens[s]
                        n_tokens[s] += len(arr)
                        n_docs[s] += 1
                    doc_index += len(chunk)
                    bar.update(len(chunk))
        finally:
            for f in files.values():
                f.close()
        if val_fraction > 0 and n_docs["train"] + n_docs["val"] >= 2:
            for empty, full in (("val", "train"), ("train", "val")):
                if n_docs[empty] == 0:
                    _move_last_document(tmp[full], tmp[empty], last_start[full] * dtype.itemsize)
                    moved = n_tokens[full] - last_start[full]
                    n_tokens[full] -= moved
                    n_tokens[empty] += moved
                    n_docs[full] -= 1
                    n_docs[empty] += 1
        for s in SPLITS:
            finish(tmp[s], out / f"{s}.bin")
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    return {"n_tokens": n_tokens, "n_documents": n_docs}


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= _ENCODE_CHUNK_DOCS or chars >= _ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _move_last_document(src: Path, dst: Path, offset: int) -> None:
    with src.open("r+b") as f:
        f.seek(offset)
        tail = f.read()
        f.truncate(offset)
    with dst.open("ab") as f:
        f.write(tail)


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------


def unigram_entropy(tokens: np.ndarray | torch.Tensor | Sequence[int]) -> float:
    """Entropy in nats/token of the token frequencies: the loss of the best context-free model, so a trained
    LM has to go below it to have learned anything from context."""
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.size == 0:
        raise DataError("unigram_entropy of an empty token array")
    counts = np.bincount(arr.reshape(-1).astype(np.int64))
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())
