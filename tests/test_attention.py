"""MLA (naive and absorbed paths, cached decoding, padding) and the MHA/GQA/MQA baselines.

All fp32. Tolerances: absorbed vs naive and cached vs full atol 1e-5 (rtol 1e-5) on outputs of magnitude ~1;
model logits atol 1e-5; comparisons against the loop references in this file atol 1e-5.
"""

import math

import pytest
import torch
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.config import ModelConfig
from dsv2.model.attention import MLA, BaselineAttention, build_attention
from dsv2.model.cache import KVCache, causal_mask
from dsv2.model.rope import RotaryEmbedding, apply_rope

TOL = dict(atol=1e-5, rtol=1e-5)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def make_config(heads=2, kv_rank=8, q_rank=None, nope=8, rope=4, v=6, yarn=False, attention_type="mla",
                kv_heads=None, hidden=24, layers=1, experts=0) -> ModelConfig:
    return tiny_config(
        vocab_size=64, hidden_size=hidden, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=64,
        q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        attention_type=attention_type, n_routed_experts=experts or None, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2 if experts else 1, topk_group=1, first_k_dense_replace=1,
        topk_method="group_limited_greedy" if experts else "greedy", routed_scaling_factor=1.0,
        rope_scaling=dict(YARN) if yarn else None, bos_token_id=0, eos_token_id=1)


def make_attention(cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    attn = build_attention(cfg, 0).eval()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("layernorm.weight"):  # non-trivial norm weights so a misplaced norm shows
                p.uniform_(0.5, 1.5)
    return attn, RotaryEmbedding(cfg)


def new_cache(attn, batch, max_len):
    return KVCache(attn.cache_widths(), 1, batch, max_len, torch.float32)


def cached_step(attn, rot, x, cache, positions, absorb, valid=None):
    """What DeepseekV2.forward does around one attention layer."""
    S = x.shape[1]
    cache.start(S, valid, absorb)
    out = attn(x, rot(positions), None, cache)
    cache.finish(S)
    return out


def arange_pos(B, start, S):
    return torch.arange(start, start + S).expand(B, S)


mla_configs = st.builds(
    make_config, heads=st.integers(1, 4), kv_rank=st.sampled_from([4, 8, 16]),
    q_rank=st.sampled_from([None, 6, 12]), nope=st.sampled_from([4, 8]), rope=st.sampled_from([2, 4, 8]),
    v=st.sampled_from([4, 6, 8]), yarn=st.booleans())


# ---------------------------------------------------------------------------------------------------------------
# reference MLA straight from PAPER.md (per head, explicit loops over positions)
def ref_mla(attn: MLA, cfg: ModelConfig, x, positions, valid=None):
    B, S, _ = x.shape
    H, N, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    cos, sin = RotaryEmbedding(cfg)(positions)
    if cfg.q_lora_rank is None:
        q = x @ attn.q_proj.weight.T
    else:
        c_q = x @ attn.q_a_proj.weight.T
        c_q = c_q / torch.sqrt(c_q.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_a_layernorm.weight
        q = c_q @ attn.q_b_proj.weight.T
    q = q.view(B, S, H, N + R)
    kv = x @ attn.kv_a_proj_with_mqa.weight.T
    c_kv, k_r = kv[..., :C], kv[..., C:]
    c_kv = c_kv / torch.sqrt(c_kv.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.kv_a_layernorm.weight
    k_r = apply_rope(k_r, cos, sin)  # one RoPE key shared by all heads, never normalised
    w = attn.kv_b_proj.weight.view(H, N + cfg.v_head_dim, C)
    scale = (N + R) ** -0.5
    if cfg.rope_scaling:
        m = 0.1 * cfg.rope_scaling["mscale_all_dim"] * math.log(cfg.rope_scaling["factor"]) + 1
        scale *= m * m
    out = torch.zeros(B, S, H, cfg.v_head_dim)
    for b in range(B):
        for h in range(H):
            k_c = c_kv[b] @ w[h, :N].T  # [S, N]
            v_c = c_kv[b] @ w[h, N:].T
            q_c = q[b, :, h, :N]
            q_r = apply_rope(q[b, :, h, N:], cos[b], sin[b])
            for i in range(S):
                keys = [j for j in range(i + 1) if valid is None or valid[b, j]]
                s = torch.stack([(q_c[i] @ k_c[j] + q_r[i] @ k_r[b, j]) * scale for j in keys])
                out[b, i, h] = (s.softmax(0)[:, None] * v_c[keys]).sum(0)
    return out.reshape(B, S, -1) @ attn.o_proj.weight.T


@settings(max_examples=25, deadline=None)
@given(cfg=mla_configs, B=st.integers(1, 2), S=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_mla_naive_matches_paper_reference(cfg, B, S, seed):
    attn, rot = make_attention(cfg, seed)
    x = torch.randn(B, S, cfg.hidden_size) * 2
    pos = arange_pos(B, 0, S)
    with torch.no_grad():
        want = ref_mla(attn, cfg, x, pos)
        torch.testing.assert_close(attn(x, rot(pos), None, None, absorb=False), want, **TOL)
        torch.testing.assert_close(attn(x, rot(pos), None, None, absorb=True), want, **TOL)


# ---------------------------------------------------------------------------------------------------------------
# absorbed == naive
@settings(max_examples=80, deadline=None)
@given(cfg=mla_configs, B=st.integers(1, 3), S=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_absorbed_equals_naive_multi_token(cfg, B, S, seed):
    attn, rot = make_attention(cfg, seed)
    x = torch.randn(B, S, cfg.hidden_size) * 2
    rope = rot(arange_pos(B, 3, S))
    with torch.no_grad():
        naive = attn(x, rope, None, None, absorb=False)
        absorbed = attn(x, rope, None, None, absorb=True)
        torch.testing.assert_close(absorbed, naive, **TOL)
        # with an explicit mask (some keys masked out) too
        valid = torch.rand(B, S) > 0.3
        mask = causal_mask(valid, 0)
        torch.testing.assert_close(attn(x, rope, mask, None, absorb=True), attn(x, rope, mask, None, absorb=False),
                                   **TOL)


@settings(max_examples=60, deadline=None)
@given(cfg=mla_configs, B=st.integers(1, 3), P=st.integers(1, 8), steps=st.integers(1, 6),
       seed=st.integers(0, 10**6))
def test_absorbed_equals_naive_single_token_decode(cfg, B, P, steps, seed):
    attn, rot = make_attention(cfg, seed)
    x = torch.randn(B, P + steps, cfg.hidden_size) * 2
    caches = [new_cache(attn, B, P + steps) for _ in range(2)]  # the same tokens, naive and absorbed decode
    with torch.no_grad():
        for cache in caches:
            cached_step(attn, rot, x[:, :P], cache, arange_pos(B, 0, P), absorb=False)
        for t in range(P, P + steps):
            naive, absorbed = (cached_step(attn, rot, x[:, t:t + 1], cache, arange_pos(B, t, 1), absorb=a)
                               for cache, a in zip(caches, (False, True), strict=True))
            torch.testing.assert_close(absorbed, naive, **TOL)


# ---------------------------------------------------------------------------------------------------------------
# cached incremental decoding == full forward
@settings(max_examples=60, deadline=None)
@given(cfg=mla_configs, B=st.integers(1, 3), P=st.integers(1, 7), steps=st.integers(1, 6),
       chunk=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_mla_incremental_decoding_equals_full_forward(cfg, B, P, steps, chunk, seed):
    attn, rot = make_attention(cfg, seed)
    T = P + steps
    x = torch.randn(B, T, cfg.hidden_size) * 2
    with torch.no_grad():
        full = attn(x, rot(arange_pos(B, 0, T)), None, None, absorb=False)
        for absorb_decode in (True, False):
            cache = new_cache(attn, B, T)
            outs = [cached_step(attn, rot, x[:, :P], cache, arange_pos(B, 0, P), absorb=False)]
            t = P
            while t < T:  # decode in chunks of `chunk` tokens (1 = token by token)
                n = min(chunk, T - t)
                outs.append(cached_step(attn, rot, x[:, t:t + n], cache, arange_pos(B, t, n), absorb=absorb_decode))
                t += n
            assert cache.length == T
            torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


def test_cache_holds_only_normalised_latent_and_roped_key():
    cfg = make_config(heads=3, q_rank=12)
    attn, rot = make_attention(cfg, 0)
    x = torch.randn(2, 5, cfg.hidden_size)
    cache = new_cache(attn, 2, 5)
    assert set(cache.buffers) == {"c_kv", "k_pe"}
    with torch.no_grad():
        cached_step(attn, rot, x, cache, arange_pos(2, 0, 5), absorb=False)
        c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        cos, sin = rot(arange_pos(2, 0, 5))
    torch.testing.assert_close(cache.buffers["c_kv"][0], attn.kv_a_layernorm(c_kv), **TOL)
    torch.testing.assert_close(cache.buffers["k_pe"][0], apply_rope(k_pe, cos, sin), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# left padding (model level: pad_mask is a model argument)
def make_model(cfg, seed):
    return random_model(cfg, seed, norms=True)


def left_pad(prompts):
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    pad = torch.zeros(len(prompts), P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        pad[b, P - len(p):] = True
    return ids, pad, (pad.long().cumsum(-1) - 1).clamp(min=0)


@settings(max_examples=30, deadline=None)
@given(cfg=st.builds(make_config, heads=st.integers(1, 3), kv_rank=st.sampled_from([4, 8]),
                     q_rank=st.sampled_from([None, 8]), yarn=st.booleans(), layers=st.just(2), experts=st.just(4),
                     attention_type=st.sampled_from(["mla", "mla", "mha", "gqa", "mqa"])),
       lens=st.lists(st.integers(1, 7), min_size=2, max_size=3), steps=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_left_padding_matches_unpadded(cfg, lens, steps, seed):
    model = make_model(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 64, (n,), generator=g).tolist() for n in lens]
    conts = torch.randint(2, 64, (len(lens), steps), generator=g)
    ids, pad, pos = left_pad(prompts)
    P = ids.shape[1]
    with torch.no_grad():
        # no cache
        logits = model(ids, positions=pos, pad_mask=pad)
        # with cache: prefill then token-by-token decode (absorbed path for MLA)
        cache = model.new_cache(len(lens), P + steps)
        pre = model(ids, positions=pos, cache=cache, pad_mask=pad)
        dec = [model(conts[:, i:i + 1], positions=pos[:, -1:] + 1 + i, cache=cache) for i in range(steps)]
        for b, p in enumerate(prompts):
            n = len(p)
            alone = model(torch.tensor([p + conts[b].tolist()]))[0]
            torch.testing.assert_close(logits[b, P - n:], alone[:n], **TOL)
            torch.testing.assert_close(pre[b, P - n:], alone[:n], **TOL)
            torch.testing.assert_close(torch.cat([d[b] for d in dec]), alone[n:], **TOL)


# ---------------------------------------------------------------------------------------------------------------
# baselines
def ref_baseline(attn: BaselineAttention, cfg: ModelConfig, x, positions):
    """Plain causal attention; query head h reads KV head h // (H / G); RoPE on each head's last R dims."""
    B, S, _ = x.shape
    H, G, K, R = cfg.num_attention_heads, cfg.kv_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    cos, sin = RotaryEmbedding(cfg)(positions)

    def rope(t):
        return torch.cat((t[..., : K - R], apply_rope(t[..., K - R:], cos[:, :, None], sin[:, :, None])), -1)

    q = rope((x @ attn.q_proj.weight.T).view(B, S, H, K))
    k = rope((x @ attn.k_proj.weight.T).view(B, S, G, K))
    v = (x @ attn.v_proj.weight.T).view(B, S, G, cfg.v_head_dim)
    out = torch.zeros(B, S, H, cfg.v_head_dim)
    for h in range(H):
        g = h // (H // G)
        s = torch.einsum("bik,bjk->bij", q[:, :, h], k[:, :, g]) * K**-0.5
        s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        out[:, :, h] = s.softmax(-1) @ v[:, :, g]
    return out.reshape(B, S, -1) @ attn.o_proj.weight.T


baseline_configs = st.builds(
    lambda kind, heads_kv, nope, rope, v: make_config(
        heads=heads_kv[0], kv_heads=heads_kv[1], nope=nope, rope=min(rope, nope), v=v, attention_type=kind),
    kind=st.sampled_from(["mha", "gqa", "mqa"]),
    heads_kv=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 3)]),
    nope=st.sampled_from([4, 8]), rope=st.sampled_from([2, 4]), v=st.sampled_from([4, 6]))


@settings(max_examples=60, deadline=None)
@given(cfg=baseline_configs, B=st.integers(1, 2), P=st.integers(1, 6), steps=st.integers(1, 5),
       seed=st.integers(0, 10**6))
def test_baseline_cache_equals_full_and_reference(cfg, B, P, steps, seed):
    attn, rot = make_attention(cfg, seed)
    T = P + steps
    x = torch.randn(B, T, cfg.hidden_size) * 2
    with torch.no_grad():
        full = attn(x, rot(arange_pos(B, 0, T)), None, None)
        torch.testing.assert_close(full, ref_baseline(attn, cfg, x, arange_pos(B, 0, T)), **TOL)
        cache = new_cache(attn, B, T)
        outs = [cached_step(attn, rot, x[:, :P], cache, arange_pos(B, 0, P), absorb=False)]
        outs += [cached_step(attn, rot, x[:, t:t + 1], cache, arange_pos(B, t, 1), absorb=True) for t in range(P, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


def test_baseline_kv_heads():
    assert make_config(heads=4, attention_type="mha").kv_heads == 4
    assert make_config(heads=4, kv_heads=2, attention_type="gqa").kv_heads == 2
    assert make_config(heads=4, kv_heads=2, attention_type="mqa").kv_heads == 1
    assert build_attention(make_config(heads=4, kv_heads=2, attention_type="gqa"), 0).k_proj.out_features == 2 * 8


@pytest.mark.parametrize("heads", [1, 3, 4])
def test_gqa_with_all_kv_heads_equals_mha(heads):
    mha, rot = make_attention(make_config(heads=heads, attention_type="mha"), 0)
    gqa, _ = make_attention(make_config(heads=heads, kv_heads=heads, attention_type="gqa"), 1)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 7, 24)
    rope = rot(arange_pos(2, 0, 7))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x, rope), mha(x, rope), atol=0, rtol=0)


def test_mqa_equals_gqa_with_one_kv_head_and_differs_from_mha():
    mqa, rot = make_attention(make_config(heads=4, attention_type="mqa"), 0)
    gqa, _ = make_attention(make_config(heads=4, kv_heads=1, attention_type="gqa"), 1)
    gqa.load_state_dict(mqa.state_dict())
    x = torch.randn(2, 7, 24)
    rope = rot(arange_pos(2, 0, 7))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x, rope), mqa(x, rope), atol=0, rtol=0)
        # sharing KV heads is observable: MHA with the shared K/V copied per head equals MQA, different ones do not
        mha, _ = make_attention(make_config(heads=4, attention_type="mha"), 2)
        sd = mqa.state_dict()
        sd["k_proj.weight"] = sd["k_proj.weight"].repeat(4, 1)
        sd["v_proj.weight"] = sd["v_proj.weight"].repeat(4, 1)
        mha.load_state_dict(sd)
        torch.testing.assert_close(mha(x, rope), mqa(x, rope), **TOL)
        mha.k_proj.weight[8:] += 0.5
        assert not torch.allclose(mha(x, rope), mqa(x, rope), atol=1e-3)
