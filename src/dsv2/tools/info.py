"""Config calculator: parameters, activated parameters, KV cache and FLOPs, computed from a ModelConfig alone.

Nothing is instantiated (DeepSeek-V2 has 236B parameters), so every count is written out from the module shapes
in dsv2/model (attention, moe, experts, router, decoder); tests/test_info.py holds the totals equal to the
parameter count of instantiated models, and the KV figures equal to `KVCache.bytes_per_token()`.

The KV comparison follows the DeepSeek-V2 report (arXiv 2405.04434), Table 1: elements cached per token, with
l layers, n_h heads, d_h = qk_nope_head_dim, n_g KV groups, d_c = kv_lora_rank, d_h^R = qk_rope_head_dim:

    MHA 2 n_h d_h l      GQA 2 n_g d_h l      MQA 2 d_h l      MLA (d_c + d_h^R) l   (V2: 576 x 60 = 34,560)

    info = describe(get_config("deepseek-v2"))     # JSON-serialisable dict
    print(format_info(info))                        # aligned text report
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig

BF16_BYTES = 2
DEFAULT_CONTEXT_LEN = 4096
DEFAULT_GQA_GROUPS = 8
"""Table 1's GQA row needs a group count; a config whose num_key_value_heads equals num_attention_heads (as
V2's does: the field only serves the baselines) does not give one, so 8 groups is used, a common GQA choice."""


def _attention_shapes(c: ModelConfig) -> tuple[int, int]:
    """(matmul parameters, norm parameters) of one attention module, exactly as build_attention creates it."""
    D, H = c.hidden_size, c.num_attention_heads
    if c.attention_type == "mla":
        if c.q_lora_rank is None:  # V2-Lite: one q_proj
            q, q_norm = D * H * c.qk_head_dim, 0
        else:  # q_a_proj -> q_a_layernorm -> q_b_proj
            q, q_norm = D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim, c.q_lora_rank
        kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        return q + kv + H * c.v_head_dim * D, q_norm + c.kv_lora_rank  # + kv_a_layernorm
    # BaselineAttention: heads are qk_nope_head_dim wide (RoPE rotates part of them), no norms
    G = c.kv_heads
    return D * H * c.qk_nope_head_dim + D * G * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D, 0


def _kv_entry(elements: int, dtype_bytes: int, context_len: int, **extra: Any) -> dict[str, Any]:
    return {**extra, "elements_per_token": elements, "bytes_per_token": elements * dtype_bytes,
            "bf16_bytes_per_token": elements * BF16_BYTES, "bytes_at_context": elements * dtype_bytes * context_len}


def describe(config: ModelConfig, *, context_len: int = DEFAULT_CONTEXT_LEN, dtype_bytes: int = BF16_BYTES,
             gqa_groups: int | None = None) -> dict[str, Any]:
    """Everything worth knowing about a config's size and cost, as a JSON-serialisable dict.

    Parameters (``parameters``) are unique tensors' elements, as ``DeepseekV2(config).num_parameters()`` counts
    them: a tied LM head is the embedding table and adds nothing (``lm_head`` is then 0).

    Activated parameters per token (``activated``): every attention and norm parameter, the dense FFNs, and in
    each MoE layer the shared experts, the K_r routed experts a token is sent to, and the whole gate (it scores
    all experts). Two totals:

    - ``without_embedding`` excludes ONLY the input embedding table, because looking a row up is not compute.
      The LM head is included: it is a full [vocab, d] matmul for every token. This is the figure the paper
      quotes (V2 20.9B, "21B"; Lite 2.45B, "2.4B"). With tied embeddings the shared matrix counts once, as the
      LM head, so both totals are equal.
    - ``total`` adds the input embedding table (V2 21.4B; Lite 2.66B).

    KV cache (``kv_cache``): elements and bytes per token over all layers, at ``dtype_bytes`` bytes per element
    and at bf16, for the config's own attention (``config``: what dsv2's KVCache really holds: MLA the latent
    c_KV and the RoPE key, (d_c + d_h^R) l; a baseline the keys and values of its KV heads,
    n_kv (qk_nope_head_dim + v_head_dim) l) and for Table 1's four rows with d_h = qk_nope_head_dim. GQA uses
    ``gqa_groups``, else num_key_value_heads when it is below num_attention_heads, else DEFAULT_GQA_GROUPS
    (capped at n_h). ``bytes_at_context`` is one sequence of ``context_len`` tokens.

    FLOPs (``flops``), forward, per token, one multiply-add = 2 FLOPs:

    - ``matmul``: 2 x the activated matmul parameters (``activated.without_embedding`` less norm weights: the
      embedding lookup and the norms are not matmuls; the LM head and the gate are).
    - ``attention``: the score and value products of a token attending to ``context_len`` keys (the last
      token of a context_len-long context), summed over layers: MLA 2 n_h (d_h + d_h^R + v_head_dim) T l on
      the naive path (training/prefill, where each latent is decompressed once by kv_b_proj, counted in
      ``matmul``); baselines 2 n_h (d_h + v_head_dim) T l. ``attention_mean`` is the mean over the tokens of a
      causal context_len-long sequence ((T + 1) / 2 keys), the figure for training cost.
    - ``forward`` = matmul + attention; ``forward_mean`` likewise with ``attention_mean``.
    - MLA only, ``forward_absorbed``: a decode step on the absorbed path. W_UK and W_UV then act on the query
      and the output instead of the keys and values: the same matmul parameters per token, but the scores and
      the weighted sum run in the latent space, 2 n_h (2 d_c + d_h^R) T l: more attention FLOPs per key than
      the naive path, but no per-key decompression. ``forward_naive_decode`` is the decode step that absorption
      replaces: ``forward`` plus kv_b_proj re-applied to the T - 1 cached latents, 2 n_h (d_h + v_head_dim) d_c
      (T - 1) l. Both are None for the baselines.
    """
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    if dtype_bytes < 1:
        raise ValueError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
    parameters, activated, activated_matmul = _parameters(config)
    return {
        "config": _config_summary(config),
        "parameters": parameters,
        "activated": activated,
        "kv_cache": _kv_cache(config, context_len, dtype_bytes, gqa_groups),
        "flops": _flops(config, context_len, activated_matmul),
    }


def _moe_layers(c: ModelConfig) -> int:
    return sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))


def _config_summary(c: ModelConfig) -> dict[str, Any]:
    E, n_moe = c.num_routed, _moe_layers(c)
    return {
        "attention_type": c.attention_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "dense_layers": c.num_hidden_layers - n_moe, "moe_layers": n_moe, "num_attention_heads": c.num_attention_heads,
        "vocab_size": c.vocab_size, "n_routed_experts": E, "n_shared_experts": c.n_shared_experts or 0,
        "num_experts_per_tok": c.num_experts_per_tok if E else 0, "q_lora_rank": c.q_lora_rank,
        "kv_lora_rank": c.kv_lora_rank, "tie_word_embeddings": c.tie_word_embeddings,
    }


def _parameters(c: ModelConfig) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(describe's "parameters", its "activated", the activated matmul parameters: without_embedding less every
    norm weight, what the matmul FLOPs count)."""
    D, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    E, K, F = c.num_routed, c.num_experts_per_tok, c.moe_intermediate_size
    n_moe = _moe_layers(c)
    n_dense = L - n_moe
    attn_mm, attn_norm = _attention_shapes(c)
    attn = attn_mm + attn_norm
    dense_ffn = 3 * D * c.intermediate_size  # SwiGLU: gate_proj, up_proj, down_proj
    expert = 3 * D * F  # one routed expert's slice of gate_up_proj [E, 2F, D] and down_proj [E, D, F]
    shared = 3 * D * (c.n_shared_experts or 0) * F  # one MLP of width n_shared * F
    gate = E * D
    moe_ffn = E * expert + shared + gate
    block_norms = 2 * D  # input_layernorm, post_attention_layernorm
    embedding = V * D
    lm_head = 0 if c.tie_word_embeddings else V * D
    norms = L * (block_norms + attn_norm) + D  # + the final norm
    total = L * (attn + block_norms) + n_dense * dense_ffn + n_moe * moe_ffn + D + embedding + lm_head

    # activated per token
    routed_active = n_moe * K * expert
    act_body = L * (attn + block_norms) + n_dense * dense_ffn + n_moe * (shared + gate) + routed_active + D
    act_without_emb = act_body + V * D  # the LM head matrix, tied or not, is a matmul every token
    act_total = act_without_emb + (0 if c.tie_word_embeddings else embedding)
    parameters = {
        "total": total,
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": L * attn,
        "dense_ffn": n_dense * dense_ffn,
        "routed_experts": n_moe * E * expert,
        "shared_experts": n_moe * shared,
        "gate": n_moe * gate,
        "norms": L * block_norms + D,  # block and final norms; attention's inner norms are in "attention"
        "per_layer": {"attention": attn, "dense_ffn": dense_ffn, "moe_ffn": moe_ffn if n_moe else 0,
                      "routed_expert": expert if n_moe else 0, "norms": block_norms},
    }
    activated = {
        "total": act_total,
        "without_embedding": act_without_emb,
        "attention": L * attn,
        "dense_ffn": n_dense * dense_ffn,
        "routed_experts": routed_active,
        "shared_experts": n_moe * shared,
        "gate": n_moe * gate,
        "lm_head": V * D,
        "fraction_of_total": act_total / total,
    }
    return parameters, activated, act_without_emb - norms


def _kv_cache(c: ModelConfig, context_len: int, dtype_bytes: int, gqa_groups: int | None) -> dict[str, Any]:
    """describe's "kv_cache": the config's own cache and Table 1's four rows."""
    H, L, d_h = c.num_attention_heads, c.num_hidden_layers, c.qk_nope_head_dim
    if gqa_groups is None:
        gqa_groups = c.num_key_value_heads if c.num_key_value_heads < H else min(DEFAULT_GQA_GROUPS, H)
    if c.attention_type == "mla":
        own = (c.kv_lora_rank + c.qk_rope_head_dim) * L
    else:
        own = c.kv_heads * (c.qk_nope_head_dim + c.v_head_dim) * L
    mla = (c.kv_lora_rank + c.qk_rope_head_dim) * L
    mha = 2 * H * d_h * L
    return {
        "dtype_bytes": dtype_bytes,
        "context_len": context_len,
        "config": _kv_entry(own, dtype_bytes, context_len, attention_type=c.attention_type),
        "mla": _kv_entry(mla, dtype_bytes, context_len),
        "mha": _kv_entry(mha, dtype_bytes, context_len),
        "gqa": _kv_entry(2 * gqa_groups * d_h * L, dtype_bytes, context_len, groups=gqa_groups),
        "mqa": _kv_entry(2 * d_h * L, dtype_bytes, context_len),
        "mla_over_mha": mla / mha,
        # Table 1 row "MLA ~ 2.25 groups": the GQA group count whose cache equals MLA's
        "mla_equivalent_gqa_groups": mla / (2 * d_h * L),
    }


def _flops(c: ModelConfig, context_len: int, activated_matmul: int) -> dict[str, Any]:
    """describe's "flops": forward FLOPs per token from the activated matmul parameters and the attention."""
    H, L = c.num_attention_heads, c.num_hidden_layers
    matmul_flops = 2 * activated_matmul
    if c.attention_type == "mla":
        per_key = 2 * H * (c.qk_head_dim + c.v_head_dim) * L
    else:
        per_key = 2 * H * (c.qk_nope_head_dim + c.v_head_dim) * L
    attn_flops = per_key * context_len
    attn_mean = per_key * (context_len + 1) / 2
    flops = {
        "context_len": context_len,
        "matmul": matmul_flops,
        "attention": attn_flops,
        "attention_mean": attn_mean,
        "forward": matmul_flops + attn_flops,
        "forward_mean": matmul_flops + attn_mean,
        "forward_absorbed": None,
        "forward_naive_decode": None,
    }
    if c.attention_type == "mla":
        flops["forward_absorbed"] = matmul_flops + 2 * H * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * L * context_len
        # kv_b_proj re-applied to the context_len - 1 cached latents (the new token's is already in `matmul`)
        kv_b = c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        flops["forward_naive_decode"] = matmul_flops + attn_flops + 2 * kv_b * L * (context_len - 1)
    return flops


# ---------------------------------------------------------------------------------------------------------------
# text report

def _count(n: float) -> str:
    """Decimal units for parameters and FLOPs: 235.7B, 20.9B, 2.45B (three digits below 10, so Lite's 2.4B
    activated is not rounded to 2.5B)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if abs(n) < 10 * scale else 1}f}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    """Binary units for memory: 67.5 KiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:g} B"


def format_info(d: dict[str, Any]) -> str:
    """An aligned text report of a `describe` dict."""
    cfg, p, a, kv, fl = d["config"], d["parameters"], d["activated"], d["kv_cache"], d["flops"]
    moe = (f"{cfg['n_routed_experts']} routed experts (top-{cfg['num_experts_per_tok']}) + "
           f"{cfg['n_shared_experts']} shared" if cfg["n_routed_experts"] else "dense")
    lines = [
        f"{cfg['attention_type'].upper()} attention, {cfg['num_hidden_layers']} layers ({cfg['dense_layers']} dense"
        f" + {cfg['moe_layers']} MoE), d={cfg['hidden_size']}, {cfg['num_attention_heads']} heads, {moe}",
        "",
        "Parameters",
    ]

    def row(label: str, value: str, note: str = "") -> None:
        lines.append(f"  {label:<34}{value:>10}" + (f"   {note}" if note else ""))

    row("total", _count(p["total"]))
    row("embedding", _count(p["embedding"]), "(tied with the LM head)" if cfg["tie_word_embeddings"] else "")
    if p["lm_head"]:
        row("lm_head", _count(p["lm_head"]))
    row("attention", _count(p["attention"]), f"({_count(p['per_layer']['attention'])} per layer)")
    if p["dense_ffn"]:
        row("dense FFN", _count(p["dense_ffn"]), f"({_count(p['per_layer']['dense_ffn'])} per layer)")
    if p["routed_experts"]:
        row("routed experts", _count(p["routed_experts"]), f"({_count(p['per_layer']['routed_expert'])} each)")
        row("shared experts", _count(p["shared_experts"]))
        row("gates", _count(p["gate"]))
    row("norms", _count(p["norms"]))
    lines += ["", "Activated per token"]
    row("without input embedding", _count(a["without_embedding"]), "(LM head included)")
    row("with input embedding", _count(a["total"]), f"({a['fraction_of_total']:.1%} of total)")
    if p["routed_experts"]:
        row("routed experts", _count(a["routed_experts"]))

    bf16 = kv["dtype_bytes"] == BF16_BYTES
    lines += ["", f"KV cache per token ({kv['dtype_bytes']} bytes/element{', bf16' if bf16 else ''}; "
                  f"per sequence at {kv['context_len']} tokens)"]
    lines.append(f"  {'':<18}{'elements':>12}{'bytes':>14}{'sequence':>14}")
    rows = [(f"this model ({kv['config']['attention_type'].upper()})", kv["config"]),
            ("MLA", kv["mla"]), ("MHA", kv["mha"]), (f"GQA ({kv['gqa']['groups']} groups)", kv["gqa"]),
            ("MQA", kv["mqa"])]
    for label, e in rows:
        lines.append(f"  {label:<18}{e['elements_per_token']:>12,}{_bytes(e['bytes_per_token']):>14}"
                     f"{_bytes(e['bytes_at_context']):>14}")
    lines.append(f"  MLA / MHA: {kv['mla_over_mha']:.2%} ({1 / kv['mla_over_mha']:.1f}x smaller); "
                 f"MLA = GQA with {kv['mla_equivalent_gqa_groups']:.2f} groups")

    lines += ["", f"Forward FLOPs per token (context {fl['context_len']})"]
    row("matmuls", _count(fl["matmul"]))
    row("attention (last token)", _count(fl["attention"]))
    row("total (last token)", _count(fl["forward"]))
    row("total (mean over the sequence)", _count(fl["forward_mean"]))
    if fl["forward_absorbed"] is not None:
        row("decode step, absorbed MLA", _count(fl["forward_absorbed"]))
        row("decode step, naive MLA", _count(fl["forward_naive_decode"]), "(re-expands the cached latents)")
    return "\n".join(lines)
