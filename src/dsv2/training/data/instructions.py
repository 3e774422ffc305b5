"""Instruction data: `.jsonl` records of a chat or a prompt and its completion, the loss on the answer only.

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}

A chat is rendered with the checkpoint's chat template (tokenizer_config.json, as the server renders it), one
message at a time: the text each assistant message adds is its target, everything else is context. A prompt and
completion become BOS + prompt (context) and completion + EOS (target).

Batches are padded, not packed: a row is one example (cut to seq_len + 1 tokens, so a long example keeps its start),
then padding; targets outside the answer and in the padding are IGNORE_INDEX, so they add no loss and no gradient.
Attention is causal and the padding comes last, so no example sees another's tokens. Batches follow TokenDataset's
contract: the batch of step k is a pure function of (seed, k), the same on any number of ranks: an epoch is a
permutation of the training examples seeded by (seed, epoch).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ...chat_template import ChatTemplate, ChatTemplateError
from .readers import DataError, resolve_sources

IGNORE_INDEX = -100  # as dsv2.model.lm_loss


def is_instruction_data(sources: list[str]) -> bool:
    """Whether the sources are instruction records: .jsonl files whose first record has messages or prompt +
    completion (DataError for a mix of these and other sources)."""
    files = resolve_sources(sources)
    kinds = {_kind(f) for f in files}
    if "instructions" in kinds and len(kinds) > 1:
        raise DataError("the data mixes instruction records (messages, or prompt + completion) with other text; "
                        "a run trains on one kind")
    return kinds == {"instructions"}


def _kind(path: Path) -> str:
    if path.suffix != ".jsonl":
        return "text"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    return "text"
                ok = isinstance(rec, dict) and ("messages" in rec or {"prompt", "completion"} <= set(rec))
                return "instructions" if ok else "text"
    return "text"


@dataclass
class Example:
    ids: list[int]
    target: list[bool]  # the token is one to predict (its loss counts)


class Renderer:
    """Records -> Examples with the run's tokenizer and the checkpoint's chat template."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, bos_id: int | None, eos_id: int | None):
        self.tok, self.template, self.bos, self.eos = tokenizer, template, bos_id, eos_id

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def example(self, rec: dict, where: str) -> Example:
        if "messages" in rec:
            return self._chat(rec["messages"], where)
        prompt, completion = rec.get("prompt"), rec.get("completion")
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise DataError(f"{where}: a record needs messages, or prompt and completion strings")
        ctx = ([self.bos] if self.bos is not None else []) + self._encode(prompt)
        ans = self._encode(completion) + ([self.eos] if self.eos is not None else [])
        return Example(ctx + ans, [False] * len(ctx) + [True] * len(ans))

    def _chat(self, messages, where: str) -> Example:
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise DataError(f"{where}: messages must be a list of {{role, content}} string pairs")
        if self.template is None:
            raise DataError(f"{where}: chat records need the checkpoint's chat template (chat_template in "
                            "tokenizer_config.json), and it has none: add one, or give prompt/completion records")
        ids, target, done = [], [], ""
        try:
            for k, m in enumerate(messages, 1):
                if m["role"] == "assistant":  # the generation prompt is context, the answer the target
                    head = self.template.render(messages[:k - 1], add_generation_prompt=True)
                    done = self._piece(ids, target, done, head, False, where)
                done = self._piece(ids, target, done, self.template.render(messages[:k], add_generation_prompt=False),
                                   m["role"] == "assistant", where)
        except ChatTemplateError as e:
            raise DataError(f"{where}: {e}") from None
        if not any(target):
            raise DataError(f"{where}: the chat has no assistant message to learn")
        return Example(ids, target)

    def _piece(self, ids, target, done: str, text: str, is_target: bool, where: str) -> str:
        if not text.startswith(done):
            raise DataError(f"{where}: the chat template does not render a chat as a prefix of the longer chat, so "
                            "the answer tokens cannot be found in it")
        new = self._encode(text[len(done):])
        ids += new
        target += [is_target] * len(new)
        return text


def _answer_tokens(examples: list[Example]) -> np.ndarray:
    """The target tokens of the examples, flat (what the unigram entropy of a split is taken over)."""
    return np.array([t for e in examples for t, y in zip(e.ids, e.target, strict=True) if y], dtype=np.int64)


class InstructionDataset:
    """Examples split into train and val (a fixed share, by position in a seeded permutation), batched as padded
    rows; the same batch interface as TokenDataset."""

    def __init__(self, examples: list[Example], val_fraction: float, seed: int, pad_id: int):
        order = np.random.default_rng([seed, 0x1257]).permutation(len(examples))
        n_val = max(1, round(val_fraction * len(examples))) if val_fraction > 0 and len(examples) > 1 else 0
        self.val_examples = [examples[i] for i in sorted(order[:n_val])]
        self.train_examples = [examples[i] for i in sorted(order[n_val:])]
        self.seed, self.pad_id = seed, pad_id
        self.dropped = 0  # records left out: no answer token within a row (build)
        self.train, self.val = (_answer_tokens(split) for split in (self.train_examples, self.val_examples))

    @classmethod
    def build(cls, sources: list[str], renderer: Renderer, val_fraction: float, seed: int, pad_id: int,
              seq_len: int) -> InstructionDataset:
        """Every record of the sources, but those with no answer token within a row's seq_len + 1 tokens (they
        would add nothing, and a micro-batch of only such rows a non-finite loss): counted in `dropped`."""
        examples, dropped = [], 0
        for path in resolve_sources(sources):
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{path}:{n}: not a JSON record ({e})") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{path}:{n}: a record must be a JSON object")
                    e = renderer.example(rec, f"{path}:{n}")
                    if any(e.target[1:seq_len + 1]):
                        examples.append(e)
                    else:
                        dropped += 1
        if not examples:
            raise DataError(f"no instruction records with an answer within seq_len {seq_len} tokens in "
                            f"{', '.join(sources)} ({dropped} records start their answer past it)")
        ds = cls(examples, val_fraction, seed, pad_id)
        ds.dropped = dropped
        return ds

    def rows(self, examples: list[Example], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded inputs [B, seq_len] and targets (IGNORE_INDEX outside the answers)."""
        x = torch.full((len(examples), seq_len), self.pad_id, dtype=torch.long)
        y = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            ids, tgt = e.ids[:seq_len + 1], e.target[:seq_len + 1]
            n = len(ids) - 1
            x[i, :n] = torch.tensor(ids[:-1])
            y[i, :n] = torch.tensor([t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], tgt[1:], strict=True)])
        return x, y

    def batch_for_step(self, step: int, global_batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                       world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of `step`: row i is the (step * B + i)-th example of the run's
        sequence of epochs (each a permutation seeded by (seed, epoch))."""
        n = len(self.train_examples)
        if n == 0:
            raise DataError("the train split has no instruction example; lower val_fraction or add records")
        per = global_batch_size // world
        picks = []
        for i in range(rank * per, (rank + 1) * per):
            epoch, pos = divmod(step * global_batch_size + i, n)
            picks.append(self.train_examples[int(self._epoch(seed, epoch)[pos])])
        return self.rows(picks, seq_len)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations; the dataset lives as long as the run
    def _epoch(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.train_examples))

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0,
                    world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation examples in order (example j on rank j % world)."""
        mine = self.val_examples[rank::world]
        if not mine:
            raise DataError("the val split has no instruction example; raise val_fraction or add records")
        for b, i in enumerate(range(0, len(mine), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.rows(mine[i:i + batch_size], seq_len)
