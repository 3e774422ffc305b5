"""The engine's prompt log-probabilities (SamplingParams.prompt_logprobs): the log-softmax of the plain model's
logits over the whole prompt (fp32, 1e-4 per token: chunked prefill sums in another order), through chunked
prefill, several requests in one step, the LM head in chunks of rows, and a prompt whose prefix is in the prefix
cache (which such a request bypasses, counted)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model, tiny_config

from dsv2 import Engine, SamplingParams
from dsv2.errors import RequestError
from dsv2.inference.engine import prompt_logprobs


def reference(model, ids):
    with torch.inference_mode():
        return F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # [P, V]: row p predicts token p + 1


def check(out, model, ids, k):
    lp = reference(model, ids)
    got = out.prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        e = got[p]
        assert e.token_id == ids[p]
        assert abs(e.logprob - lp[p - 1, ids[p]].item()) <= 1e-4
        want = lp[p - 1].topk(k)
        assert [t for t, _ in e.top] == want.indices.tolist()
        assert all(abs(v - w) <= 1e-4 for (_, v), w in zip(e.top, want.values.tolist(), strict=True))


@pytest.mark.parametrize("budget", [2048, 8])  # one step, or chunks of 8 prompt tokens across steps
def test_prompt_logprobs_are_the_models(budget, monkeypatch):
    monkeypatch.setattr(prompt_logprobs, "CHUNK_BYTES", 4 * 4096 * 3)  # the LM head 3 rows at a time
    model = random_model(tiny_config(), 0)
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=budget, block_size=4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 4096, (n,), generator=g).tolist() for n in (1, 7, 23)]
    outs = engine.generate(prompts, [SamplingParams(max_tokens=3, prompt_logprobs=k) for k in (2, 0, 5)])
    for out, ids, k in zip(outs, prompts, (2, 0, 5), strict=True):
        check(out, model, ids, k)


def test_a_cached_prefix_is_computed_again():
    model = random_model(tiny_config(), 0)
    engine = Engine(model, max_num_seqs=2, block_size=4)
    ids = torch.randint(2, 4096, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    engine.generate([ids], SamplingParams(max_tokens=2))  # its blocks are now in the prefix cache
    out = engine.generate([ids], SamplingParams(max_tokens=2, prompt_logprobs=1))[0]
    check(out, model, ids, 1)
    assert out.num_cached_tokens == 0 and engine.stats["prompt_logprobs_uncached"] == 1
    assert engine.generate([ids], SamplingParams(max_tokens=2))[0].num_cached_tokens > 0  # others still hit


def test_bad_prompt_logprobs():
    for bad in (-1, 21, 2.5):
        with pytest.raises(RequestError, match="prompt_logprobs must be in"):
            SamplingParams(prompt_logprobs=bad)
