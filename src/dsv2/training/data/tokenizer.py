"""The byte-level BPE tokenizer a run trains (dsv2.tokenizer loads any tokenizer.json and finds its BOS/EOS)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ...files import atomic_write
from ...tokenizer import BOS_NAMES, EOS_NAMES, TOKENIZER_FILE, load_tokenizer, special_token_ids
from .readers import DataError, PathLike

__all__ = ["BOS_NAMES", "DEFAULT_SPECIAL_TOKENS", "EOS_NAMES", "TOKENIZER_FILE", "encode_batch", "load_tokenizer",
           "save_tokenizer", "special_token_ids", "train_tokenizer"]

DEFAULT_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer; ``special_tokens`` get ids 0, 1, ... in order (bos=0, eos=1 here).

    Byte-level BPE never needs an unknown token: every string is a sequence of its UTF-8 bytes, each of which
    is in the initial alphabet, so ``decode(encode(x)) == x`` for any text. ``vocab_size`` is an upper bound:
    a small corpus may run out of pairs seen ``min_frequency`` times before reaching it.
    """
    floor = len(special_tokens) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < floor:
        raise DataError(f"vocab_size={vocab_size} is below {floor} (256 byte tokens + {len(special_tokens)} special)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def save_tokenizer(tokenizer: Tokenizer, directory: PathLike) -> Path:
    """Write ``directory/tokenizer.json`` atomically and return its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    target = d / TOKENIZER_FILE
    atomic_write(target, tokenizer.to_str(pretty=True).encode("utf-8"))
    return target


def encode_batch(tokenizer: Tokenizer, docs: list[str]) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which we never use.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [e.ids for e in encode(docs, add_special_tokens=False)]
