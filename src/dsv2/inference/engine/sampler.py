"""Sampling inside the batched step, each row by its own request's parameters.

Per row, in order: repetition penalty (over the prompt and the output so far: positive logits divided, negative
multiplied), presence and frequency penalties (over the output), then greedy argmax at temperature 0, or
temperature, top-k, top-p (the smallest set reaching p) and min-p (below min_p times the top probability) and a
draw. A row with a seed draws from its own generator, one uniform number per token, by inverse CDF: its tokens do
not depend on what else is in the batch. Log-probabilities are those of the model's distribution (the raw logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .params import SamplingParams, TokenLogprob


@dataclass
class Row:
    """One completion to sample a token for."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    banned: list[int] = field(default_factory=list)
    """Tokens that may not be sampled now (EOS and stop tokens before min_tokens)."""


def _penalised(logits_V: torch.Tensor, row: Row) -> torch.Tensor:
    p = row.params
    if p.repetition_penalty != 1.0 and (row.prompt_ids or row.output_ids):
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), device=logits_V.device)
        v = logits_V[seen]
        logits_V[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids, device=logits_V.device), minlength=logits_V.shape[0])
        counts = counts[: logits_V.shape[0]].to(logits_V.dtype)
        logits_V -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits_V.dtype)
    return logits_V


def _draw(logits_V: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    sorted_V, order_V = (logits_V / p.temperature).sort(descending=True)
    probs_V = sorted_V.softmax(-1)
    keep_V = torch.ones_like(probs_V, dtype=torch.bool)
    if p.top_k:
        keep_V[p.top_k:] = False
    if p.top_p < 1.0:
        keep_V &= probs_V.cumsum(-1) - probs_V < p.top_p  # the smallest prefix whose mass reaches top_p
    if p.min_p > 0:
        keep_V &= probs_V >= p.min_p * probs_V[0]
    keep_V[0] = True
    probs_V = torch.where(keep_V, probs_V, 0.0)
    cdf_V = probs_V.cumsum(-1)
    u = torch.rand((), generator=generator, device=cdf_V.device) * cdf_V[-1]
    i = min(int(torch.searchsorted(cdf_V, u, right=True)), int(keep_V.sum()) - 1)
    return int(order_V[i])


def sample(logits_RV: torch.Tensor, rows: list[Row]) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each row (logits_RV: one row of fp32 logits per entry of rows) and its logprobs."""
    logits_RV = logits_RV.float()
    tokens: list[int] = []
    for logits_V, row in zip(logits_RV.clone(), rows, strict=True):
        if row.banned:
            logits_V[row.banned] = float("-inf")
        logits_V = _penalised(logits_V, row)
        tokens.append(int(logits_V.argmax()) if row.params.greedy else _draw(logits_V, row.params, row.generator))
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if wanted:
        lp_RV = logits_RV[wanted].log_softmax(-1)
        for j, i in enumerate(wanted):
            top = lp_RV[j].topk(rows[i].params.logprobs) if rows[i].params.logprobs else None
            logprobs[i] = TokenLogprob(tokens[i], float(lp_RV[j, tokens[i]]),
                                       [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(),
                                                                       strict=True)))
    return tokens, logprobs
