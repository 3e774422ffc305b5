"""The engine's step functions one at a time: admission (Engine.admit), packing a step's flat batch (Engine.pack),
the batched sampler against a plain per-row reference (the filters one row at a time, as sampler.py describes
them) and against itself on one row (batch independence); the stop-string automaton against brute force; logit
bias; per-choice seeds."""

import pytest
import torch
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.errors import RequestError
from dsv2.inference.engine import Engine, SamplingParams
from dsv2.inference.engine.params import Admission, choice_seed
from dsv2.inference.engine.sampler import Row, sample
from dsv2.inference.engine.stop_strings import StopStrings

V = 40


def reference_token(logits_V: torch.Tensor, row: Row) -> int:
    """One row, each filter written out: banned, penalties, then argmax or temperature/top-k/top-p/min-p and an
    inverse-CDF draw of one uniform from the row's generator."""
    p, x = row.params, logits_V.double().clone()
    x[row.banned] = float("-inf")
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    seen = sorted(set(row.prompt_ids) | set(row.output_ids))
    for t in seen:
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(row.output_ids):
        x[t] -= p.frequency_penalty * row.output_ids.count(t) + p.presence_penalty
    if p.greedy:
        return int(x.argmax())
    probs, order = (x / p.temperature).softmax(-1).sort(descending=True)
    keep = torch.ones(V, dtype=torch.bool)
    if p.top_k:
        keep[p.top_k:] = False
    if p.top_p < 1:
        keep &= probs.cumsum(-1) - probs < p.top_p
    keep &= probs >= p.min_p * probs[0]
    keep[0] = True
    cdf = torch.where(keep, probs, 0.0).cumsum(-1)
    u = float(torch.rand((), generator=row.generator)) * float(cdf[-1])
    return int(order[min(int((cdf <= u).sum()), int(keep.sum()) - 1)])


params_st = st.builds(
    SamplingParams, temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]), top_k=st.sampled_from([0, 1, 5, 30]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]), min_p=st.sampled_from([0.0, 0.05]),
    repetition_penalty=st.sampled_from([1.0, 1.3]), presence_penalty=st.sampled_from([0.0, 0.5]),
    frequency_penalty=st.sampled_from([0.0, -0.4]), seed=st.integers(0, 1000),
    logit_bias=st.none() | st.dictionaries(st.integers(0, V - 1), st.sampled_from([-100.0, -2.0, 3.5]), max_size=3))
row_st = st.tuples(params_st, st.lists(st.integers(0, V - 1), max_size=6), st.lists(st.integers(0, V - 1), max_size=6),
                   st.lists(st.integers(0, V - 1), max_size=2))


def make_rows(specs) -> list[Row]:
    return [Row(p, prompt, out, torch.Generator().manual_seed(p.seed), banned) for p, prompt, out, banned in specs]


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(row_st, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_batched_sampler_equals_the_reference_and_each_row_alone(specs, seed):
    logits = torch.randn(len(specs), V, generator=torch.Generator().manual_seed(seed)) * 3  # no ties
    together, _ = sample(logits, make_rows(specs))
    alone = [sample(logits[i:i + 1], make_rows([s]))[0][0] for i, s in enumerate(specs)]
    reference = [reference_token(logits[i], r) for i, r in enumerate(make_rows(specs))]
    assert together == alone == reference


def test_rows_sharing_a_generator_draw_in_turn_and_tiny_temperatures_are_greedy():
    """dsv2.generate's rows share one generator: the batch draws them in row order, as the rows would one by
    one; a temperature too small for fp32 (1e-45) samples the argmax instead of NaN probabilities."""
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 3
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=0)
    g = torch.Generator().manual_seed(5)
    together, _ = sample(logits, [Row(p, [], [], g)] * 4)
    g = torch.Generator().manual_seed(5)
    assert together == [sample(logits[i:i + 1], [Row(p, [], [], g)])[0][0] for i in range(4)]
    tiny = [Row(SamplingParams(temperature=1e-45, seed=0), [], [], None)] * 4
    assert sample(logits, tiny)[0] == logits.argmax(-1).tolist()


def test_logprobs_are_the_model_distribution():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    rows = make_rows([(SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5, seed=0), [1], [], []),
                      (SamplingParams(seed=1), [], [], []), (SamplingParams(logprobs=0, seed=2), [], [], [])])
    tokens, lps = sample(logits, rows)
    ref = logits.log_softmax(-1)
    assert lps[1] is None and lps[2].top == []
    assert lps[0].token_id == tokens[0] and lps[0].logprob == pytest.approx(float(ref[0, tokens[0]]), abs=1e-6)
    assert [t for t, _ in lps[0].top] == ref[0].topk(3).indices.tolist()


# ---------------------------------------------------------------------------------------------------------------
# admission and packing
def engine(**kw) -> Engine:
    cfg = tiny_config(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, q_lora_rank=8,
                      kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4,
                      n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, eos_token_id=1)
    return Engine(random_model(cfg, 0), **{"num_blocks": 12, "block_size": 4, **kw})


def test_admit_resolves_the_length_once():
    e = engine(max_model_len=32)
    a = e.admit([3, 4, 5], SamplingParams(max_tokens=None, n=2))
    assert isinstance(a, Admission) and a.prompt_ids == [3, 4, 5]
    # the cache's worst case: each completion copies the prompt's partial block, so (12 // 2) * 4 - 3 tokens each
    assert a.params.max_tokens == 21
    assert e.admit([3] * 30, SamplingParams(max_tokens=10)).params.max_tokens == 2  # cut to the context
    assert e.admit([3] * 30, SamplingParams(max_tokens=10, min_tokens=5)).params.min_tokens == 2
    e.add_request("a", a)
    assert e.stats["waiting"] == 1 and e.stats["max_model_len"] == 32 and e.stats["block_size"] == 4


@pytest.mark.parametrize("prompt,params,kw,param,words", [
    ([3] * 30, SamplingParams(max_tokens=10), {"truncate": False}, "max_tokens", "asks for 10 more"),
    ([3] * 32, None, {}, "prompt", "no room"),
    ([], None, {}, "prompt", "empty"),
    ([3, 64], None, {}, "prompt", "vocabulary"),
    ("text", None, {}, "prompt", "tokenizer"),
    ([3], SamplingParams(stop=["x"]), {}, "stop", "tokenizer"),
    ([3], SamplingParams(stop_token_ids=[99]), {}, "stop_token_ids", "vocabulary"),
    ([3] * 20, SamplingParams(max_tokens=12, n=3), {}, "max_tokens", "cache blocks"),
])
def test_admit_names_the_field_at_fault(prompt, params, kw, param, words):
    with pytest.raises(RequestError, match=words) as e:
        engine(max_model_len=32).admit(prompt, params, **kw)
    assert e.value.param == param


def test_bad_max_model_len_and_sampling_params_name_their_field():
    with pytest.raises(ValueError, match=r"max_model_len must be in \[2, 64\]"):
        engine(max_model_len=65)
    with pytest.raises(RequestError) as e:
        SamplingParams(top_p=0)
    assert e.value.param == "top_p"


def test_admitted_worst_case_holds_a_request_alone_without_preemption():
    """n completions copy the prompt's partial block each: admission counts that, so a request whose length the
    cache decides (max_tokens=None) runs alone without preempting itself."""
    for n in (2, 3, 4):
        for prompt_len in (3, 6, 7, 11):
            e = engine()
            e.add_request("r", list(range(3, 3 + prompt_len)), SamplingParams(n=n, max_tokens=None, ignore_eos=True))
            while e.has_unfinished():
                e.step()
            assert e.stats["preemptions"] == 0, (n, prompt_len)


def test_pack_lays_out_the_step():
    e = engine()
    e.add_request("a", [3, 4, 5, 6, 7], SamplingParams(max_tokens=2))
    e.add_request("b", [8, 9], SamplingParams(max_tokens=2))
    scheduled = e.scheduler.schedule()
    batch = e.pack(scheduled)
    assert batch.ids == [3, 4, 5, 6, 7, 8, 9]
    assert [(s.start, s.n_new, s.n_cached) for s in batch.segments] == [(0, 5, 0), (5, 2, 0)]
    assert batch.sample_at == [4, 6] and [s.request.request_id for s in batch.ready] == ["a", "b"]
    assert e.forward(batch).shape == (2, 64)


# ---------------------------------------------------------------------------------------------------------------
# stop strings, logit bias, per-choice seeds
@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text("abc", min_size=1, max_size=5), max_size=8), text=st.text("abcd", max_size=30),
       cut=st.integers(0, 30))
def test_stop_automaton_equals_brute_force(stops, text, cut):
    """Fed in two pieces: the first stop string to complete ends where a brute-force scan says, and the state's
    depth is the longest suffix of the text that could still begin a stop string."""
    automaton = StopStrings(stops)
    state, end = automaton.feed(0, text[:cut])
    if end is None:
        state, end = automaton.feed(state, text[cut:])
        end = None if end is None else end + len(text[:cut])
    seen = text if end is None else text[:end]
    brute = next((e for e in range(1, len(text) + 1) if any(text[:e].endswith(s) for s in stops)), None)
    assert end == brute
    if end is not None:
        assert automaton.match[state] == max(len(s) for s in stops if seen.endswith(s))
    else:
        assert automaton.depth[state] == max((k for s in stops for k in range(1, len(s) + 1)
                                              if seen.endswith(s[:k])), default=0)


def test_many_stop_strings_cost_what_one_does():
    """300 stop strings of 50 characters that share long prefixes with the text (deep states, long failure
    chains): feeding the text costs within a few times what one stop string costs, not 300 times."""
    import time

    text = ("ab" * 30 + "c") * 40
    many = StopStrings([("ab" * k + "x") + str(k) for k in range(1, 25)]
                       + [("ab" * 25)[:49] + str(i) for i in range(276)])
    one = StopStrings(["ab" * 24 + "x"])

    def cost(automaton) -> float:
        t, state = time.perf_counter(), 0
        for i in range(0, len(text), 4):  # fed as tokens of 4 characters
            state, end = automaton.feed(state, text[i:i + 4])
            assert end is None
        return time.perf_counter() - t

    cost(many), cost(one)  # warm
    assert min(cost(many) for _ in range(3)) < 4 * min(cost(one) for _ in range(3))


def test_logit_bias_moves_the_choice_and_is_checked():
    logits = torch.zeros(1, V)
    rows = make_rows([(SamplingParams(temperature=0, logit_bias={7: 5.0}, seed=0), [], [], [])])
    assert sample(logits, rows)[0] == [7]
    rows = make_rows([(SamplingParams(logit_bias={7: -100, 3: 100}, seed=0), [], [], [])])
    assert sample(logits, rows)[0] == [3]
    for bad in ({7: 101}, {-1: 1.0}, {7: float("nan")}, {"7": 1.0}):
        with pytest.raises(RequestError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    with pytest.raises(RequestError, match="logit_bias outside the vocabulary") as e:
        engine().admit([3], SamplingParams(logit_bias={64: 1.0}))
    assert e.value.param == "logit_bias"


def test_choice_seeds_do_not_overlap_across_requests():
    seeds = {(s, i): choice_seed(s, i) for s in range(50) for i in range(8)}
    assert all(seeds[(s, 0)] == s for s in range(50))
    assert len(set(seeds.values())) == len(seeds)  # seed 7's second completion is not seed 8's first
