"""What a request asks for (SamplingParams) and what the engine gives back (RequestOutput), as vLLM names them."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...errors import RequestError
from .stop_strings import StopStrings

GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily."""


@dataclass
class SamplingParams:
    """How to sample one request's completions. temperature 0 (below GREEDY_BELOW) is greedy; the filters apply in
    the order banned tokens (EOS before min_tokens) -> logit_bias -> penalties -> temperature -> top_k -> top_p ->
    min_p."""

    n: int = 1
    """Completions of the prompt (they share its cache blocks)."""
    max_tokens: int | None = 16
    """None: as many as the context (max_model_len) and the cache leave (what the server gives a chat request that
    names no length)."""
    min_tokens: int = 0
    """EOS and the stop tokens cannot be sampled until this many tokens are out."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's."""
    seed: int | None = None
    """The request's own generator: its tokens do not depend on what else is in the batch."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    """> 1 makes tokens of the prompt and the output less likely (divides positive logits, multiplies negative)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings, matched on the detokenized text; the text ends before the match and never shows it."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """Log-probabilities (of the model's distribution) of each chosen token and of the top `logprobs` tokens."""
    prompt_logprobs: int | None = None
    """Log-probabilities of the prompt's own tokens (each given the ones before it; the first has none) and the top
    `prompt_logprobs` tokens at each (prompt_logprobs.py)."""
    logit_bias: dict[int, float] | None = None
    """Token id -> a number in [-100, 100] added to its logit before sampling (OpenAI's logit_bias); the
    log-probabilities stay those of the model."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [  # (field, holds, message)
            ("n", _int(self.n) and self.n >= 1, f"n must be >= 1, got {self.n}"),
            ("max_tokens", self.max_tokens is None or (_int(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            ("min_tokens", _int(self.min_tokens) and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("top_k", _int(self.top_k) and self.top_k >= 0,
             f"top_k must be >= 1, or 0 for no top-k cut, got {self.top_k}"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            ("seed", self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**63),
             f"seed must be in [0, 2**63), got {self.seed}"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            ("stop_token_ids", all(_int(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be token ids"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= 20),
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            ("prompt_logprobs", self.prompt_logprobs is None or (_int(self.prompt_logprobs)
                                                                 and 0 <= self.prompt_logprobs <= 20),
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            ("logit_bias", self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                _int(t) and t >= 0 and _finite(b) and -100 <= b <= 100 for t, b in self.logit_bias.items())),
             "logit_bias must map token ids to numbers in [-100, 100]"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise RequestError(msg, param=name)

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it that logits / T would overflow fp32 (vLLM's threshold too)."""
        return self.temperature < GREEDY_BELOW

    @property
    def needs_row_pass(self) -> bool:
        """Penalties look at the row's own tokens, a bias at its own ids: such a row is prepared alone before the
        batched draw."""
        return (self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
                or bool(self.logit_bias))


def choice_seed(seed: int, index: int) -> int:
    """The seed of completion `index` of a request seeded with `seed`: the seed itself for the first, a hash of
    both for the others, so no two (seed, index) pairs of different requests share a stream (seed + index would:
    seed 7's second completion would be seed 8's first)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def prompt_token_ids(prompt: Sequence[int], vocab_size: int, name: str = "the prompt") -> list[int]:
    """A prompt's token ids as a list of ints, or a RequestError naming the first problem (the check of
    Engine.admit and of dsv2.generate)."""
    ids = [int(t) for t in prompt]
    if not ids:
        raise RequestError(f"{name} is empty: generation needs at least one token (e.g. BOS)", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", "prompt")
    return ids


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Admission:
    """A request the engine has checked and will take as it is (made by Engine.admit, taken by add_request):
    its prompt's token ids, its parameters with max_tokens resolved against the context and the cache, and its
    stop strings' automaton (built here, off the engine's step)."""

    prompt_ids: list[int]
    params: SamplingParams
    stops: StopStrings
    adapter: str | None = None
    """The LoRA adapter it runs with (None: the base model)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The `logprobs` most likely tokens of that step, with their log-probabilities."""
    rank: int | None = None
    """The token's rank in that step's distribution (1: the most likely), where computed (prompt tokens)."""


@dataclass
class CompletionOutput:
    """One completion of a request: what is new since the last step, and the whole so far."""

    index: int
    token_ids: list[int]
    """All the completion's tokens so far."""
    text: str
    """All its text so far (up to a stop string; text that could begin one is held back until it cannot)."""
    new_token_ids: list[int]
    text_delta: str
    """The text new since the last output (a server streams it)."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per token of token_ids (when the request asked for logprobs)."""
    new_logprobs: list[TokenLogprob] | None = None
    """One entry per token of new_token_ids."""
    finish_reason: str | None = None
    """None while running; "stop" (EOS, a stop token or string), "length" (max_tokens or the context),
    "abort"."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """Where the request asked for them: per prompt token, its log-probability given the ones before (None for
    the first), complete once the prompt is computed."""
