"""generate()/stream_generate(): batching with left padding, EOS, limits, sampling, streaming, errors.

Greedy tokens are compared exactly; the models use weights of std 0.2 so that logit gaps (~1) are far above the
fp32 differences between padded/cached and unpadded/uncached computation (~1e-6).
"""

import pytest
import torch
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.errors import GenerationError
from dsv2.inference.generate import generate, sample_next, stream_generate

VOCAB = 96


def make_model(seed=0, q_lora_rank=16, yarn=False, attention_type="mla", max_pos=64):
    rs = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
          "mscale": 0.707, "mscale_all_dim": 0.707} if yarn else None
    cfg = tiny_config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_pos, q_lora_rank=q_lora_rank,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, attention_type=attention_type,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=1.0, rope_scaling=rs, bos_token_id=0, eos_token_id=1)
    return random_model(cfg, seed)


@pytest.fixture(scope="module")
def model():
    return make_model()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_greedy(model, prompt, n):
    """Reference: recompute the full forward (no cache) for every new token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=None, yarn=True), dict(attention_type="gqa")])
def test_greedy_equals_uncached_reference(kw):
    model = make_model(seed=3, **kw)
    for p in prompts_of([1, 5, 11], seed=1):
        assert generate(model, [p], max_new_tokens=12, eos_token_id=[])[0] == naive_greedy(model, p, 12)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4), seed=st.integers(0, 10**6),
       yarn=st.booleans())
def test_batch_equals_each_prompt_alone(lengths, seed, yarn):
    model = make_model(seed=seed % 7, yarn=yarn)
    prompts = prompts_of(lengths, seed)
    batch = generate(model, prompts, max_new_tokens=8, eos_token_id=[])
    alone = [generate(model, [p], max_new_tokens=8, eos_token_id=[])[0] for p in prompts]
    assert batch == alone
    assert all(len(o) == 8 for o in batch)


def test_rope_positions_start_at_zero_for_each_row(model):
    """Left padding shifts nothing: each row's first real token is at position 0 (prefill), then +1 per step."""
    seen = []
    orig = model.rotary.forward
    model.rotary.forward = lambda positions: (seen.append(positions.clone()), orig(positions))[1]
    try:
        generate(model, [[5, 6, 7, 8], [9, 10]], max_new_tokens=3, eos_token_id=[])
    finally:
        del model.rotary.forward
    assert seen[0][0].tolist() == [0, 1, 2, 3] and seen[0][1, 2:].tolist() == [0, 1]
    assert [s.tolist() for s in seen[1:]] == [[[4], [2]], [[5], [3]]]


def test_eos_stops_a_sequence(model):
    prompts = prompts_of([3, 7, 5], seed=2)
    free = generate(model, prompts, max_new_tokens=10, eos_token_id=[])
    # pick an EOS that row 0 emits at step 2 (first occurrence) and that does not occur in the other rows early
    eos = free[0][2]
    first = free[0].index(eos)
    out = generate(model, prompts, max_new_tokens=10, eos_token_id=eos)
    assert out[0] == free[0][: first + 1]  # EOS included, nothing after it
    for i in (1, 2):
        cut = free[i].index(eos) + 1 if eos in free[i] else 10
        assert out[i] == free[i][:cut]  # the other rows continue unaffected
    # the config's eos_token_id is the default
    model.config.eos_token_id = eos
    try:
        assert generate(model, prompts, max_new_tokens=10) == out
        assert generate(model, prompts, max_new_tokens=10, eos_token_id=[eos, free[1][0]])[1] == free[1][:1]
    finally:
        model.config.eos_token_id = 1


def test_stream_marks_finished_rows_with_none(model):
    prompts = prompts_of([4, 2], seed=5)
    free = generate(model, prompts, max_new_tokens=6, eos_token_id=[])
    eos = free[0][0]
    steps = list(stream_generate(model, prompts, max_new_tokens=6, eos_token_id=eos))
    assert steps[0][0] == eos and all(s[0] is None for s in steps[1:])
    assert [s[1] for s in steps] == free[1][: len(steps)]
    if eos not in free[1]:
        assert len(steps) == 6


@pytest.mark.parametrize("n", [0, 1, 5])
def test_max_new_tokens_respected(model, n):
    out = generate(model, prompts_of([3, 6]), max_new_tokens=n, eos_token_id=[])
    assert [len(o) for o in out] == [n, n]


def test_generation_stops_at_context_limit():
    model = make_model(max_pos=16)
    out = generate(model, prompts_of([10, 4]), max_new_tokens=50, eos_token_id=[])
    assert [len(o) for o in out] == [6, 6]  # the longest prompt plus new tokens fills the 16 positions
    assert generate(model, prompts_of([16]), max_new_tokens=5, eos_token_id=[]) == [[]]


def test_callback_streams_tokens_in_order(model):
    prompts = prompts_of([2, 9, 4], seed=3)
    seen = []
    out = generate(model, prompts, max_new_tokens=7, eos_token_id=[], callback=lambda i, t: seen.append((i, t)))
    assert [[t for i, t in seen if i == b] for b in range(3)] == out
    assert [i for i, _ in seen] == [0, 1, 2] * 7  # step by step, rows in order


def test_generate_restores_training_mode(model):
    model.train()
    generate(model, prompts_of([3]), max_new_tokens=2)
    assert model.training
    model.eval()
    generate(model, prompts_of([3]), max_new_tokens=2)
    assert not model.training


# ---------------------------------------------------------------------------------------------------------------
# sampling
def test_sampling_is_reproducible_and_seed_dependent(model):
    prompts = prompts_of([3, 5], seed=4)
    kw = dict(max_new_tokens=16, temperature=1.5, eos_token_id=[])
    a = generate(model, prompts, seed=0, **kw)
    assert a == generate(model, prompts, seed=0, **kw)
    assert a != generate(model, prompts, seed=1, **kw)
    assert a != generate(model, prompts, **{**kw, "temperature": 0.0})  # it really samples


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    prompts = prompts_of([3, 8], seed=6)
    greedy = generate(model, prompts, max_new_tokens=10, eos_token_id=[])
    assert generate(model, prompts, max_new_tokens=10, temperature=2.0, top_k=1, seed=3, eos_token_id=[]) == greedy
    assert generate(model, prompts, max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=3, eos_token_id=[]) == greedy


def test_sample_next_support():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(2000, 1)
    assert sample_next(logits).tolist() == [1] * 2000
    top2 = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 3}
    # probabilities 0.032 0.644 0.087 0.237 0.012: top_p=0.7 keeps {1, 3} (0.644 < 0.7 <= 0.881)
    nucleus = sample_next(logits, 1.0, top_p=0.7, generator=g)
    assert set(nucleus.tolist()) == {1, 3}
    everything = sample_next(logits, 1.0, generator=g)
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(GenerationError, match="temperature"):
        sample_next(logits, -1.0)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(GenerationError, match=r"top_p must be in \(0, 1\]"):
            sample_next(logits, 1.0, top_p=bad)
    assert sample_next(logits[:1], 1.0, top_p=1.0, generator=g).shape == (1,)


# ---------------------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize("prompts,pattern", [
    ([], "no prompts"),
    ([[]], "prompt 0 is empty"),
    ([[3, 4], []], "prompt 1 is empty"),
    ([[3, VOCAB]], rf"prompt 0 has token ids outside the vocabulary \[0, {VOCAB}\): \[{VOCAB}\]"),
    ([[2], [-1, 5]], r"prompt 1 has token ids outside the vocabulary.*\[-1\]"),
    ([[2] * 65], "prompt 0 has 65 tokens, longer than the model's context"),
])
def test_errors(model, prompts, pattern):
    with pytest.raises(GenerationError, match=pattern):
        generate(model, prompts, max_new_tokens=3)


def test_negative_max_new_tokens(model):
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(model, [[2, 3]], max_new_tokens=-1)


def test_tensor_prompts_accepted(model):
    p = torch.tensor([[5, 6, 7]])
    assert generate(model, p, max_new_tokens=4) == generate(model, [[5, 6, 7]], max_new_tokens=4)
