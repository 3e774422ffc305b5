"""The DeepSeek-V2 causal language model: embedding, pre-norm decoder blocks (MLA + MoE/dense FFN), final norm,
LM head. Module names follow the official checkpoints (model.layers.{i}.self_attn.*, .mlp.*, lm_head), so the
Hugging Face layout maps onto the state dict directly; only the routed experts are stacked (see experts.py;
dsv2.checkpoint maps the names, the model never sees a file).

    h = x + Attn(RMSNorm(x));  out = h + FFN(RMSNorm(h))       FFN = MoE or dense SwiGLU (config.is_moe_layer)

`model(input_ids)` returns logits [B, S, vocab]. `return_routing=True` also returns each MoE layer's Routing
(affinities and choices) for the balance losses and metrics. With a cache (model/cache.py: `new_cache` gives the
contiguous one; the engine brings a paged one) the forward appends to it, and the cache picks each token's MLA
path: KVCache takes the absorbed path for single-token decode steps and the naive path otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import build_attention
from .cache import AttentionCache, KVCache, causal_mask
from .lm_loss import lm_loss
from .moe import MoE, TokenDropPolicy, dense_or_moe
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .router import Routing


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = build_attention(config, layer_idx)
        self.mlp = dense_or_moe(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, cache, absorb, token_drop) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, absorb)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h, token_drop)
            return x + y, routing
        return x + self.mlp(h), None


class Decoder(nn.Module):
    """`model.*` in the checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV2(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix (experts and gate included), ones for norms."""
        std = self.config.initializer_range
        for p in self.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    # -------------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A preallocated cache for `max_len` tokens (MLA: the latent only)."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        w = self.model.embed_tokens.weight
        widths = self.model.layers[0].self_attn.cache_widths()
        return KVCache(widths, self.config.num_hidden_layers, batch_size, max_len, dtype or w.dtype,
                       device or w.device)

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: AttentionCache | None = None, pad_mask: torch.Tensor | None = None,
                absorb: bool | None = None, return_routing: bool = False, logits_at: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, token_drop: TokenDropPolicy | None = None, hidden: bool = False):
        """input_ids [B, S] -> logits [B, S, V] (and the MoE layers' routings when return_routing).

        positions [B, S]: RoPE positions (default: after what the cache holds). cache: an AttentionCache
        (model/cache.py), which stores the new tokens' entries and runs their attention. pad_mask [B, S] bool:
        False marks padding (left padding in generation); padded keys are masked out. absorb: force MLA's absorbed
        path on or off (default: the cache decides; without a cache, the naive path). logits_at: only these
        indices of the flattened [B * S] tokens go through the final norm and LM head, logits [len(logits_at), V]
        (generation needs each sequence's last token: arange(B) * S + S - 1). targets [B, S] (the next token at
        each position; lm_loss.IGNORE_INDEX where none): return the mean cross-entropy, an fp32 scalar, in place
        of the logits, by lm_loss (fused with the LM head; no [B, S, V] logits in memory). token_drop: the MoE
        layers' token-dropping policy, applied in training mode only (model/moe.py). hidden: return the final
        norm's output (at logits_at, or [B, S, D]) in place of logits, for a caller that applies the LM head itself
        (the engine's prompt log-probabilities, a chunk of rows at a time).
        """
        B, S = input_ids.shape
        if targets is not None and (targets.shape != input_ids.shape or logits_at is not None):
            raise ValueError(f"targets must have input_ids' shape {tuple(input_ids.shape)} (got "
                             f"{tuple(targets.shape)}) and need no logits_at")
        mask = None
        if cache is not None:
            cache.start(S, pad_mask, absorb)  # the cache decides masks and MLA's path
            if positions is None:
                positions = cache.positions(B, S, input_ids.device)
        else:
            if positions is None:
                positions = torch.arange(S, device=input_ids.device).expand(B, S)
            if pad_mask is not None:
                mask = causal_mask(pad_mask, 0)
        rope = self.rotary(positions)
        x = self.model.embed_tokens(input_ids)
        routings = []
        for layer in self.model.layers:
            x, routing = layer(x, rope, mask, cache, bool(absorb), token_drop)
            if routing is not None:
                routings.append(routing)
        if cache is not None:
            cache.finish(S)
        if logits_at is not None:
            x = x.reshape(B * S, -1)[logits_at]
        if hidden:
            out = self.model.norm(x)
        elif targets is not None:
            out = lm_loss(self.model.norm(x).flatten(0, 1), self.lm_head.weight, targets.flatten())
        else:
            out = self.lm_head(self.model.norm(x))
        return (out, routings) if return_routing else out

    # -------------------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
