"""Perplexity and bits per byte of a checkpoint on text: `dsv2 eval --model DIR --data FILE...`.

The text is read with the training data readers (files, folders, globs, .jsonl, .parquet, `stdlib`) and tokenized as
training tokenizes it (documents joined with EOS, one stream). A model sees at most its context, so the stream is
scored in sliding windows of seq_len tokens, as the transformers perplexity guide does: each window after the first
scores the next `stride` tokens, with the seq_len - stride tokens before them as context (stride = seq_len - 1: the
least compute and context; smaller: more context per scored token, more windows). Every token but the first is scored
exactly once (the guide's windows leave each window's first token unscored). The loss is training's fused LM-head
cross-entropy (fp32 log-softmax, never [tokens, vocab] logits at once).

    perplexity    = exp(sum of the scored tokens' NLL / their number)
    bits per byte = sum of NLL / ln 2 / UTF-8 bytes of the text (comparable across tokenizers)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from ..model import DeepseekV2
from ..model.lm_loss import IGNORE_INDEX
from ..training.data import iter_documents


@dataclass
class Perplexity:
    perplexity: float
    bits_per_byte: float
    nll_sum: float
    tokens: int  # scored tokens
    bytes: int
    windows: int
    seq_len: int
    stride: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens + 1) / self.seconds if self.seconds else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def token_stream(tokenizer: Tokenizer, sources, eos_id: int | None, max_bytes: int | None = None
                 ) -> tuple[torch.Tensor, int]:
    """The sources' documents as one token stream (each followed by EOS, as training joins them) and their UTF-8
    size in bytes."""
    ids: list[int] = []
    nbytes = 0
    for doc in iter_documents(sources, max_bytes):
        ids += tokenizer.encode(doc).ids + ([] if eos_id is None else [eos_id])
        nbytes += len(doc.encode("utf-8"))
    return torch.tensor(ids, dtype=torch.long), nbytes


def windows(n_tokens: int, seq_len: int, stride: int) -> Iterable[tuple[int, int, int]]:
    """(begin, end, first) of each window over a stream of n_tokens: it reads tokens begin .. end-1 and scores the
    targets first .. end-1 (each predicted from the tokens before it in the window). The first window scores all
    its seq_len - 1 targets, each later one the next `stride` with up to seq_len - 1 tokens of context."""
    end = min(seq_len, n_tokens)
    yield 0, end, 1
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        yield max(0, end - seq_len), end, first


@torch.inference_mode()
def perplexity(model: DeepseekV2, ids: torch.Tensor, nbytes: int, seq_len: int | None = None,
               stride: int | None = None, progress: bool = True) -> Perplexity:
    """Score a token stream (token_stream) in sliding windows; seq_len defaults to the model's context, stride to
    half the window."""
    seq_len = seq_len or model.config.max_position_embeddings
    stride = stride or max(1, seq_len // 2)
    if not 2 <= seq_len <= model.config.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [2, {model.config.max_position_embeddings}] (the model's context), "
                         f"got {seq_len}")
    if not 1 <= stride < seq_len:
        raise ValueError(f"--stride must be in [1, --seq-len - 1 = {seq_len - 1}] (new tokens per window), got "
                         f"{stride}")
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed to score one")
    plan = list(windows(len(ids), seq_len, stride))
    device = next(model.parameters()).device
    nll, scored = 0.0, 0
    t0 = time.perf_counter()
    for begin, end, first in tqdm(plan, unit="window", desc="eval", disable=not progress or None, leave=False):
        x = ids[begin:end].to(device)
        targets = x[1:].clone()
        targets[: first - begin - 1] = IGNORE_INDEX  # scored by the previous window
        n = int((targets != IGNORE_INDEX).sum())
        loss = model(x[None, :-1], targets=targets[None])
        nll += float(loss) * n
        scored += n
    seconds = time.perf_counter() - t0
    return Perplexity(math.exp(nll / scored), nll / math.log(2) / max(nbytes, 1), nll, scored, nbytes, len(plan),
                      seq_len, stride, seconds)
