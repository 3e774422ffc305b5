"""Sampling a batch of rows, each by its own request's parameters: the one sampler of the engine and of
dsv2.generate.

Per row, in order: the logit bias, repetition penalty (over the prompt and the output so far: positive logits
divided, negative multiplied), presence and frequency penalties (over the output), then greedy argmax at
temperature 0, or temperature, top-k, top-p (the smallest set reaching p) and min-p (below min_p times the top
probability) and a draw. The bias, the penalties and the banned tokens (EOS before min_tokens) are the row's own,
so only rows that have them take a pass of their own; everything after is one batched computation over the rows,
with each row's temperature, top-k, top-p and min-p as a column of per-row values. A row with a seed draws from
its own generator, one uniform number per token, by inverse CDF over its sorted probabilities: its tokens do not
depend on what else is in the batch (the batched sort is stable and every reduction is along the row).
Log-probabilities are those of the model's distribution (the raw logits).
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


def _penalise(logits_V: torch.Tensor, row: Row) -> None:
    """The row's logit bias and penalties, in place."""
    p = row.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits_V.device)
        logits_V[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits_V.dtype, device=logits_V.device)
    if p.repetition_penalty != 1.0 and (row.prompt_ids or row.output_ids):
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), device=logits_V.device)
        v = logits_V[seen]
        logits_V[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids, device=logits_V.device), minlength=logits_V.shape[0])
        counts = counts[: logits_V.shape[0]].to(logits_V.dtype)
        logits_V -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits_V.dtype)


def _column(rows: list[Row], value, device) -> torch.Tensor:
    return torch.tensor([value(r.params) for r in rows], dtype=torch.float32, device=device)[:, None]


def _draw(logits_RV: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """One token per row from softmax(logits / T) cut by the row's top-k, top-p and min-p."""
    device, V = logits_RV.device, logits_RV.shape[-1]
    sorted_RV, order_RV = (logits_RV / _column(rows, lambda p: p.temperature, device)).sort(
        dim=-1, descending=True, stable=True)
    probs_RV = sorted_RV.softmax(-1)
    rank_V = torch.arange(V, device=device)
    keep_RV = rank_V < _column(rows, lambda p: p.top_k or V, device)
    top_p_R1 = _column(rows, lambda p: p.top_p, device)
    # the smallest prefix whose mass reaches top_p; no cut at all at top_p = 1 (rounding would drop the tail)
    keep_RV &= (probs_RV.cumsum(-1) - probs_RV < top_p_R1) | (top_p_R1 >= 1.0)
    keep_RV &= probs_RV >= _column(rows, lambda p: p.min_p, device) * probs_RV[:, :1]
    keep_RV[:, 0] = True
    cdf_RV = torch.where(keep_RV, probs_RV, 0.0).cumsum(-1)
    u_R = torch.stack([torch.rand((), generator=r.generator, device=device) for r in rows]) * cdf_RV[:, -1]
    i_R = torch.searchsorted(cdf_RV, u_R[:, None], right=True).squeeze(-1)
    i_R = torch.minimum(i_R, keep_RV.sum(-1) - 1)
    return order_RV.gather(1, i_R[:, None]).squeeze(-1)


def sample(logits_RV: torch.Tensor, rows: list[Row]) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each row (logits_RV: one row of logits per entry of rows) and its logprobs."""
    logits_RV = logits_RV.float()
    own = [i for i, row in enumerate(rows) if row.banned or row.params.needs_row_pass]
    work_RV = logits_RV.clone() if own else logits_RV  # the raw logits stay for the logprobs
    for i in own:  # the per-row pass, only for the rows that need one
        if rows[i].banned:
            work_RV[i, rows[i].banned] = float("-inf")
        if rows[i].params.needs_row_pass:
            _penalise(work_RV[i], rows[i])
    tokens_R = torch.empty(len(rows), dtype=torch.long, device=logits_RV.device)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(greedy) == len(rows):
        tokens_R = work_RV.argmax(-1)
    elif greedy:
        tokens_R[greedy] = work_RV[greedy].argmax(-1)
    if drawn:
        tokens_R[drawn] = _draw(work_RV[drawn], [rows[i] for i in drawn])
    tokens = tokens_R.tolist()
    return tokens, _logprobs(logits_RV, rows, tokens)


def _logprobs(logits_RV: torch.Tensor, rows: list[Row], tokens: list[int]) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if wanted:
        lp_RV = logits_RV[wanted].log_softmax(-1)
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs
            top = lp_RV[j].topk(n) if n else None
            out[i] = TokenLogprob(tokens[i], float(lp_RV[j, tokens[i]]),
                                  [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(),
                                                                  strict=True)))
    return out
