"""Upcycling (upcycle.py): the dense-function invariant, the copies and partitions, balanced routing at init,
the compatibility errors, and the checkpoint round trip."""

import copy
import json
import warnings

import pytest
import torch
from conftest import tiny_config

from dsv2 import DeepseekV2, from_pretrained
from dsv2.checkpoint import save_pretrained
from dsv2.cpu import optimize
from dsv2.model.moe import MLP, MoE
from dsv2.training.upcycle import UpcycleError, orthonormal_rows, routed_unit_indices, upcycle, upcycle_checkpoint

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16)
E, K = 16, 4
I = BASE["intermediate_size"]


def dense_config(**kw):
    return tiny_config(**{**BASE, "n_routed_experts": 0, **kw})


def moe_config(**kw):
    moe = dict(n_routed_experts=E, n_shared_experts=2, moe_intermediate_size=64, num_experts_per_tok=K, n_group=4,
               topk_group=2, first_k_dense_replace=1)  # shared width 2 * 64 = I: the whole dense FFN
    return tiny_config(**{**BASE, **moe, **kw})


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return DeepseekV2(dense_config()).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, BASE["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(1))


def moe_layers(model):
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]


# ---------------------------------------------------------------------------------------------------------------
# the invariant: MoE(x) = Dense(x) + routed_scale * R(x)
@pytest.mark.parametrize("n_shared", [2, 3], ids=["shared==dense", "shared>dense"])
def test_routed_scale_zero_computes_the_dense_function_exactly(dense, ids, n_shared):
    cfg = moe_config(n_shared_experts=n_shared)
    with torch.no_grad():
        want = dense(ids)
        got = upcycle(dense, cfg, routed_scale=0.0)(ids)
        other = upcycle(dense, cfg, routed_scale=1.0)(ids)
    assert torch.equal(got, want)
    assert (other - want).abs().max() > 1e-3  # the routed path is live: the equality above is not vacuous


@pytest.mark.parametrize("n_shared", [2, 3], ids=["shared==dense", "shared>dense"])
def test_each_moe_layer_is_dense_plus_routed_term_linear_in_routed_scale(dense, n_shared):
    cfg = moe_config(n_shared_experts=n_shared)
    scales = [0.0, 1.0, -0.5, 2.5]
    models = {s: upcycle(dense, cfg, seed=3, routed_scale=s) for s in scales}
    x = torch.randn(2, 32, BASE["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i, _ in moe_layers(models[0.0]):
            out = {s: m.model.layers[i].mlp(x) for s, m in models.items()}
            y0, r0 = out[0.0]
            assert torch.equal(y0, dense.model.layers[i].mlp(x))
            R = out[1.0][0] - y0
            assert R.abs().max() > 1e-3
            for s, (y, r) in out.items():
                assert torch.equal(r.experts_TK, r0.experts_TK) and torch.equal(r.weights_TK, r0.weights_TK)
                torch.testing.assert_close(y, y0 + s * R, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# copies and partitions
def test_everything_outside_the_ffns_and_the_dense_layers_are_copied(dense):
    model = upcycle(dense, moe_config())
    src = dict(dense.named_parameters())
    n_copied = 0
    for name, p in model.named_parameters():
        if ".mlp." not in name:
            assert torch.equal(p, src[name]), name
            n_copied += 1
    assert n_copied > 10 and "lm_head.weight" in src and "model.embed_tokens.weight" in src
    assert isinstance(model.model.layers[0].mlp, MLP)  # first_k_dense_replace=1: layer 0 stays dense
    for a, b in zip(model.model.layers[0].mlp.parameters(), dense.model.layers[0].mlp.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [i for i, _ in moe_layers(model)] == [1, 2]
    assert model.training == dense.training and model.config == moe_config()


def test_tied_embeddings_stay_tied(ids):
    torch.manual_seed(5)
    tied = DeepseekV2(dense_config(tie_word_embeddings=True)).eval()
    model = upcycle(tied, moe_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids), tied(ids))


@pytest.mark.parametrize("routed_scale", [0.0, 0.7])
def test_shared_expert_holds_the_dense_ffn_and_routed_experts_hold_wrapped_partitions(dense, routed_scale):
    cfg = moe_config(n_shared_experts=3)  # S = 192 > I = 128; E * F = 1024 > I: blocks wrap 8 times
    model = upcycle(dense, cfg, routed_scale=routed_scale)
    F = cfg.moe_intermediate_size
    for i, moe in moe_layers(model):
        d = dense.model.layers[i].mlp
        sh = moe.shared_experts
        assert torch.equal(sh.gate_proj.weight[:I], d.gate_proj.weight)
        assert torch.equal(sh.up_proj.weight[:I], d.up_proj.weight)
        assert torch.equal(sh.down_proj.weight[:, :I], d.down_proj.weight)
        assert torch.all(sh.down_proj.weight[:, I:] == 0)  # extra units add nothing ...
        assert sh.gate_proj.weight[I:].std() > 0.5 * cfg.initializer_range  # ... but are fresh, not zero/copies
        for j in range(E):
            units = [(j * F + t) % I for t in range(F)]  # the documented rule, written out independently
            assert torch.equal(moe.experts.gate_up_proj[j, :F], d.gate_proj.weight[units])
            assert torch.equal(moe.experts.gate_up_proj[j, F:], d.up_proj.weight[units])
            torch.testing.assert_close(moe.experts.down_proj[j], d.down_proj.weight[:, units] * routed_scale,
                                       rtol=0, atol=0)


def test_narrow_shared_expert_takes_leading_units_and_routed_cover_the_rest_first(dense):
    cfg = moe_config(n_shared_experts=1, moe_intermediate_size=32)  # S = 32 < I = 128
    with pytest.warns(UserWarning, match="narrower than the dense FFN"):
        model = upcycle(dense, cfg)
    i, moe = moe_layers(model)[0]
    d = dense.model.layers[i].mlp
    assert torch.equal(moe.shared_experts.gate_proj.weight, d.gate_proj.weight[:32])
    assert torch.equal(moe.shared_experts.down_proj.weight, d.down_proj.weight[:, :32])
    assert torch.equal(moe.experts.gate_up_proj[0, :32], d.gate_proj.weight[32:64])  # starts where shared stops
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        upcycle(dense, cfg, routed_scale=1.0)  # no warning: the routed experts carry the other units


def test_routed_unit_indices_cover_every_unit_evenly_when_wrapping():
    idx = routed_unit_indices(n_experts=6, expert_width=5, dense_width=8, shared_width=8)
    assert idx.shape == (6, 5)
    assert torch.bincount(idx.flatten(), minlength=8).tolist() == [4] * 6 + [3] * 2  # 30 slots over 8 units
    assert idx[0].tolist() == [0, 1, 2, 3, 4] and idx[1].tolist() == [5, 6, 7, 0, 1]


def test_same_seed_same_model_other_seed_other_gate(dense):
    a, b, c = (upcycle(dense, moe_config(), seed=s) for s in (5, 5, 6))
    for (_, ma), (_, mb), (_, mc) in zip(moe_layers(a), moe_layers(b), moe_layers(c), strict=True):
        assert torch.equal(ma.gate.weight, mb.gate.weight)
        assert not torch.equal(ma.gate.weight, mc.gate.weight)
    g1, g2 = (m.gate.weight for _, m in moe_layers(a))
    assert not torch.equal(g1, g2)  # layers get different directions


# ---------------------------------------------------------------------------------------------------------------
# routing at init
def load_max_over_mean(routing) -> float:
    counts = torch.bincount(routing.experts_TK.flatten(), minlength=E).float()
    return (counts.max() / counts.mean()).item()


def test_gate_rows_are_orthonormal_times_gate_scale(dense):
    model = upcycle(dense, moe_config(), gate_scale=0.25)
    for _, moe in moe_layers(model):
        W = moe.gate.weight  # E = 16 <= D = 64: one orthonormal block
        torch.testing.assert_close(W @ W.T, 0.25**2 * torch.eye(E), rtol=0, atol=1e-6)


def test_more_experts_than_dimensions_get_independent_orthonormal_blocks():
    W = orthonormal_rows(10, 4, torch.Generator().manual_seed(0))
    assert W.shape == (10, 4)
    for lo, hi in ((0, 4), (4, 8), (8, 10)):
        torch.testing.assert_close(W[lo:hi] @ W[lo:hi].T, torch.eye(hi - lo), rtol=0, atol=1e-6)
    assert not torch.allclose(W[0:4], W[4:8])


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_routing_is_balanced_at_init_on_random_tokens(dense, ids, method):
    # 1024 tokens x K=4 over E=16 experts: 256 assignments per expert when balanced. A multinomial draw has a
    # max/mean near 1.1; the hidden states of repeated tokens are correlated, so allow 1.5. Zero gate rows (the
    # naive init) give E/K = 4, so the bound separates balanced from collapsed routing.
    for seed in (0, 1):
        model = upcycle(dense, moe_config(topk_method=method), seed=seed)
        with torch.no_grad():
            _, routings = model(ids, return_routing=True)
        assert len(routings) == 2
        for r in routings:
            assert load_max_over_mean(r) < 1.5
            assert r.scores_TE.max() < 3 / E and r.scores_TE.min() > 1 / (3 * E)  # near-uniform affinities
    with torch.no_grad():
        for _, moe in moe_layers(model):
            moe.gate.weight.zero_()
        _, routings = model(ids, return_routing=True)
    assert all(load_max_over_mean(r) == E / K for r in routings)  # the control: the statistic can fail


# ---------------------------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize("change, match", [
    (dict(hidden_size=128), "hidden_size"),
    (dict(vocab_size=512), "vocab_size"),
    (dict(kv_lora_rank=64), "kv_lora_rank"),
    (dict(num_hidden_layers=4), "num_hidden_layers"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(n_routed_experts=0), "no MoE layer"),
    (dict(first_k_dense_replace=3), "no MoE layer"),
    (dict(n_shared_experts=0), "no shared experts"),
    (dict(moe_intermediate_size=256), "exceeds the dense FFN width"),
    (dict(intermediate_size=96), "stays dense"),
])
def test_incompatible_configs_are_refused(dense, change, match):
    with pytest.raises(UpcycleError, match=match):
        upcycle(dense, moe_config(**change))


def test_zero_gate_scale_is_refused(dense):
    with pytest.raises(UpcycleError, match="gate_scale"):
        upcycle(dense, moe_config(), gate_scale=0.0)


def test_source_moe_layers_are_copied_or_refused():
    torch.manual_seed(4)
    # source: MoE at layer 2 only (4 layers, moe_layer_freq=2); target: MoE at layers 1, 2 and 3
    src = DeepseekV2(moe_config(num_hidden_layers=4, moe_layer_freq=2)).eval()
    assert [i for i, _ in moe_layers(src)] == [2]
    model = upcycle(src, moe_config(num_hidden_layers=4))
    assert [i for i, _ in moe_layers(model)] == [1, 2, 3]
    for a, b in zip(model.model.layers[2].mlp.parameters(), src.model.layers[2].mlp.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.model.layers[1].mlp.shared_experts.gate_proj.weight,
                       src.model.layers[1].mlp.gate_proj.weight)
    with pytest.raises(UpcycleError, match="layer 2 is MoE in the source .* cannot be turned back"):
        upcycle(src, moe_config(num_hidden_layers=4, first_k_dense_replace=3))
    with pytest.raises(UpcycleError, match="layer 2 is already MoE"):
        upcycle(src, moe_config(num_hidden_layers=4, n_routed_experts=8))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
def test_upcycle_checkpoint_round_trip(tmp_path, dense, ids):
    dense_dir, out_dir = tmp_path / "dense", tmp_path / "moe"
    save_pretrained(dense, dense_dir)
    (dense_dir / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    cfg = moe_config()
    cfg.save(tmp_path / "moe.json")
    returned = upcycle_checkpoint(dense_dir, tmp_path / "moe.json", out_dir, seed=7)
    loaded = from_pretrained(out_dir)
    assert loaded.config.replace(extra={}) == cfg  # extra: the architectures/model_type/dtype keys
    for (n, a), (_, b) in zip(returned.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert (out_dir / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()
    with torch.no_grad():  # routed_scale=0 by default; from_pretrained's model has the CPU paths on: so the dense one
        torch.testing.assert_close(loaded(ids), optimize(copy.deepcopy(dense))(ids), rtol=0, atol=0)
    with pytest.raises(UpcycleError, match="dense checkpoint directory"):
        upcycle_checkpoint(dense_dir, cfg, dense_dir)
