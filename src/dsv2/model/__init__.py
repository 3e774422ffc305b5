"""The DeepSeek-V2 model in plain PyTorch: it imports only dsv2.config (and torch). Nothing here knows about
checkpoint files, ranks, CPU kernels or servers; those layers wrap the model from outside (checkpoint/,
distributed/, cpu/, inference/).

Shape suffixes, used package-wide (`x_BSD` is a [batch, new tokens, hidden] tensor):

    B batch            S new tokens         T attended tokens (cache + new)   D hidden size
    H attention heads  G kv heads (baselines), device groups (routing)         V v_head_dim, vocabulary (LM head)
    C kv_lora_rank d_c N qk_nope_head_dim d_h    R qk_rope_head_dim d_h^R      X = C + R (a latent cache row)
    Q query rows of the absorbed attention (S * H per batch row)               M rows of a per-head product
    E routed experts   K experts per token  F moe_intermediate_size           A = T * K token-expert assignments
    N token copies sorted by expert (MoE), or tokens (the LM loss)             P token copies sent (expert parallel)
"""

from .decoder import Block, Decoder, DeepseekV2

__all__ = ["Block", "Decoder", "DeepseekV2"]
