"""The fused decode step (dsv2.cpu.decode_step) against the plain model: logits and cache rows of one step over the
contiguous cache (left-padded batches) and the engine's paged cache, for MLA with and without q_lora_rank, dense
first layers, greedy and device-limited routing, fp32 and bf16; generate and the engine give the same tokens with
it as without; where it does not apply it says why and the plain forward runs.

Tolerances: fp32, the plain model's logits within 1e-5 of their largest magnitude (only summation order differs);
bf16, the CPU modules' path (same kernels, the same roundings) within one bf16 rounding of the logits' magnitude
(the router's fp32 product may sum in another order)."""

import copy

import pytest
import torch
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2 import Engine, SamplingParams, generate
from dsv2.cpu import optimize
from dsv2.cpu.decode_step import DecodeStep
from dsv2.inference.engine.paged import PagedCache, Segment, StepBatch

CONFIGS = {
    "q_lora, device-limited": {},  # tiny: q_lora_rank 96, 4 groups, top-2 groups, 1 dense layer
    "no q_lora, greedy": dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=2),
    "all MoE, renormalised": dict(first_k_dense_replace=0, norm_topk_prob=True, n_shared_experts=0),
}


def close(got, want, rel):
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= rel * scale, (got.float() - want.float()).abs().max() / scale


def model_for(name, dtype, seed=0):
    model = random_model(tiny_config(**CONFIGS[name]), seed, norms=True).to(dtype)
    return model if dtype == torch.float32 else optimize(model)  # bf16: against the CPU modules' path


def prefilled(model, lens, room=4):
    """A left-padded batch of prompts of these lengths, prefilled into a contiguous cache (and a copy)."""
    B, P = len(lens), max(lens)
    ids = torch.randint(2, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(1))
    pad = torch.arange(P)[None] >= (P - torch.tensor(lens))[:, None]
    positions = (pad.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(B, P + room)
    model(ids, positions=positions, cache=cache, pad_mask=pad)
    return cache, positions[:, -1:] + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lens", [[9], [9, 5, 12]])
def test_one_step_over_the_contiguous_cache(kernels, name, dtype, lens):
    model = model_for(name, dtype)
    step = DecodeStep(model)
    with torch.inference_mode():
        assert step.reason is None and step.applies(len(lens))
        cache, pos = prefilled(model, lens)
        mine = copy.deepcopy(cache)
        new = torch.randint(2, model.config.vocab_size, (len(lens), 1), generator=torch.Generator().manual_seed(2))
        want = model(new, positions=pos, cache=cache, logits_at=torch.arange(len(lens)))
        got = step(new, pos, mine)
    rel = 1e-5 if dtype == torch.float32 else 2**-8
    close(got, want, rel)
    close(mine.storage, cache.storage, rel)
    assert mine.length == cache.length


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_step_over_the_paged_cache(kernels, name, dtype):
    """Three sequences of 5, 11 and 16 cached tokens in blocks of 4 (scattered, the last one full) decode one token
    each: the fused step writes the same slots and gives the logits of the plain StepBatch forward."""
    model = model_for(name, dtype)
    g = torch.Generator().manual_seed(3)
    pc = PagedCache(model, num_blocks=16, block_size=4, dtype=dtype, device=torch.device("cpu"))
    pc.storage.normal_(generator=g)
    tables = [[7, 2], [0, 9, 4], [12, 5, 1, 3, 14]]
    cached = [5, 11, 16]
    segments = [Segment(i, 1, n, t) for i, (n, t) in enumerate(zip(cached, tables, strict=True))]
    ids = torch.randint(2, model.config.vocab_size, (3,), generator=g)
    with torch.inference_mode():
        mine = copy.deepcopy(pc)
        want = model(ids[None], cache=StepBatch(pc, segments, torch.device("cpu")), logits_at=torch.arange(3))
        batch = StepBatch(mine, segments, torch.device("cpu"))
        assert batch.decode_only
        got = DecodeStep(model)(ids[None], batch.positions(1, 3, None), batch)
    rel = 1e-5 if dtype == torch.float32 else 2**-8
    close(got, want, rel)
    close(mine.storage, pc.storage, rel)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_and_the_engine_give_the_same_tokens(kernels, name, monkeypatch):
    """Greedy tokens over 12 steps, a ragged batch: the fused step on and off (fp32)."""
    model = model_for(name, torch.float32)
    prompts = [[5, 9, 13, 2, 8], [40, 41], [7] * 9]

    def run():
        engine = Engine(copy.deepcopy(model), num_blocks=32, block_size=4)
        outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        return generate(model, prompts, 12, eos_token_id=[]), [o.outputs[0].token_ids for o in outs]

    fused = run()
    monkeypatch.setattr(DecodeStep, "applies", lambda self, n: False)
    assert run() == fused
    assert fused[0] == fused[1]


def test_generate_leaves_the_callers_modules_alone(kernels):
    model = random_model(tiny_config(), 0)
    kinds = [type(m) for m in model.modules()]
    model.train()
    generate(model, [[3, 4, 5]], 4)
    assert [type(m) for m in model.modules()] == kinds and model.training


def test_where_it_does_not_apply(kernels):
    """The baselines, non-SiLU experts and mixed dtypes are refused with a reason; too many rows, autograd and
    training mode leave the step to the plain forward."""
    assert "baselines" in DecodeStep(random_model(tiny_config(attention_type="gqa", num_key_value_heads=2), 0)).reason
    assert "SiLU" in DecodeStep(random_model(tiny_config(hidden_act="gelu"), 0)).reason
    mixed = random_model(tiny_config(), 0)
    mixed.lm_head.to(torch.bfloat16)
    assert "mixed" in DecodeStep(mixed).reason
    step = DecodeStep(random_model(tiny_config(), 0))
    with torch.no_grad():
        assert step.applies(1) and not step.applies(step.max_rows() + 1)
    assert not step.applies(1)  # autograd on
    step.model.train()
    with torch.no_grad():
        assert not step.applies(1)


@settings(max_examples=25, deadline=None)
@given(E=st.sampled_from([8, 16]), groups=st.sampled_from([1, 2, 4]), data=st.data())
def test_ffn_routing_equals_the_moe_layer(kernels, E, groups, data):
    """ops.ffn_decode's routing (top-K under the device limit, renormalised or scaled weights), property-tested on
    one MoE layer against model/moe.py for any top_k, n_group and topk_group (fp32, 1e-5)."""
    top_k = data.draw(st.integers(1, E // groups if groups > 1 else 4))
    topk_group = data.draw(st.integers(1, groups))
    norm = data.draw(st.booleans())
    rows = data.draw(st.integers(1, 16))
    cfg = tiny_config(n_routed_experts=E, num_experts_per_tok=min(top_k * topk_group, E), n_group=groups,
                      topk_group=topk_group, norm_topk_prob=norm, first_k_dense_replace=0,
                      topk_method="group_limited_greedy" if groups > 1 else "greedy")
    model = random_model(cfg, data.draw(st.integers(0, 3)), norms=True)
    layer = model.model.layers[0]
    x = torch.randn(rows, cfg.hidden_size, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        want = x + layer.mlp(layer.post_attention_layernorm(x)[None])[0][0]
        got = DecodeStep._ffn(layer, x)
    close(got, want, 1e-5)
