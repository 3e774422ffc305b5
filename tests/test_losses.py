"""dsv2.training.balance and token_drop, and the capacity rule: balance losses against hand arithmetic and loop
references, gradients, invariants, dropping."""

import math

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.model.capacity import device_capacity, drop_over_capacity
from dsv2.presets import get_config
from dsv2.training.balance import balance_losses, comm_balance_loss, device_balance_loss, expert_balance_loss
from dsv2.training.token_drop import choose_protected, device_token_drop

# ---------------------------------------------------------------------------------------------------------------
# A hand example: T=4 tokens, E=4 experts, K=2, D=2 devices (experts {0,1} | {2,3}), M=2.
SCORES_A = torch.tensor([
    [0.4, 0.3, 0.2, 0.1],  # t0 -> experts 0, 1   (device 0 only: counted once for device 0)
    [0.1, 0.2, 0.3, 0.4],  # t1 -> experts 3, 2   (device 1 only)
    [0.5, 0.1, 0.3, 0.1],  # t2 -> experts 0, 2   (devices 0 and 1)
    [0.3, 0.4, 0.2, 0.1],  # t3 -> experts 1, 0   (device 0 only)
])
EXPERTS_A = torch.tensor([[0, 1], [3, 2], [0, 2], [1, 0]])
# counts c = [3, 2, 2, 1] (sum 8 = T K);  f_i = E/(K T) c_i = 4/8 c_i = [1.5, 1.0, 1.0, 0.5]
# P = column means = [1.3/4, 1.0/4, 1.0/4, 0.7/4] = [0.325, 0.25, 0.25, 0.175]
# L_Exp = 1.5*0.325 + 1*0.25 + 1*0.25 + 0.5*0.175 = 0.4875 + 0.25 + 0.25 + 0.0875 = 1.075
# f' = [(1.5+1)/2, (1+0.5)/2] = [1.25, 0.75];  P' = [0.325+0.25, 0.25+0.175] = [0.575, 0.425]
# L_Dev = 1.25*0.575 + 0.75*0.425 = 0.71875 + 0.31875 = 1.0375
# device visits = [3 (t0, t2, t3), 2 (t1, t2)];  f'' = D/(M T) visits = 2/8 visits = [0.75, 0.5]
# L_Comm = 0.75*0.575 + 0.5*0.425 = 0.43125 + 0.2125 = 0.64375
EXP_A, DEV_A, COMM_A = 1.075, 1.0375, 0.64375
# A second sequence with uniform affinities 0.25, every token on experts 0 and 2:
# f = [2, 0, 2, 0]: L_Exp = 0.25 * (2+2) = 1;  f' = [1, 1], P' = [0.5, 0.5]: L_Dev = 1;
# visits = [4, 4], f'' = 2/8 * 4 = [1, 1]: L_Comm = 0.5 + 0.5 = 1.
SCORES_U = torch.full((4, 4), 0.25)
EXPERTS_U = torch.tensor([[0, 2]] * 4)


def losses(scores, experts, E, K, D, M, valid=None):
    return (expert_balance_loss(scores, experts, E, K, valid),
            device_balance_loss(scores, experts, E, K, D, valid),
            comm_balance_loss(scores, experts, E, D, M, valid))


def test_hand_example_single_sequence():
    got = losses(SCORES_A[None], EXPERTS_A[None], 4, 2, 2, 2)
    assert [v.item() for v in got] == pytest.approx([EXP_A, DEV_A, COMM_A], abs=1e-6)


def test_hand_example_batch_mean():
    scores = torch.stack([SCORES_A, SCORES_U])
    experts = torch.stack([EXPERTS_A, EXPERTS_U])
    got = losses(scores, experts, 4, 2, 2, 2)
    # (1.075 + 1)/2 = 1.0375;  (1.0375 + 1)/2 = 1.01875;  (0.64375 + 1)/2 = 0.821875
    assert [v.item() for v in got] == pytest.approx([1.0375, 1.01875, 0.821875], abs=1e-6)


def test_padding_is_ignored():
    # Sequence A followed by 3 padding tokens (NaN affinities, arbitrary experts), plus an all-padding
    # sequence that must not enter the batch mean: the result is sequence A's alone.
    scores = torch.full((2, 7, 4), float("nan"))
    scores[0, :4] = SCORES_A
    valid = torch.zeros(2, 7, dtype=torch.bool)
    valid[0, :4] = True
    experts = torch.tensor([0, 3]).repeat(2, 7, 1)
    experts[0, :4] = EXPERTS_A
    got = losses(scores, experts, 4, 2, 2, 2, valid)
    assert [v.item() for v in got] == pytest.approx([EXP_A, DEV_A, COMM_A], abs=1e-6)
    # Nothing valid at all: a zero loss, still attached to the graph.
    scores = torch.rand(2, 3, 4, requires_grad=True)
    none = expert_balance_loss(scores, experts[:, :3], 4, 2, torch.zeros(2, 3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0 and torch.equal(scores.grad, torch.zeros_like(scores))


def test_balance_losses_weights_and_keys():
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2)
    out = balance_losses(SCORES_A[None], EXPERTS_A[None], cfg)
    assert out["expert_balance"].item() == pytest.approx(EXP_A)
    assert out["device_balance"].item() == pytest.approx(DEV_A)
    assert out["comm_balance"].item() == pytest.approx(COMM_A)
    # 0.003*1.075 + 0.05*1.0375 + 0.02*0.64375 = 0.003225 + 0.051875 + 0.012875 = 0.067975
    assert out["total"].item() == pytest.approx(0.067975, abs=1e-7)


def test_single_group_reduces_to_constant_one():
    # D = 1: f'_1 = mean f_i = 1 and P'_1 = 1; M = 1: f''_1 = T/T = 1. Both losses are 1 with no gradient.
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, requires_grad=True)
    scores = logits.softmax(-1)
    experts = scores.topk(3, -1).indices
    dev = device_balance_loss(scores, experts, 6, 3, 1)
    comm = comm_balance_loss(scores, experts, 6, 1, 1)
    assert dev.item() == pytest.approx(1) and comm.item() == pytest.approx(1)
    (grad,) = torch.autograd.grad(dev + comm, logits)
    assert grad.abs().max() < 1e-6
    cfg = get_config("deepseek-v2-lite", n_routed_experts=6, num_experts_per_tok=3)
    out = balance_losses(scores, experts, cfg)
    assert out["device_balance"].item() == pytest.approx(1)
    assert out["total"].item() == pytest.approx(cfg.expert_balance_alpha * out["expert_balance"].item())


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="n_experts"):
        expert_balance_loss(SCORES_A[None], EXPERTS_A[None], 5, 2)
    with pytest.raises(ValueError, match="top_k"):
        expert_balance_loss(SCORES_A[None], EXPERTS_A[None], 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        device_balance_loss(SCORES_A[None], EXPERTS_A[None], 4, 2, 3)


# ---------------------------------------------------------------------------------------------------------------
# loop reference on random inputs
def reference_losses(scores, experts, E, K, D, M, valid):
    """Straight from the formulas, one sequence, one token, one expert at a time."""
    B, S, _ = scores.shape
    g = E // D
    per_seq = []
    for b in range(B):
        tokens = [t for t in range(S) if valid[b, t]]
        T = len(tokens)
        if T == 0:
            continue
        count, visits, P = [0] * E, [0] * D, [0.0] * E
        for t in tokens:
            for i in range(E):
                P[i] += scores[b, t, i].item() / T
            for e in experts[b, t].tolist():
                count[e] += 1
            for d in {e // g for e in experts[b, t].tolist()}:
                visits[d] += 1
        f = [E / (K * T) * c for c in count]
        l1 = sum(f[i] * P[i] for i in range(E))
        l2 = sum(sum(f[d * g:(d + 1) * g]) / g * sum(P[d * g:(d + 1) * g]) for d in range(D))
        l3 = sum(D / (M * T) * visits[d] * sum(P[d * g:(d + 1) * g]) for d in range(D))
        per_seq.append((l1, l2, l3))
    if not per_seq:
        return (0.0, 0.0, 0.0)
    return tuple(sum(v) / len(per_seq) for v in zip(*per_seq, strict=True))


@st.composite
def routing(draw):
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    D, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    E = D * per_group
    K, M = draw(st.integers(1, E)), draw(st.integers(1, D))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(B, S, E, generator=gen).mul(2).softmax(-1)
    experts = torch.rand(B, S, E, generator=gen).argsort(-1)[..., :K]
    valid = torch.rand(B, S, generator=gen) < 0.7 if draw(st.booleans()) else None
    return scores, experts, E, K, D, M, valid


@settings(max_examples=60, deadline=None)
@given(routing())
def test_matches_loop_reference(case):
    scores, experts, E, K, D, M, valid = case
    want = reference_losses(scores, experts, E, K, D, M,
                            torch.ones(scores.shape[:2], dtype=torch.bool) if valid is None else valid)
    got = losses(scores, experts, E, K, D, M, valid)
    assert [v.item() for v in got] == pytest.approx(want, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# gradients
def test_expert_loss_gradient_is_f_over_T():
    # dL/ds_{i,t} = f_i / T (one sequence): f = [1.5, 1, 1, 0.5], T = 4.
    scores = SCORES_A[None].clone().requires_grad_()
    expert_balance_loss(scores, EXPERTS_A[None], 4, 2).backward()
    want = torch.tensor([1.5, 1.0, 1.0, 0.5]).div(4).expand(4, 4)
    torch.testing.assert_close(scores.grad[0], want)


def test_gradients_reach_the_gate_weight():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    W = torch.randn(16, 8, requires_grad=True)
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    for key in ("expert_balance", "device_balance", "comm_balance", "total"):
        W.grad = None
        scores = (x @ W).softmax(-1)
        balance_losses(scores, scores.topk(2, -1).indices, cfg)[key].backward()
        assert torch.isfinite(W.grad).all() and W.grad.abs().sum() > 0, key


# ---------------------------------------------------------------------------------------------------------------
# invariants
@settings(max_examples=30, deadline=None)
@given(routing())
def test_uniform_affinities(case):
    # sum_i f_i = E always, so P = 1/E gives L_Exp = 1; sum_d f'_d = D gives L_Dev = 1 with P' = 1/D;
    # L_Comm = sum_d f''_d / D = (visits per token) / M, averaged.
    _, experts, E, K, D, M, _ = case
    B, S, _ = experts.shape
    scores = torch.full((B, S, E), 1 / E)
    l1, l2, l3 = losses(scores, experts, E, K, D, M)
    assert l1.item() == pytest.approx(1) and l2.item() == pytest.approx(1)
    n_visited = torch.stack([(experts // (E // D) == d).any(-1) for d in range(D)]).sum(0).float()
    assert l3.item() == pytest.approx((n_visited / M).mean().item())


@settings(max_examples=30, deadline=None)
@given(routing())
def test_one_expert_per_device_makes_all_three_equal(case):
    # E = D: f'_d = f_d, P'_d = P_d; with M = K every token visits K distinct devices, so f''_d = f_d.
    scores, experts, E, K, _, _, valid = case
    l1, l2, l3 = losses(scores, experts, E, K, E, K, valid)
    assert l2.item() == pytest.approx(l1.item(), rel=1e-5) and l3.item() == pytest.approx(l1.item(), rel=1e-5)


@pytest.mark.parametrize("E,K,D", [(4, 2, 2), (8, 3, 4), (6, 1, 3)])
def test_balanced_routing_gives_one(E, K, D):
    # Token t chooses experts t, t+1, ..., t+K-1 (mod E), T = 2E: every expert is chosen 2K times, f_i = 1,
    # so L_Exp = sum_i P_i = 1 and f'_d = 1 gives L_Dev = 1, for any affinities.
    T = 2 * E
    scores = torch.randn(1, T, E).softmax(-1)
    experts = (torch.arange(T)[:, None] + torch.arange(K)).remainder(E)[None]
    assert expert_balance_loss(scores, experts, E, K).item() == pytest.approx(1)
    assert device_balance_loss(scores, experts, E, K, D).item() == pytest.approx(1)
    # Token t keeps all its experts on device t mod D (M = 1): T/D tokens per device, f'' = 1, L_Comm = 1.
    g = E // D
    experts = ((torch.arange(T) % D)[:, None] * g + torch.arange(K) % g)[None]
    assert comm_balance_loss(scores, experts, E, D, 1).item() == pytest.approx(1)


def test_imbalance_costs_more_than_balance():
    # Every token on expert 0, which has affinity 0.7: the worst case for this P, well above the balanced 1.
    E, K, T = 4, 1, 5
    scores = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(1, T, E)
    experts = torch.zeros(1, T, K, dtype=torch.long)
    # f_0 = 4/(1*5) * 5 = 4, P_0 = 0.7: L_Exp = 2.8
    assert expert_balance_loss(scores, experts, E, K).item() == pytest.approx(2.8)


# ---------------------------------------------------------------------------------------------------------------
# token dropping
def drop_example():
    # B=2, S=2, K=2, E=4, D=2 -> N = 8 assignments, capacity ceil(8/2) = 4 per device.
    # affinities:  seq0 t0: e0 .4, e1 .3   seq0 t1: e0 .5, e2 .2
    #              seq1 t0: e1 .35, e0 .25  seq1 t1: e3 .6, e1 .1
    # device 0 (e0, e1) receives 6: .4 .3 .5 .35 .25 .1;  device 1 receives 2: .2 .6
    experts = torch.tensor([[[0, 1], [0, 2]], [[1, 0], [3, 1]]])
    affinity = torch.tensor([[[0.4, 0.3], [0.5, 0.2]], [[0.35, 0.25], [0.6, 0.1]]])
    scores = torch.zeros(2, 2, 4).scatter_(-1, experts, affinity)
    return scores, experts


def test_drop_hand_example():
    scores, experts = drop_example()
    keep, stats = device_token_drop(scores, experts, 2)
    # Device 0 keeps its 4 best (.5 .4 .35 .3) and drops .25 (seq1 t0 e0) and .1 (seq1 t1 e1).
    assert keep.tolist() == [[[True, True], [True, True]], [[True, False], [True, False]]]
    assert stats.capacity.item() == 4 and stats.load_per_group.tolist() == [6, 2]
    assert stats.n_dropped.item() == 2 and stats.dropped_fraction.item() == pytest.approx(2 / 8)
    # Protect seq1: its 3 device-0 assignments (.35 .25 .1) are kept and take 3 of the 4 slots, leaving one
    # for seq0's .5; seq0's .4 and .3 are dropped.
    keep, stats = device_token_drop(scores, experts, 2, protect=torch.tensor([False, True]))
    assert keep.tolist() == [[[False, False], [True, True]], [[True, True], [True, True]]]
    assert stats.dropped_fraction.item() == pytest.approx(2 / 8)
    # capacity_factor 0.5: ceil(0.5 * 8 / 2) = 2 slots; device 0 keeps .5 and .4, device 1 keeps both.
    keep, stats = device_token_drop(scores, experts, 2, capacity_factor=0.5)
    assert keep.tolist() == [[[True, False], [True, True]], [[False, False], [True, False]]]
    assert stats.capacity.item() == 2 and stats.dropped_fraction.item() == pytest.approx(0.5)


def reference_drop(group, affinity, protected, n_group, capacity):
    keep = [False] * len(group)
    for d in range(n_group):
        mine = [i for i in range(len(group)) if group[i] == d]
        prot = [i for i in mine if protected[i]]
        rest = sorted((i for i in mine if not protected[i]), key=lambda i: (-affinity[i], i))
        for i in prot + rest[:max(capacity[d] - len(prot), 0)]:
            keep[i] = True
    return keep


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans())
def test_flat_core_matches_reference(n, n_group, seed, per_group_capacity):
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(0, n_group, (n,), generator=gen)
    affinity = torch.randint(0, 5, (n,), generator=gen).float() / 5  # coarse, so ties happen
    protected = torch.rand(n, generator=gen) < 0.2
    capacity = (torch.randint(0, 8, (n_group,), generator=gen) if per_group_capacity
                else torch.randint(0, 8, (), generator=gen))
    keep = drop_over_capacity(group, affinity, n_group, capacity, protected)
    want = reference_drop(group.tolist(), affinity.tolist(), protected.tolist(), n_group,
                          capacity.expand(n_group).tolist())
    assert keep.tolist() == want


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([0.5, 1.0, 1.25]), st.integers(0, 2**31 - 1))
def test_drop_properties(B, S, D, per_group, K, capacity_factor, seed):
    E = D * per_group
    K = min(K, E)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, S, E, generator=gen).mul(3).softmax(-1)
    experts = scores.topk(K, -1).indices
    protect = choose_protected(B, 0.3, gen)
    keep, stats = device_token_drop(scores, experts, D, capacity_factor, protect)
    N = B * S * K
    capacity = math.ceil(capacity_factor * N / D - 1e-9)
    assert stats.capacity.item() == capacity
    group = experts // per_group
    affinity = scores.gather(-1, experts)
    prot = protect[:, None, None].expand_as(keep)
    assert keep[prot].all()  # protected sequences untouched
    for d in range(D):
        on_d = group == d
        assert stats.load_per_group[d].item() == on_d.sum().item()
        # within capacity, except where the protected load alone exceeds it
        assert (keep & on_d).sum() <= max(capacity, (prot & on_d).sum().item())
        # the dropped ones are the lowest-affinity unprotected ones on d
        kept_free, dropped = affinity[keep & on_d & ~prot], affinity[~keep & on_d]
        if len(kept_free) and len(dropped):
            assert dropped.max() <= kept_free.min()
        if (~keep & on_d).any():  # dropping only happens at a full device
            assert (keep & on_d).sum() == max(capacity, (prot & on_d).sum().item())
    assert stats.n_dropped.item() == (~keep).sum().item()
    assert stats.dropped_fraction.item() == pytest.approx((~keep).sum().item() / N)
    keep, stats = device_token_drop(scores, experts, D, capacity_factor=1e9, protect=protect)
    assert keep.all() and stats.dropped_fraction.item() == 0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_drop_with_padding_equals_drop_of_valid_assignments(B, S, seed):
    E, K, D = 6, 2, 3
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, S, E, generator=gen).softmax(-1)
    experts = scores.topk(K, -1).indices
    valid = torch.rand(B, S, generator=gen) < 0.6
    keep, stats = device_token_drop(scores, experts, D, valid=valid)
    assert not keep[~valid].any()
    n_valid = int(valid.sum()) * K
    want = drop_over_capacity((experts[valid] // 2).reshape(-1), scores.gather(-1, experts)[valid].reshape(-1), D,
                              device_capacity(n_valid, D))
    assert torch.equal(keep[valid].reshape(-1), want)
    assert stats.n_assignments.item() == n_valid
    assert stats.dropped_fraction.item() == pytest.approx((n_valid - keep.sum().item()) / max(n_valid, 1))


def test_device_capacity():
    assert device_capacity(100, 10, 1.1) == 11  # 1.1 * 100 = 110.00000000000001 must not give 12
    assert device_capacity(8, 3) == 3 and device_capacity(0, 2) == 0
    assert device_capacity(torch.tensor(100), 10, 1.1).item() == 11
    with pytest.raises(ValueError):
        device_capacity(8, 2, 0.0)


def test_choose_protected():
    a = choose_protected(1000, 0.1, torch.Generator().manual_seed(3))
    b = choose_protected(1000, 0.1, torch.Generator().manual_seed(3))
    assert a.dtype == torch.bool and torch.equal(a, b)
    assert 50 < a.sum().item() < 150
    assert not choose_protected(20, 0.0).any() and choose_protected(20, 1.0).all()
