"""The log-probabilities of a prompt's own tokens (`SamplingParams(prompt_logprobs=N)`, vLLM's name): for each prompt
token after the first, its log-probability given the tokens before it and the N most likely tokens there, what
lm-evaluation-harness's log-likelihood tasks and OpenAI's `echo` + `logprobs` ask for.

They come from the prefill the request runs anyway (every chunk of a chunked prefill adds its positions): the model
returns the final norm's output for the step's tokens, and the LM head runs over the rows of such prompts a chunk
of rows at a time (CHUNK_BYTES of fp32 logits), so no [prompt tokens, vocab] logits are ever held; log-softmax in
fp32. A request that asks for them computes its whole prompt: the scheduler skips the prefix cache for it (the
cached blocks hold keys, not the log-probabilities it would need), and counts it (Engine.stats
"prompt_logprobs_uncached").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .params import TokenLogprob
from .sequence import Sequence

CHUNK_BYTES = 16 * 2**20
"""fp32 logits per LM-head chunk: as the fused training loss's chunks (model/lm_loss.py)."""

Span = tuple[Sequence, int, int, int]
"""(sequence, its first row in the step's flat batch, the prompt position of that row, rows)."""


def wanted(seq: Sequence) -> bool:
    """Whether the step's tokens of seq are prompt tokens whose log-probabilities its request asked for."""
    return seq.request.prompt_logprobs is not None and seq.index == 0 and seq.num_computed < seq.prompt_len


@torch.no_grad()
def fill(lm_head: nn.Module, hidden_ND: torch.Tensor, spans: list[Span]) -> None:
    """For each span's prompt positions p that have a next prompt token, request.prompt_logprobs[p + 1] =
    TokenLogprob(that token, its log-probability, the top N)."""
    rows, targets, where = [], [], []
    for seq, row, pos, n in spans:
        for i in range(min(n, seq.prompt_len - 1 - pos)):
            rows.append(row + i)
            targets.append(seq.token_ids[pos + i + 1])
            where.append((seq.request, pos + i + 1))
    vocab = lm_head.out_features
    chunk = max(1, CHUNK_BYTES // (4 * vocab))
    for c in range(0, len(rows), chunk):
        lp = F.log_softmax(lm_head(hidden_ND[torch.tensor(rows[c:c + chunk], device=hidden_ND.device)]).float(), -1)
        tgt = torch.tensor(targets[c:c + chunk], device=lp.device)
        chosen_t = lp.gather(1, tgt[:, None])
        ranks = (lp > chosen_t).sum(-1).add(1).tolist()
        chosen = chosen_t[:, 0].tolist()
        k_max = max(req.params.prompt_logprobs for req, _ in where[c:c + chunk])
        top_v, top_i = (t.tolist() for t in lp.topk(k_max, -1))
        for j, (req, p) in enumerate(where[c:c + chunk]):
            k = req.params.prompt_logprobs
            top = list(zip(top_i[j][:k], top_v[j][:k], strict=True))
            req.prompt_logprobs[p] = TokenLogprob(targets[c + j], chosen[j], top, ranks[j])
