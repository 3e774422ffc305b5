"""A request and its sequences: what the scheduler moves between waiting and running, and what the engine reports.

A Sequence is one completion: its tokens (prompt, then output), how many of them have their cache rows written
(`num_computed`), its block table and the prefix-cache keys of its full blocks. A Request holds its n sequences;
with n > 1 the prompt is computed once, by the first sequence, which is then forked: the others share its blocks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from .blocks import ROOT_HASH, block_hash
from .detokenizer import Detokenizer
from .params import SamplingParams, TokenLogprob
from .stop_strings import StopStrings


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int
    token_ids: list[int]
    generator: torch.Generator | None
    detokenizer: Detokenizer | None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the full blocks of token_ids, in order, as far as they have been asked for."""
    num_cached: int = 0
    """Prompt tokens that came from the prefix cache (reported)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    # what the last step added, for its RequestOutput
    new_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    root: bytes = ROOT_HASH
    """The parent hash of its first block: its LoRA adapter's (engine/adapters.py), so that only requests of the
    same adapter share cached blocks."""

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""

    def full_block_hashes(self, block_size: int, upto: int) -> list[bytes]:
        """Keys of the full blocks among the first `upto` tokens (extends self.hashes as blocks fill)."""
        while (len(self.hashes) + 1) * block_size <= upto:
            i = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else self.root
            self.hashes.append(block_hash(parent, self.token_ids[i * block_size:(i + 1) * block_size]))
        return self.hashes


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)
    stops: StopStrings = field(default_factory=lambda: StopStrings(()))
    """The stop strings' automaton, shared by the request's completions."""
    prompt_logprobs: list | None = None
    """Per prompt position, a TokenLogprob (None for the first), where params.prompt_logprobs asks for them."""
    counted_uncached: bool = False
    """Whether the scheduler has counted it among the prompts computed past the prefix cache."""
    adapter: str | None = None
    """The LoRA adapter it runs with (None: the base model)."""

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs) and len(self.seqs) == self.params.n
