"""Tokenizers: loading any tokenizer.json (a checkpoint's, a run's, DeepSeek-V2's own) and finding its BOS/EOS
tokens by name. Training one is the training data's business (training/data/tokenizer.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names it."""


# Names under which common tokenizers keep their BOS / EOS tokens. The DeepSeek ones use U+FF5C (fullwidth
# vertical bar) and U+2581 (lower one eighth block), exactly as in DeepSeek-V2's tokenizer.json.
BOS_NAMES = (
    "<|bos|>",
    "<｜begin▁of▁sentence｜>",
    "<s>",
    "<|begin_of_text|>",
    "<|startoftext|>",
    "<bos>",
    "[BOS]",
)


EOS_NAMES = ("<|eos|>", "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")


TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` (the file, or a folder holding it, e.g. a DeepSeek checkpoint folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise TokenizerError(f"no tokenizer file at {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"{p} is not a readable tokenizer.json ({reason})") from None


def special_token_ids(
    tokenizer: Tokenizer, bos_id: int | None = None, eos_id: int | None = None
) -> tuple[int | None, int | None]:
    """(bos, eos) ids found under the names in BOS_NAMES / EOS_NAMES; the arguments where none is found."""

    def find(names: Sequence[str], fallback: int | None) -> int | None:
        for name in names:
            i = tokenizer.token_to_id(name)
            if i is not None:
                return i
        return fallback

    return find(BOS_NAMES, bos_id), find(EOS_NAMES, eos_id)
