"""Corpus readers: the documents of a run's data sources, in a deterministic order.

Sources accepted by :func:`iter_documents` (one document per text file, per jsonl line, per parquet row):

* a text file (any suffix other than ``.jsonl`` / ``.parquet``): read as UTF-8 with ``errors="replace"``;
  files with a NUL byte in their first 8 KiB are taken as binary and skipped, empty/blank files are skipped;
* a ``.jsonl`` file: the ``"text"`` field of each non-blank line;
* a ``.parquet`` file: the ``"text"`` column (pyarrow, imported only when needed);
* a folder: walked recursively, taking files whose suffix is in :data:`FOLDER_SUFFIXES`; hidden entries
  (name starting with ``.``, e.g. ``.git``, ``.venv``) and ``__pycache__`` are skipped: they are tooling,
  not text;
* a glob pattern (contains ``*``, ``?`` or ``[``; ``**`` recurses): every match, files read by the rules
  above, folders expanded as folders;
* the name ``"stdlib"``: :func:`default_corpus_sources`, the running interpreter's standard library source: it is
  always present, several MB of real text, and needs no network.

Within a source files are taken in sorted path order; sources are taken in the order given; a file reached by
two sources is read once.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

FOLDER_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".parquet")
"""Suffixes a folder source picks up (explicit files and glob matches are taken whatever their suffix)."""


STDLIB_SOURCE = "stdlib"
"""Source name that stands for the built-in corpus (the interpreter's standard library source)."""


STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
)
"""Folders left out of the stdlib corpus: installed third-party packages (they differ between machines) and
the test suites / demo apps (large, repetitive, full of deliberately odd code)."""


_BINARY_PROBE_BYTES = 8192


class DataError(ValueError):
    """A data source or token file that cannot be used; the message names the path and what is wrong."""


PathLike = str | os.PathLike[str]


def default_corpus_sources() -> list[Path]:
    """The ``*.py`` files of the running interpreter's stdlib, sorted, minus STDLIB_EXCLUDED_DIRS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the standard library folder {root} does not exist; pass data sources explicitly")
    files = [
        p for p in _walk(root, lambda name: name in STDLIB_EXCLUDED_DIRS or _is_tooling(name)) if p.suffix == ".py"
    ]
    if not files:
        raise DataError(f"no *.py files under the standard library folder {root}")
    return sorted(files)


def _is_tooling(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _walk(root: Path, prune: Callable[[str], bool]) -> Iterator[Path]:
    # os.walk with in-place pruning: rglob would descend into site-packages first and is ~100x slower there.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not prune(d)]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in _walk(folder, _is_tooling) if p.suffix.lower() in FOLDER_SUFFIXES)


def as_list(sources: PathLike | Iterable[PathLike]) -> list[PathLike]:
    # A bare string is itself iterable (of characters); treat it as one source.
    if isinstance(sources, str | os.PathLike):
        return [sources]
    return list(sources)


def resolve_sources(sources: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand sources (files, folders, globs, "stdlib") into the ordered, de-duplicated files to read."""
    out: list[Path] = []
    seen: set[Path] = set()
    source_list = as_list(sources)
    if not source_list:
        raise DataError("no data sources given")
    for source in source_list:
        text = os.fspath(source)
        if text == STDLIB_SOURCE:
            files = default_corpus_sources()
        elif Path(text).is_dir():
            files = _folder_files(Path(text))
            if not files:
                raise DataError(f"folder {text!r} holds no files ending in {', '.join(FOLDER_SUFFIXES)}")
        elif Path(text).is_file():
            files = [Path(text)]
        elif any(c in text for c in "*?["):
            files = []
            for match in sorted(glob.glob(text, recursive=True)):
                p = Path(match)
                files.extend(_folder_files(p) if p.is_dir() else [p] if p.is_file() else [])
            if not files:
                raise DataError(f"glob pattern {text!r} matches no files")
        else:
            raise DataError(f"data source {text!r} does not exist (expected a file, folder, glob or 'stdlib')")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def _read_text_file(path: Path) -> Iterator[str]:
    data = path.read_bytes()
    if b"\x00" in data[:_BINARY_PROBE_BYTES]:
        return
    # utf-8-sig is UTF-8 that also drops a leading byte-order mark, which is not part of the text.
    text = data.decode("utf-8-sig", errors="replace")
    if text.strip():
        yield text


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f'{path}:{lineno}: the record has no "text" field')
            text = record["text"]
            if not isinstance(text, str):
                raise DataError(f'{path}:{lineno}: "text" is {type(text).__name__}, expected a string')
            if text.strip():
                yield text


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError subclasses for a file it can't read
        raise DataError(f"{path} is not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f'{path}: no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
    for batch in pf.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _read_file(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return _read_text_file(path)


def iter_documents(sources: PathLike | Iterable[PathLike], max_bytes: int | None = None) -> Iterator[str]:
    """Yield the documents of ``sources`` in a deterministic order (see the module docstring for the rules).

    ``max_bytes`` caps the UTF-8 size of all text taken: documents are taken in order until the cap, the
    last one cut at a character boundary, so the same cap always gives the same text.
    """
    files = resolve_sources(sources)
    budget = max_bytes
    found = False
    for path in files:
        for doc in _read_file(path):
            found = True
            if budget is not None:
                raw = doc.encode("utf-8")
                if len(raw) >= budget:
                    tail = raw[:budget].decode("utf-8", errors="ignore")
                    if tail:
                        yield tail
                    return
                budget -= len(raw)
            yield doc
    if not found:
        shown = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DataError(f"no text in the data: {len(files)} file(s), each empty, binary (a NUL byte in its first "
                        f"{_BINARY_PROBE_BYTES} bytes, as in UTF-16) or without text records: {shown}")


def sources_fingerprint(sources: PathLike | Iterable[PathLike]) -> list[list[Any]]:
    """(path, size, mtime_ns) of every file the sources resolve to: changes when any file is added/edited."""
    out = []
    for p in resolve_sources(sources):
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out
