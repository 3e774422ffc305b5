"""Model presets: the released DeepSeek-V2 and V2-Lite configs, and two small ones shaped like V2 (tests, CPU runs).

`get_config(name_or_path, **overrides)` is how everything else builds a ModelConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig, check_field_names

_OFFICIAL_EXTRA = {"aux_loss_alpha": 0.001, "seq_aux": True, "attention_dropout": 0.0}
"""Keys of the released config.json files that dsv2 does not interpret (its balance losses are per sequence and
have their own weights; there is no dropout): kept in `extra` so a preset writes the same config.json."""
_REFERENCE = {
    # Exactly the released config.json of deepseek-ai/DeepSeek-V2 and DeepSeek-V2-Lite.
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
        norm_topk_prob=False, extra=dict(_OFFICIAL_EXTRA),
    ),
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        extra=dict(_OFFICIAL_EXTRA),
    ),
}
_SMALL_COMMON = dict(
    # Shaped like V2: query compression, device groups with M < D, fine-grained + shared experts, first layer
    # dense, decoupled RoPE; no YaRN (short contexts), bos/eos at the bottom of a BPE vocabulary.
    topk_method="group_limited_greedy", first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
    rope_scaling=None, bos_token_id=0, eos_token_id=1, extra={},
)
PRESETS: dict[str, dict[str, Any]] = {
    **_REFERENCE,
    # ~3M parameters: tests and CPU demos.
    "tiny": dict(
        _SMALL_COMMON, vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=2,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.0,
        max_position_embeddings=2048,
    ),
    # ~97M parameters (~35M activated): a real CPU/GPU training run.
    "small": dict(
        _SMALL_COMMON, vocab_size=16384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=192,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=2,
        num_experts_per_tok=6, n_group=8, topk_group=3, routed_scaling_factor=4.0,
        max_position_embeddings=4096,
    ),
}


def get_config(name_or_path: str | Path, **overrides: Any) -> ModelConfig:
    """A preset by name (see PRESETS), or a config.json / checkpoint directory, with field overrides."""
    check_field_names(overrides)
    key = str(name_or_path)
    if key in PRESETS:
        return ModelConfig(**{**PRESETS[key], **overrides})
    p = Path(key)
    if p.exists():
        cfg = ModelConfig.from_json(p)
        return cfg.replace(**overrides) if overrides else cfg
    raise ConfigError(f"unknown preset or config path {key!r}; presets: {', '.join(PRESETS)}")
