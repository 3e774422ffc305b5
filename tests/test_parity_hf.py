"""Parity with transformers' DeepseekV2ForCausalLM (a test-only reference): checkpoints it saves load in dsv2 and
give the same logits (fp32, atol 1e-4) and the same 20 greedy tokens.

transformers 5.x ignores norm_topk_prob and moe_layer_freq; those two are tested against the official
definitions in test_moe.py instead.
"""

import itertools

import pytest
import torch

import dsv2

transformers = pytest.importorskip("transformers")

CASES = list(itertools.product([None, 24], ["greedy", "group_limited_greedy"], [0, 1], [False, True]))


def hf_config(q_lora_rank, topk_method, first_dense, yarn, seed):
    g = torch.Generator().manual_seed(seed)
    n_group = 4 if topk_method == "group_limited_greedy" else 1
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    return transformers.DeepseekV2Config(
        vocab_size=128, hidden_size=48, intermediate_size=80, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=int(torch.randint(2, 5, (1,), generator=g)),
        q_lora_rank=q_lora_rank, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
        n_routed_experts=8, n_shared_experts=int(torch.randint(1, 3, (1,), generator=g)), num_experts_per_tok=3,
        first_k_dense_replace=first_dense, n_group=n_group, topk_group=2 if n_group > 1 else 1,
        topk_method=topk_method, routed_scaling_factor=1.5, rope_parameters=rope, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )


def saved_reference(cfg, path):
    """transformers' model for cfg, with non-trivial norm weights (so a misplaced norm cannot hide), saved to
    path by transformers' own save_pretrained."""
    ref = transformers.DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ref.save_pretrained(path)
    return ref


@pytest.mark.parametrize("q_lora_rank,topk_method,first_dense,yarn", CASES)
def test_logits_and_greedy_tokens_match_transformers(tmp_path, q_lora_rank, topk_method, first_dense, yarn):
    seed = hash((q_lora_rank, topk_method, first_dense, yarn)) % 1000
    torch.manual_seed(seed)
    ref = saved_reference(hf_config(q_lora_rank, topk_method, first_dense, yarn, seed), tmp_path)
    model = dsv2.from_pretrained(tmp_path)
    assert model.config.q_lora_rank == q_lora_rank and (model.config.rope_scaling is not None) == yarn
    assert_same_outputs(ref, model)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_transformers_defaults_load_and_match(tmp_path, q_lora_rank):
    """Everything but the sizes (and num_experts_per_tok, which transformers leaves null and cannot run without)
    at transformers' own defaults: greedy routing with n_group/topk_group null, first_k_dense_replace 0, plain
    RoPE, its bos/eos ids, num_key_value_heads null."""
    torch.manual_seed(3)
    cfg = transformers.DeepseekV2Config(vocab_size=128, hidden_size=48, intermediate_size=80, moe_intermediate_size=16,
                                        num_hidden_layers=2, num_attention_heads=3, q_lora_rank=q_lora_rank,
                                        kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                                        n_routed_experts=8, num_experts_per_tok=3)
    ref = saved_reference(cfg, tmp_path)
    model = dsv2.from_pretrained(tmp_path)
    assert (model.config.n_group, model.config.topk_group, model.config.topk_method) == (1, 1, "greedy")
    assert_same_outputs(ref, model)


def assert_same_outputs(ref, model):
    ids = torch.randint(2, 128, (2, 40))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    prompt = ids[0, :7]
    with torch.no_grad():
        hf_out = ref.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None,
                              min_new_tokens=20, pad_token_id=0)[0, 7:].tolist()
    ours = dsv2.generate(model, [prompt.tolist()], max_new_tokens=20, eos_token_id=[])[0]
    assert ours == hf_out
