"""The engine (dsv2/inference/engine): continuous batching, paged cache, chunked prefill, prefix caching,
preemption and per-request sampling, against dsv2.generate of each request alone.

Greedy tokens are compared exactly; the models use weights of std 0.2 so that logit gaps (~1) are far above the
fp32 differences between the paged, chunked computation and the contiguous one (~1e-6).
"""

import pytest
import torch
from conftest import random_model, tiny_config

from dsv2 import generate
from dsv2.errors import GenerationError
from dsv2.inference.engine import Engine, SamplingParams
from dsv2.inference.engine.params import choice_seed

VOCAB = 96
MAX_NEW = 10


def make_model(attention_type="mla", seed=0, vocab=VOCAB):
    cfg = tiny_config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, attention_type=attention_type,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=1.0, bos_token_id=0, eos_token_id=1)
    return random_model(cfg, seed)


@pytest.fixture(scope="module", params=["mla", "mha"])
def model(request):
    return make_model(request.param)


def prompts_of(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def run(engine, prompts, arrivals, params=GREEDY):
    """Requests i joins before step arrivals[i]; each step's outputs checked for sanity, the pool's invariants
    after every step. Returns {i: final RequestOutput} and the streamed (token ids, text) of each."""
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    finals, streamed, step = {}, {i: ([], "") for i in range(len(prompts))}, 0
    params = params if isinstance(params, list) else [params] * len(prompts)
    while order or engine.has_unfinished():
        while order and arrivals[order[0]] <= step:
            i = order.pop(0)
            engine.add_request(str(i), prompts[i], params[i])
        for out in engine.step():
            i = int(out.request_id)
            ids, text = streamed[i]
            streamed[i] = (ids + out.outputs[0].new_token_ids, text + out.outputs[0].text_delta)
            if out.finished:
                finals[i] = out
        engine.pool.check()
        held = [0] * engine.pool.num_blocks  # a block's count is the number of live sequences holding it
        for req in engine._requests.values():
            for s in req.seqs:
                for b in s.blocks:
                    held[b] += 1
        assert held == engine.pool.refs
        step += 1
    assert engine.pool.num_free == engine.pool.num_blocks, "blocks leaked"
    return finals, streamed


_refs = {}


def alone(model, prompt, max_new=MAX_NEW):
    key = (id(model), tuple(prompt), max_new)
    if key not in _refs:
        _refs[key] = generate(model, [prompt], max_new, eos_token_id=[])[0]  # as ignore_eos
    return _refs[key]


def assert_alone(model, prompts, finals):
    for i, p in enumerate(prompts):
        out = finals[i].outputs[0]
        assert out.token_ids == alone(model, p), f"request {i}"
        assert out.finish_reason == "length"


LENGTHS = [5, 23, 12, 1, 17]
ARRIVALS = [0, 0, 3, 4, 9]


def test_staggered_requests_equal_each_alone(model):
    engine = Engine(model, num_blocks=64, block_size=8, max_num_batched_tokens=64)
    prompts = prompts_of(LENGTHS)
    finals, streamed = run(engine, prompts, ARRIVALS)
    assert_alone(model, prompts, finals)
    assert all(streamed[i][0] == finals[i].outputs[0].token_ids for i in finals)  # the deltas add up
    assert engine.stats["preemptions"] == 0


def test_preemption_when_the_cache_is_small(model):
    """9 blocks of 4 tokens hold two of these requests at a time at most: the newest are preempted and
    recomputed, and nobody sees an error."""
    engine = Engine(model, num_blocks=9, block_size=4, max_num_batched_tokens=64)
    prompts = prompts_of(LENGTHS)
    finals, _ = run(engine, prompts, ARRIVALS)
    assert_alone(model, prompts, finals)
    assert engine.stats["preemptions"] > 0


def test_prefix_cache_hits(model):
    """Requests sharing a 24-token prefix (3 blocks) after the first has computed it: hits, counted, and the same
    tokens as without the cache."""
    prefix = prompts_of([24], seed=5)[0]
    prompts = prompts_of([3, 9, 1, 14], seed=6, prefix=prefix)
    engine = Engine(model, num_blocks=64, block_size=8, max_num_batched_tokens=64)
    finals, _ = run(engine, prompts, [0, 2, 3, 6])
    assert_alone(model, prompts, finals)
    assert engine.stats["prefix_hits"] >= 9 and finals[3].num_cached_tokens == 24
    assert finals[0].num_cached_tokens == 0
    again, _ = run(engine, prompts[:1], [0])  # the whole prompt's full blocks, but never its last token
    assert again[0].num_cached_tokens == 24 and again[0].outputs[0].token_ids == alone(model, prompts[0])


def test_prefix_cache_off():
    model = make_model()
    prefix = prompts_of([16], seed=5)[0]
    prompts = prompts_of([3, 5], seed=6, prefix=prefix)
    engine = Engine(model, num_blocks=64, block_size=8, prefix_caching=False)
    finals, _ = run(engine, prompts, [0, 3])
    assert_alone(model, prompts, finals)
    assert engine.stats["prefix_hits"] == 0 and finals[1].num_cached_tokens == 0


@pytest.mark.parametrize("budget", range(1, 19))
def test_chunked_prefill_every_chunk_size(model, budget):
    """A step budget of 1..18 tokens cuts the prompts (up to 17 tokens, blocks of 4) into chunks of every size and
    alignment, mixed with other sequences' decodes."""
    engine = Engine(model, num_blocks=32, block_size=4, max_num_batched_tokens=budget)
    prompts = prompts_of([17, 6, 11], seed=budget)
    finals, _ = run(engine, prompts, [0, 1, 2])
    assert_alone(model, prompts, finals)


def test_max_num_seqs_caps_the_batch():
    model = make_model()
    engine = Engine(model, num_blocks=64, block_size=8, max_num_seqs=2)
    seen = []
    real = engine.scheduler.schedule

    def spy():
        out = real()
        seen.append(len(engine.scheduler.running))
        return out

    engine.scheduler.schedule = spy
    prompts = prompts_of([4, 5, 6, 7])
    finals, _ = run(engine, prompts, [0, 0, 0, 0])
    assert_alone(model, prompts, finals)
    assert max(seen) == 2


def test_eos_stops_like_generate():
    model = make_model()
    prompts = prompts_of([4, 9, 6], seed=3)
    eos = alone(model, prompts[1], 6)[3]  # make some greedy token of a prompt the EOS
    model.config.eos_token_id = eos
    try:
        engine = Engine(model, num_blocks=64, block_size=8)
        finals, _ = run(engine, prompts, [0, 0, 0], SamplingParams(temperature=0, max_tokens=6))
        for i, p in enumerate(prompts):
            want = generate(model, [p], 6, eos_token_id=eos)[0]
            assert finals[i].outputs[0].token_ids == want
            assert finals[i].outputs[0].finish_reason == ("stop" if want[-1] == eos else "length")
        assert finals[1].outputs[0].finish_reason == "stop"
    finally:
        model.config.eos_token_id = 1


def test_stop_token_ids_and_min_tokens():
    model = make_model()
    p = prompts_of([7], seed=4)[0]
    greedy = alone(model, p)
    engine = Engine(model, num_blocks=64, block_size=8)
    (out,) = engine.generate([p], SamplingParams(temperature=0, stop_token_ids=[greedy[1]]), progress=False)
    assert out.outputs[0].token_ids == greedy[:2] and out.outputs[0].finish_reason == "stop"
    (out,) = engine.generate([p], SamplingParams(temperature=0, max_tokens=4, min_tokens=3,
                                                 stop_token_ids=[greedy[0]]), progress=False)
    assert greedy[0] not in out.outputs[0].token_ids[:3]


def test_context_end_finishes_with_length():
    model = make_model()
    p = prompts_of([120], seed=2)[0]
    engine = Engine(model, num_blocks=64, block_size=8)
    (out,) = engine.generate([p], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), progress=False)
    assert len(out.outputs[0].token_ids) == 128 - 120 and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == alone(model, p, 8)


# ---------------------------------------------------------------------------------------------------------------
# sampling inside the batch
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, min_p=0.02, seed=1234, max_tokens=12,
                         presence_penalty=0.3, frequency_penalty=0.2, repetition_penalty=1.1, ignore_eos=True)


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = make_model()
    prompts = prompts_of([6, 13, 3, 9], seed=8)
    others = [SamplingParams(temperature=1.0, seed=i, max_tokens=8, ignore_eos=True) for i in range(3)]
    solo, _ = run(Engine(model, num_blocks=64, block_size=8), prompts[:1], [0], SAMPLED)
    for arrivals in ([0, 0, 0, 0], [2, 0, 1, 0], [5, 0, 3, 1]):
        mixed, _ = run(Engine(model, num_blocks=64, block_size=8, max_num_batched_tokens=8), prompts, arrivals,
                       [SAMPLED, *others])
        assert mixed[0].outputs[0].token_ids == solo[0].outputs[0].token_ids
    greedy = alone(model, prompts[0], 12)
    assert solo[0].outputs[0].token_ids != greedy  # it did sample


def test_top_k_1_and_min_p_1_are_greedy():
    model = make_model()
    p = prompts_of([8], seed=9)[0]
    engine = Engine(model, num_blocks=64, block_size=8)
    for params in (SamplingParams(top_k=1, seed=0, max_tokens=MAX_NEW, ignore_eos=True),
                   SamplingParams(min_p=1.0, seed=0, max_tokens=MAX_NEW, ignore_eos=True)):
        (out,) = engine.generate([p], params, progress=False)
        assert out.outputs[0].token_ids == alone(model, p)


def test_n_completions_share_the_prompt_blocks():
    """n=3: completion i is the same request alone with choice_seed(seed, i); while they run, the prompt's blocks
    are held by all three."""
    model = make_model()
    p = prompts_of([19], seed=10)[0]  # 2 full blocks of 8 and a partial one (copied on write)
    engine = Engine(model, num_blocks=64, block_size=8)
    engine.add_request("r", p, SamplingParams(n=3, temperature=1.0, seed=77, max_tokens=6, ignore_eos=True))
    engine.step()  # the prompt, then the fork
    seqs = engine._requests["r"].seqs
    assert len(seqs) == 3 and all(engine.pool.refs[b] == 3 for b in seqs[0].blocks[:2])
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert engine.pool.num_free == engine.pool.num_blocks
    got = [c.token_ids for c in outs[0].outputs]
    for i in range(3):
        (alone_i,) = engine.generate([p], SamplingParams(temperature=1.0, seed=choice_seed(77, i), max_tokens=6,
                                                         ignore_eos=True), progress=False)
        assert got[i] == alone_i.outputs[0].token_ids
    assert len({tuple(g) for g in got}) > 1


def test_logprobs_are_the_models():
    model = make_model()
    p = prompts_of([6], seed=11)[0]
    engine = Engine(model, num_blocks=64, block_size=8)
    (out,) = engine.generate([p], SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True),
                             progress=False)
    c = out.outputs[0]
    with torch.no_grad():
        lp = model(torch.tensor([p + c.token_ids])).log_softmax(-1)[0, len(p) - 1:-1]
    assert len(c.logprobs) == 3
    for t, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        assert entry.token_id == tok and abs(entry.logprob - float(lp[t, tok])) < 1e-4
        top = lp[t].topk(4)
        assert [i for i, _ in entry.top] == top.indices.tolist()
        assert entry.top[0][0] == tok  # greedy: the chosen token is the most likely


def test_penalties_change_greedy_choices():
    model = make_model()
    p = prompts_of([5], seed=12)[0]
    engine = Engine(model, num_blocks=64, block_size=8)
    base = alone(model, p, 20)
    (out,) = engine.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                 presence_penalty=2.0), progress=False)
    toks = out.outputs[0].token_ids
    assert toks != base and len(set(toks)) >= len(set(base))


# ---------------------------------------------------------------------------------------------------------------
# the stepping API
def test_abort_frees_the_blocks():
    model = make_model()
    engine = Engine(model, num_blocks=32, block_size=4)
    prompts = prompts_of([9, 14], seed=13)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], SamplingParams(n=2, seed=1, max_tokens=MAX_NEW))
    engine.step()
    engine.step()
    assert engine.abort("a") and engine.abort("b") and not engine.abort("b") and not engine.abort("nobody")
    assert not engine.has_unfinished() and engine.pool.num_free == engine.pool.num_blocks
    engine.pool.check()
    engine.add_request("a", prompts[0], GREEDY)  # the id may be used again
    out = []
    while engine.has_unfinished():
        out += engine.step()
    assert out[-1].outputs[0].token_ids == alone(model, prompts[0])


def test_abort_while_waiting():
    model = make_model()
    engine = Engine(model, num_blocks=32, block_size=4, max_num_seqs=1)
    p = prompts_of([9, 9], seed=14)
    engine.add_request("a", p[0], GREEDY)
    engine.add_request("b", p[1], GREEDY)
    engine.step()
    assert engine.abort("b")
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_cache_memory_and_bytes_per_token():
    model = make_model()
    engine = Engine(model, cache_memory="64KiB", block_size=8)
    per_token = engine.stats["bytes_per_token"]
    assert per_token == 2 * (16 + 4) * 4  # layers x (d_c + d_R) x fp32
    assert engine.pool.num_blocks == 64 * 1024 // (per_token * 8)
    mha = Engine(make_model("mha"), cache_memory="64KiB", block_size=8)
    assert mha.stats["bytes_per_token"] == 2 * 2 * (8 + 8) * 4  # layers x KV heads x (K + V) x fp32


def test_cache_in_another_dtype(model):
    engine = Engine(model, num_blocks=64, block_size=8, dtype=torch.bfloat16, max_num_batched_tokens=8)
    assert engine.cache.storage.dtype == torch.bfloat16
    prompts = prompts_of(LENGTHS[:3])
    finals, _ = run(engine, prompts, [0, 1, 2])
    assert_alone(model, prompts, finals)  # these tiny models' greedy choices survive a bf16 cache


@pytest.mark.parametrize("kw,message", [
    (dict(cache_memory="lots"), "not a size"),
    (dict(cache_memory="1KiB"), "holds no block"),
    (dict(block_size=0), "must be >= 1"),
    (dict(max_num_seqs=0), "must be >= 1"),
    (dict(dtype=torch.int8), "cache dtype"),
])
def test_engine_errors(kw, message):
    with pytest.raises(GenerationError, match=message):
        Engine(make_model(), **kw)


@pytest.mark.parametrize("prompt,params,message", [
    ([], None, "empty"),
    ([3, 500], None, "outside the vocabulary"),
    ("text", None, "needs a tokenizer"),
    (list(range(2, 90)) + list(range(2, 42)), None, "the model's context is 128"),
    ([5] * 40, SamplingParams(max_tokens=80, n=2), "cache blocks"),
    ([3, 4], SamplingParams(stop=["x"]), "needs a tokenizer"),
    ([3, 4], SamplingParams(stop_token_ids=[10**9], min_tokens=1), "stop_token_ids outside the vocabulary"),
])
def test_request_errors(prompt, params, message):
    engine = Engine(make_model(), num_blocks=12, block_size=8)
    with pytest.raises(GenerationError, match=message):
        engine.add_request("x", prompt, params)
    assert not engine.has_unfinished()


def test_duplicate_request_id():
    engine = Engine(make_model(), num_blocks=12, block_size=8)
    engine.add_request("x", [3, 4])
    with pytest.raises(GenerationError, match="already running"):
        engine.add_request("x", [3, 4])


@pytest.mark.parametrize("kw", [dict(n=0), dict(max_tokens=0), dict(temperature=-1), dict(top_p=0),
                                dict(top_p=1.5), dict(top_k=-1), dict(min_p=2), dict(seed=-1),
                                dict(presence_penalty=3), dict(frequency_penalty=float("nan")),
                                dict(repetition_penalty=0), dict(stop=[""]), dict(logprobs=50),
                                dict(min_tokens=20, max_tokens=10), dict(max_tokens=True)])
def test_sampling_params_errors(kw):
    with pytest.raises(GenerationError):
        SamplingParams(**kw)
