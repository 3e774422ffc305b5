"""Tokenizers: loading any tokenizer.json (a checkpoint's, a run's, DeepSeek-V2's own), finding its BOS/EOS tokens by
name, and the tokenizer files a checkpoint carries for the ecosystem (copy_tokenizer). Training one is the training
data's business (training/data/tokenizer.py)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from .files import atomic_write


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
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")


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


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int, bos_id: int | None = None,
                     eos_id: int | None = None) -> dict:
    """tokenizer_config.json for a tokenizer.json, as transformers' AutoTokenizer (and lm-eval's `hf` model, vLLM,
    llama.cpp's converter) read it: the fast-tokenizer class, the BOS/EOS/pad tokens (pad: a pad token, else EOS)
    and the context. Without it AutoTokenizer finds no special tokens and no model_max_length."""
    bos, eos = special_token_ids(tokenizer, bos_id, eos_id)
    pad = next((i for i in map(tokenizer.token_to_id, PAD_NAMES) if i is not None), eos)

    def name(i: int | None) -> str | None:
        return None if i is None else tokenizer.id_to_token(i)

    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(bos), "eos_token": name(eos),
            "pad_token": name(pad), "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike, model_max_length: int,
                   bos_id: int | None = None, eos_id: int | None = None) -> None:
    """Give checkpoint folder dst the tokenizer.json at src (a file or a folder) and a tokenizer_config.json: src's
    own where it has one (a released checkpoint's, with its chat template), else tokenizer_config() of it. Each file
    is written whole (dsv2.files.atomic_write)."""
    src, dst = Path(src), Path(dst)
    tok_file = src / TOKENIZER_FILE if src.is_dir() else src
    atomic_write(dst / TOKENIZER_FILE, tok_file.read_bytes())
    own = tok_file.parent / TOKENIZER_CONFIG_FILE
    if own.is_file():
        atomic_write(dst / TOKENIZER_CONFIG_FILE, own.read_bytes())
        return
    try:
        cfg = tokenizer_config(load_tokenizer(tok_file), model_max_length, bos_id, eos_id)
    except TokenizerError as e:  # copied as it is; nothing to describe it with
        warnings.warn(f"{e}: {dst} gets no {TOKENIZER_CONFIG_FILE}", stacklevel=2)
        return
    atomic_write(dst / TOKENIZER_CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
