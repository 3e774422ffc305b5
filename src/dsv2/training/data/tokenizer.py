"""The byte-level BPE tokenizer a run trains (or is given), and the BOS/EOS ids found in any tokenizer by name."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ...files import atomic_write
from .readers import DataError, PathLike

DEFAULT_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


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


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` (the file, or a folder holding it, e.g. a DeepSeek checkpoint folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise DataError(f"no tokenizer file at {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{p} is not a readable tokenizer.json ({reason})") from None


def save_tokenizer(tokenizer: Tokenizer, directory: PathLike) -> Path:
    """Write ``directory/tokenizer.json`` atomically and return its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    target = d / TOKENIZER_FILE
    atomic_write(target, tokenizer.to_str(pretty=True).encode("utf-8"))
    return target


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


def encode_batch(tokenizer: Tokenizer, docs: list[str]) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which we never use.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [e.ids for e in encode(docs, add_special_tokens=False)]
