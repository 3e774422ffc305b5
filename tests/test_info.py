"""dsv2.tools.info: the paper's numbers, and exact agreement with instantiated models (parameters, activated
parameters, KV cache bytes, FLOPs counted by torch)."""

import json

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from dsv2.model import DeepseekV2
from dsv2.model.experts import RoutedExperts
from dsv2.presets import get_config
from dsv2.tools.info import describe, format_info


def activated_from_modules(model: DeepseekV2) -> tuple[int, int, int]:
    """(activated with embedding, without the input embedding, matmul params) counted from the live modules:
    each routed-expert tensor contributes K/E of itself, every other unique tensor all of itself."""
    cfg, seen = model.config, set()
    total = matmul = 0
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:  # a tied LM head is the embedding table
                continue
            seen.add(id(p))
            n = p.numel() * cfg.num_experts_per_tok // mod.n_experts if isinstance(mod, RoutedExperts) else p.numel()
            total += n
            matmul += n if p.ndim >= 2 else 0
    emb = 0 if cfg.tie_word_embeddings else model.model.embed_tokens.weight.numel()
    return total, total - emb, matmul - emb


def routed_flops_per_token(model: DeepseekV2) -> int:
    """FlopCounterMode does not count torch._grouped_mm, so the routed experts' share is added by hand."""
    return sum(2 * (m.gate_up_proj.numel() + m.down_proj.numel()) // m.n_experts * model.config.num_experts_per_tok
               for m in model.modules() if isinstance(m, RoutedExperts))


# ---------------------------------------------------------------------------------------------------------------
# the paper (Sec. 1 and Table 1)

def test_deepseek_v2_matches_the_paper():
    d = describe(get_config("deepseek-v2"))
    assert d["parameters"]["total"] == pytest.approx(236e9, rel=0.01)
    assert d["activated"]["without_embedding"] == pytest.approx(21e9, rel=0.03)
    assert d["kv_cache"]["mla"]["elements_per_token"] == 34_560 == d["kv_cache"]["config"]["elements_per_token"]
    assert d["kv_cache"]["mla"]["bytes_per_token"] == 2 * 34_560  # bf16 by default
    assert d["kv_cache"]["mha"]["elements_per_token"] == 2 * 128 * 128 * 60
    assert d["kv_cache"]["mqa"]["elements_per_token"] == 2 * 128 * 60
    assert d["kv_cache"]["gqa"]["groups"] == 8  # num_key_value_heads == n_h: the documented default
    assert d["kv_cache"]["mla_equivalent_gqa_groups"] == pytest.approx(2.25)  # Table 1: (d_c + d_h^R) = 4.5 d_h


def test_deepseek_v2_lite_matches_the_paper():
    d = describe(get_config("deepseek-v2-lite"))
    assert d["parameters"]["total"] == pytest.approx(15.7e9, rel=0.01)
    assert d["activated"]["without_embedding"] == pytest.approx(2.4e9, rel=0.03)
    assert d["kv_cache"]["mla"]["elements_per_token"] == 15_552
    # "MHA -> MLA in a ~16B MoE: KV elements/token 110.6K -> 15.6K"
    assert d["kv_cache"]["mha"]["elements_per_token"] == pytest.approx(110.6e3, rel=0.001)


@pytest.mark.parametrize("name", ["deepseek-v2", "deepseek-v2-lite", "small", "tiny"])
def test_presets_total_equals_the_model_on_meta(name):
    # the meta device allocates nothing, so even the 236B model can be counted exactly
    with torch.device("meta"):
        model = DeepseekV2(get_config(name))
    assert describe(model.config)["parameters"]["total"] == model.num_parameters()


# ---------------------------------------------------------------------------------------------------------------
# exact agreement with instantiated models

VARIANTS = [
    {},
    {"q_lora_rank": None},
    {"tie_word_embeddings": True},
    {"attention_type": "mha"},
    {"attention_type": "gqa", "num_key_value_heads": 2},
    {"attention_type": "mqa"},
    {"n_routed_experts": 0},
    {"n_shared_experts": None, "first_k_dense_replace": 0, "moe_layer_freq": 2},
    {"q_lora_rank": None, "tie_word_embeddings": True, "attention_type": "gqa", "num_key_value_heads": 1},
]


def check_against_model(cfg) -> None:
    model = DeepseekV2(cfg)
    d = describe(cfg, dtype_bytes=4)
    assert d["parameters"]["total"] == model.num_parameters()
    parts = d["parameters"]
    assert parts["total"] == sum(parts[k] for k in ("embedding", "lm_head", "attention", "dense_ffn",
                                                     "routed_experts", "shared_experts", "gate", "norms"))
    total, without_emb, matmul = activated_from_modules(model)
    assert d["activated"]["total"] == total
    assert d["activated"]["without_embedding"] == without_emb
    assert d["flops"]["matmul"] == 2 * matmul
    assert d["kv_cache"]["config"]["bytes_per_token"] == model.new_cache(1, 8).bytes_per_token()  # fp32
    json.dumps(d)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "tiny")
def test_tiny_variants_match_the_model(overrides):
    check_against_model(tiny_config(**overrides))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_configs_match_the_model(data):
    attention = data.draw(st.sampled_from(["mla", "mha", "gqa", "mqa"]))
    heads = data.draw(st.sampled_from([1, 2, 4]))
    experts = data.draw(st.sampled_from([0, 2, 4]))
    cfg = get_config(
        "tiny", vocab_size=data.draw(st.integers(8, 64)), hidden_size=data.draw(st.integers(4, 24)),
        intermediate_size=data.draw(st.integers(1, 20)), moe_intermediate_size=data.draw(st.integers(1, 8)),
        num_hidden_layers=data.draw(st.integers(1, 3)), num_attention_heads=heads,
        num_key_value_heads=data.draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        q_lora_rank=data.draw(st.none() | st.integers(1, 8)), kv_lora_rank=data.draw(st.integers(1, 8)),
        qk_nope_head_dim=data.draw(st.integers(2, 6)), qk_rope_head_dim=2, v_head_dim=data.draw(st.integers(1, 6)),
        attention_type=attention, n_routed_experts=experts,
        n_shared_experts=data.draw(st.sampled_from([None, 0, 1, 2])),
        num_experts_per_tok=data.draw(st.integers(1, max(experts, 1))), topk_method="greedy", n_group=1, topk_group=1,
        first_k_dense_replace=data.draw(st.integers(0, 2)), moe_layer_freq=data.draw(st.integers(1, 2)),
        tie_word_embeddings=data.draw(st.booleans()), bos_token_id=None, eos_token_id=None,
    )
    check_against_model(cfg)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs against torch's own counter (MLA: its attention runs on SDPA's math path or einsums, both counted)

@pytest.mark.parametrize("overrides", [{"n_routed_experts": 0}, {}, {"q_lora_rank": None}])
def test_prefill_flops_match_the_flop_counter(overrides):
    cfg, S = tiny_config(**overrides), 12
    model = DeepseekV2(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (1, S)))
    d = describe(cfg, context_len=S)
    # SDPA counts the full S x S score matrix, i.e. every token at context S
    assert counter.get_total_flops() + S * routed_flops_per_token(model) == S * d["flops"]["forward"]


@pytest.mark.parametrize("absorb", [True, False])
def test_decode_flops_match_the_flop_counter(absorb):
    cfg, T = tiny_config(), 10
    model = DeepseekV2(cfg)
    cache = model.new_cache(1, T)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, T - 1)), cache=cache)
        with FlopCounterMode(display=False) as counter:
            model(torch.randint(0, cfg.vocab_size, (1, 1)), cache=cache, absorb=absorb)
    d = describe(cfg, context_len=T)["flops"]
    expected = d["forward_absorbed"] if absorb else d["forward_naive_decode"]
    assert counter.get_total_flops() + routed_flops_per_token(model) == expected


# ---------------------------------------------------------------------------------------------------------------
# options, report

def test_gqa_groups_and_dtype_bytes():
    d = describe(tiny_config(attention_type="gqa", num_key_value_heads=2), dtype_bytes=1, context_len=100)
    kv = d["kv_cache"]
    assert kv["gqa"]["groups"] == 2
    assert kv["config"]["elements_per_token"] == 2 * (32 + 32) * 4 == kv["gqa"]["elements_per_token"]
    assert kv["config"]["bytes_per_token"] == kv["config"]["elements_per_token"]
    assert kv["config"]["bf16_bytes_per_token"] == 2 * kv["config"]["elements_per_token"]
    assert kv["config"]["bytes_at_context"] == 100 * kv["config"]["elements_per_token"]
    assert d["flops"]["forward_absorbed"] is None
    v2_gqa16 = describe(get_config("deepseek-v2"), gqa_groups=16)["kv_cache"]["gqa"]
    assert v2_gqa16["elements_per_token"] == 2 * 16 * 128 * 60
    with pytest.raises(ValueError):
        describe(tiny_config(), context_len=0)
    with pytest.raises(ValueError):
        describe(tiny_config(), dtype_bytes=0)


def test_format_info_report():
    d = describe(get_config("deepseek-v2"))
    text = format_info(json.loads(json.dumps(d)))  # what a CLI reading JSON back would pass
    for s in ("235.7B", "20.9B", "21.4B", "34,560", "67.5 KiB", "MLA / MHA: 1.76%", "GQA (8 groups)"):
        assert s in text, s
    lite = format_info(describe(get_config("deepseek-v2-lite")))
    assert "15.7B" in lite and "2.45B" in lite and "15,552" in lite
    dense_cfg = tiny_config(n_routed_experts=0, attention_type="mha", tie_word_embeddings=True)
    dense = format_info(describe(dense_cfg))
    assert "dense" in dense and "tied" in dense and "absorbed" not in dense


def test_parallel_memory_per_rank_counts_what_each_rank_owns():
    """The layout's owned parameters: a model's own parameter count, split as FSDP and expert parallelism split it."""
    from conftest import tiny_config

    from dsv2.model import DeepseekV2
    from dsv2.tools.parallel_memory import STATE_BYTES, memory_per_rank

    cfg = tiny_config()
    n = sum(p.numel() for p in DeepseekV2(cfg).parameters())
    experts = sum(p.numel() for name, p in DeepseekV2(cfg).named_parameters() if ".experts." in name)
    ddp = memory_per_rank(cfg, 4)
    assert ddp["parameters_owned"] == n and ddp["total"] == STATE_BYTES * n + 4 * (n - experts)  # + DDP's buckets
    fsdp = memory_per_rank(cfg, 4, fsdp=True)
    assert fsdp["parameters_owned"] == n / 4 and fsdp["buffers"] > 0
    hsdp = memory_per_rank(cfg, 8, fsdp=True, dp_replicate=2)
    assert hsdp["parameters_owned"] == n / 4
    ep = memory_per_rank(cfg, 4, expert_parallel=4)
    assert ep["parameters_owned"] == n - experts + experts / 4
    with pytest.raises(ValueError, match="must divide n_routed_experts"):
        memory_per_rank(cfg, 6, expert_parallel=6)
    both = memory_per_rank(cfg, 4, expert_parallel=2, fsdp=True)  # each block of experts over the 2 ranks holding it
    assert both["parameters_owned"] == (n - experts) / 4 + experts / 4
    hsdp_ep = memory_per_rank(cfg, 8, expert_parallel=2, fsdp=True, dp_replicate=2)
    assert hsdp_ep["parameters_owned"] == (n - experts) / 4 + experts / 8
    offload = memory_per_rank(cfg, 4, expert_parallel=2, fsdp=True, cpu_offload=True)
    assert offload["host"] == STATE_BYTES * both["parameters_owned"] and offload["total"] == both["buffers"]
