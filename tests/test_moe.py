"""Router (greedy, device-limited), routed experts and the MoE layer against loop references written from
PAPER.md, token dropping, gradients, layer placement and bf16.

fp32 tolerances: gate weights exact up to 1e-6; MoE outputs and gradients atol 1e-5 (rtol 1e-5) against the
Python-loop reference; bf16 vs fp32 logits within 0.1 absolute on logits of magnitude ~1.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.config import ModelConfig
from dsv2.model import DeepseekV2
from dsv2.model.moe import MLP, MoE
from dsv2.model.router import Router

TOL = dict(atol=1e-5, rtol=1e-5)


def moe_config(E=8, n_group=4, topk_group=2, K=3, method="group_limited_greedy", norm=False, scaling=2.0,
               shared=1, hidden=16, inter=8, act="silu", **kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=hidden, intermediate_size=24, moe_intermediate_size=inter,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
                kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64,
                n_routed_experts=E, n_shared_experts=shared, num_experts_per_tok=K, n_group=n_group,
                topk_group=topk_group, topk_method=method, norm_topk_prob=norm, routed_scaling_factor=scaling,
                first_k_dense_replace=1, hidden_act=act, rope_scaling=None, bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return tiny_config(**base)


def make_moe(cfg, seed, gate_std=1.0):
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, gate_std)  # peaky affinities: the group restriction matters
        moe.experts.gate_up_proj.normal_(0, 0.3)
        moe.experts.down_proj.normal_(0, 0.3)
    return moe.eval()


# ---------------------------------------------------------------------------------------------------------------
# reference routing (PAPER.md): softmax affinities; group score = MAX affinity; keep topk_group groups; top-K
def ref_route(scores_TE, method, n_group, topk_group, K):
    T, E = scores_TE.shape
    size = E // n_group
    chosen = []
    for t in range(T):
        s = scores_TE[t].tolist()
        allowed = list(range(E))
        if method == "group_limited_greedy":
            group_score = [max(s[g * size:(g + 1) * size]) for g in range(n_group)]
            groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen.append(sorted(allowed, key=lambda e: -s[e])[:K])
    return chosen


def ref_weights(scores_TE, chosen, norm, K, scaling):
    w = torch.stack([scores_TE[t, c] for t, c in enumerate(chosen)])
    if norm and K > 1:  # official V2: renormalise (no scaling) only when top_k > 1
        return w / w.sum(-1, keepdim=True)
    return w * scaling


@st.composite
def router_configs(draw):
    n_group = draw(st.sampled_from([1, 2, 4, 8]))
    size = draw(st.integers(1, 4))
    E = n_group * size
    method = draw(st.sampled_from(["greedy", "group_limited_greedy"]))
    topk_group = draw(st.integers(1, n_group))
    cap = topk_group * size if method == "group_limited_greedy" else E
    K = draw(st.integers(1, cap))
    return moe_config(E=E, n_group=n_group, topk_group=topk_group, K=K, method=method, norm=draw(st.booleans()),
                      scaling=draw(st.sampled_from([1.0, 2.5, 16.0])))


@settings(max_examples=150, deadline=None)
@given(cfg=router_configs(), T=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_router_matches_reference(cfg, T, seed):
    router = make_moe(cfg, seed).gate
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    r = router(x)
    scores = torch.softmax(x.double() @ router.weight.double().T, -1)
    torch.testing.assert_close(r.scores_TE.double(), scores, atol=1e-6, rtol=0)
    assert r.scores_TE.dtype == torch.float32 and r.weights_TK.dtype == torch.float32
    chosen = ref_route(r.scores_TE, cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
    assert r.experts_TK.shape == (T, cfg.num_experts_per_tok) and r.experts_TK.dtype == torch.int64
    for t in range(T):
        # sets (the order inside a token's top-K is not part of the contract)
        assert sorted(r.experts_TK[t].tolist()) == sorted(chosen[t]), t
    # weights per chosen expert
    want = ref_weights(r.scores_TE.detach(), chosen, cfg.norm_topk_prob, cfg.num_experts_per_tok,
                       cfg.routed_scaling_factor)
    got = {(t, e): w for t in range(T) for e, w in zip(r.experts_TK[t].tolist(), r.weights_TK[t].tolist(),
                                                      strict=True)}
    for t in range(T):
        for e, w in zip(chosen[t], want[t].tolist(), strict=True):
            assert got[(t, e)] == pytest.approx(w, rel=1e-5, abs=1e-7)
    # every token visits at most topk_group device groups
    size = cfg.num_routed // cfg.n_group
    torch.testing.assert_close(r.groups_TK, r.experts_TK // size)
    if cfg.topk_method == "group_limited_greedy":
        assert all(len(set(g)) <= cfg.topk_group for g in r.groups_TK.tolist())


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 4), n_group=st.sampled_from([2, 4, 8]), T=st.integers(1, 16), seed=st.integers(0, 10**6),
       data=st.data())
def test_group_limit_property(size, n_group, T, seed, data):
    topk_group = data.draw(st.integers(1, n_group - 1))
    K = data.draw(st.integers(1, topk_group * size))
    cfg = moe_config(E=n_group * size, n_group=n_group, topk_group=topk_group, K=K)
    r = make_moe(cfg, seed, gate_std=3.0).gate(torch.randn(T, cfg.hidden_size))
    for t in range(T):
        groups = set(r.groups_TK[t].tolist())
        assert len(groups) <= topk_group
        # the kept groups are the ones with the largest MAX affinity
        gmax = r.scores_TE[t].view(n_group, size).amax(-1)
        assert min(gmax[list(groups)].tolist()) >= sorted(gmax.tolist(), reverse=True)[topk_group - 1] - 1e-7


def test_group_limit_changes_choices_versus_greedy():
    """Non-vacuity: on the same affinities plain top-K would cross more groups than allowed."""
    cfg = moe_config(E=16, n_group=8, topk_group=3, K=6)
    moe = make_moe(cfg, 0, gate_std=3.0)
    x = torch.randn(64, cfg.hidden_size)
    limited = moe.gate(x)
    greedy = Router(cfg.replace(topk_method="greedy"))
    greedy.load_state_dict(moe.gate.state_dict())
    free = greedy(x)
    spans = [len(set(g)) for g in free.groups_TK.tolist()]
    assert max(spans) > 3
    assert not torch.equal(limited.experts_TK.sort(-1).values, free.experts_TK.sort(-1).values)


def test_group_score_is_max_not_top2_sum():
    """V2 scores a group by its max affinity; V3's top-2-sum would choose differently here."""
    cfg = moe_config(E=8, n_group=2, topk_group=1, K=2)
    router = Router(cfg)
    # group 0: one strong expert; group 1: two moderately strong ones (sum of top-2 larger, max smaller)
    logits = torch.tensor([[3.0, -5, -5, -5, 2.5, 2.5, -5, -5]])
    scores = logits.softmax(-1)
    assert scores[0, 0] > scores[0, 4] and scores[0, :2].sum() < scores[0, 4:6].sum()
    kept = router.limit_to_groups(scores)
    assert (kept[0, :4] > 0).all() and (kept[0, 4:] == 0).all()


@settings(max_examples=30, deadline=None)
@given(K=st.integers(2, 6), T=st.integers(1, 10), seed=st.integers(0, 10**6))
def test_norm_topk_prob_weights(K, T, seed):
    cfg = moe_config(E=8, n_group=2, topk_group=2, K=K, norm=True, scaling=16.0)
    r = make_moe(cfg, seed).gate(torch.randn(T, cfg.hidden_size))
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(T), atol=1e-6, rtol=0)
    cfg2 = cfg.replace(norm_topk_prob=False)
    r2 = make_moe(cfg2, seed).gate(torch.randn(T, cfg.hidden_size))
    torch.testing.assert_close(r2.weights_TK, r2.scores_TE.gather(1, r2.experts_TK) * 16.0, atol=1e-6, rtol=0)


def test_router_runs_in_fp32_for_bf16_inputs():
    cfg = moe_config()
    router = make_moe(cfg, 0).gate.bfloat16()
    x = torch.randn(5, cfg.hidden_size).bfloat16()
    r = router(x)
    assert r.scores_TE.dtype == torch.float32 and r.weights_TK.dtype == torch.float32
    want = torch.softmax(x.float() @ router.weight.float().T, -1)
    torch.testing.assert_close(r.scores_TE, want, atol=1e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training's bf16 autocast leaves the affinities in fp32
        r = router(x)
    assert r.scores_TE.dtype == torch.float32
    torch.testing.assert_close(r.scores_TE, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# MoE layer vs a loop over experts
def swiglu(x, w_gate, w_up, w_down, act=F.silu):
    return (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def ref_moe(moe: MoE, cfg: ModelConfig, x_BSD, keep_TK=None):
    """Differentiable loop reference using the module's parameters and an independent routing."""
    B, S, D = x_BSD.shape
    x = x_BSD.reshape(-1, D)
    scores = torch.softmax(x.float() @ moe.gate.weight.float().T, -1)
    chosen = ref_route(scores.detach(), cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
    act = {"silu": F.silu, "gelu": F.gelu}[cfg.hidden_act]
    Fi = cfg.moe_intermediate_size
    rows = []
    for t in range(x.shape[0]):
        w = scores[t, chosen[t]]
        w = w / w.sum() if cfg.norm_topk_prob and len(chosen[t]) > 1 else w * cfg.routed_scaling_factor
        y = torch.zeros(D)
        for k, e in enumerate(chosen[t]):
            if keep_TK is not None and not keep_TK[t, k]:
                continue
            gu = moe.experts.gate_up_proj[e]
            y = y + w[k] * swiglu(x[t], gu[:Fi], gu[Fi:], moe.experts.down_proj[e], act)
        if moe.shared_experts is not None:
            se = moe.shared_experts
            y = y + swiglu(x[t], se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight, act)
        rows.append(y)
    return torch.stack(rows).view(B, S, D), chosen


@settings(max_examples=60, deadline=None)
@given(cfg=router_configs(), shared=st.integers(0, 2), act=st.sampled_from(["silu", "gelu"]), B=st.integers(1, 3),
       S=st.integers(1, 5), seed=st.integers(0, 10**6))
def test_moe_equals_loop_reference(cfg, shared, act, B, S, seed):
    cfg = cfg.replace(n_shared_experts=shared, hidden_act=act)
    moe = make_moe(cfg, seed)
    x = torch.randn(B, S, cfg.hidden_size)
    with torch.no_grad():
        y, routing = moe(x)
        want, chosen = ref_moe(moe, cfg, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, want, **TOL)
    if shared:
        assert moe.shared_experts.gate_proj.out_features == shared * cfg.moe_intermediate_size
    else:
        assert moe.shared_experts is None


@settings(max_examples=25, deadline=None)
@given(cfg=router_configs(), hidden=st.integers(2, 13), inter=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_any_widths_work_forward_and_backward(cfg, hidden, inter, seed):
    """Widths that break torch._grouped_mm's 16-byte stride rule (hidden 6, 7, ... in fp32) take the per-expert
    matmuls instead: same outputs as the loop reference, gradients flow (fp32, 1e-5)."""
    cfg = cfg.replace(hidden_size=hidden, moe_intermediate_size=inter)
    moe = make_moe(cfg, seed).train()
    x = torch.randn(2, 5, hidden, requires_grad=True)
    y, _ = moe(x)
    with torch.no_grad():
        want, _ = ref_moe(moe, cfg, x)
    torch.testing.assert_close(y, want, **TOL)
    y.sum().backward()
    assert x.grad is not None and moe.experts.gate_up_proj.grad is not None


def _drop_policy(keep):
    calls = []

    def policy(routing, batch_size):
        calls.append(batch_size)
        assert routing.experts_TK.shape == keep.shape
        return keep

    return policy, calls


@settings(max_examples=60, deadline=None)
@given(cfg=router_configs(), B=st.integers(1, 3), S=st.integers(1, 5), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 10**6))
def test_token_drop_removes_exactly_dropped_assignments(cfg, B, S, p, seed):
    moe = make_moe(cfg, seed)
    x = torch.randn(B, S, cfg.hidden_size)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B * S, cfg.num_experts_per_tok, generator=g) >= p
    policy, calls = _drop_policy(keep)
    moe.train()
    with torch.no_grad():
        y, routing = moe(x, policy)
        assert calls == [B] and routing.keep_TK is keep
        # reference: positions in the K slots follow the router's order; map keep to expert ids
        full, _ = ref_moe(moe, cfg, x)
        drop_contrib = torch.zeros_like(full.view(-1, cfg.hidden_size))
        Fi = cfg.moe_intermediate_size
        xt = x.view(-1, cfg.hidden_size)
        for t in range(B * S):
            for k in range(cfg.num_experts_per_tok):
                if not keep[t, k]:
                    e = int(routing.experts_TK[t, k])
                    gu = moe.experts.gate_up_proj[e]
                    drop_contrib[t] += routing.weights_TK[t, k] * swiglu(xt[t], gu[:Fi], gu[Fi:],
                                                                         moe.experts.down_proj[e])
        torch.testing.assert_close(y, full - drop_contrib.view_as(full), **TOL)
        # eval: the policy is not applied
        moe.eval()
        y_eval, r_eval = moe(x, policy)
        assert r_eval.keep_TK is None and len(calls) == 1
        torch.testing.assert_close(y_eval, full, **TOL)


def test_token_drop_everything_leaves_shared_experts():
    cfg = moe_config(shared=2)
    moe = make_moe(cfg, 0)
    x = torch.randn(2, 3, cfg.hidden_size)
    policy, _ = _drop_policy(torch.zeros(6, cfg.num_experts_per_tok, dtype=torch.bool))
    moe.train()
    with torch.no_grad():
        y, _ = moe(x, policy)
        torch.testing.assert_close(y, moe.shared_experts(x), **TOL)


@pytest.mark.parametrize("norm", [False, True])
def test_gradients_match_reference_and_reach_all_parts(norm):
    cfg = moe_config(E=8, n_group=4, topk_group=2, K=3, norm=norm, shared=2)
    moe = make_moe(cfg, 1)
    x = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    target = torch.randn(2, 5, cfg.hidden_size)
    y, _ = moe(x)
    ((y - target) ** 2).sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters()}
    gx = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    want, _ = ref_moe(moe, cfg, x)
    ((want - target) ** 2).sum().backward()
    for n, p in moe.named_parameters():
        assert got[n] is not None and got[n].abs().sum() > 0, n
        torch.testing.assert_close(got[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)
    for n in ("gate.weight", "experts.gate_up_proj", "experts.down_proj", "shared_experts.gate_proj.weight",
              "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"):
        assert n in got


def test_dense_mlp_is_swiglu():
    torch.manual_seed(0)
    mlp = MLP(16, 24)
    x = torch.randn(3, 16)
    torch.testing.assert_close(mlp(x), swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight),
                               **TOL)


# ---------------------------------------------------------------------------------------------------------------
# layer placement (transformers ignores moe_layer_freq, so it is tested only here)
@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 8), first=st.integers(0, 4), freq=st.integers(1, 4), routed=st.booleans())
def test_layer_placement_follows_official_rule(layers, first, freq, routed):
    cfg = moe_config(num_hidden_layers=layers, first_k_dense_replace=first, moe_layer_freq=freq,
                     n_routed_experts=8 if routed else None, hidden=8, inter=4, intermediate_size=8)
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    for i, layer in enumerate(model.model.layers):
        official = bool(cfg.n_routed_experts) and i >= first and i % freq == 0
        assert cfg.is_moe_layer(i) == official
        assert isinstance(layer.mlp, MoE if official else MLP), i
        if not official:
            assert layer.mlp.gate_proj.out_features == cfg.intermediate_size


def test_layer_placement_examples_and_routings():
    cfg = moe_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = DeepseekV2(cfg).eval()
    assert [isinstance(b.mlp, MoE) for b in model.model.layers] == [False, False, True, False, True, False]
    with torch.no_grad():
        _, routings = model(torch.randint(0, 64, (2, 5)), return_routing=True)
    assert len(routings) == 2 and routings[0].scores_TE.shape == (10, 8)


# ---------------------------------------------------------------------------------------------------------------
def test_bf16_forward():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = DeepseekV2(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        model_bf = model.bfloat16()
        out, routings = model_bf(ids, return_routing=True)
        cache = model_bf.new_cache(2, 13)
        model_bf(ids, cache=cache)
        step = model_bf(ids[:, :1], cache=cache)
    assert out.dtype == torch.bfloat16 and step.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all() and torch.isfinite(step.float()).all()
    assert routings[0].scores_TE.dtype == torch.float32
    assert (out.float() - ref).abs().max() < 0.1
