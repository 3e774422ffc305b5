"""The seam between the model and an inference cache, and the simplest cache: one preallocated block per batch.

The model never manages a cache. It calls, per forward, `cache.start(...)` and `cache.finish(...)`, and in each
attention layer `cache.mla(...)` (MLA) or `cache.kv_attention(...)` (the baselines), handing over the layer's
queries and new cache entries: the cache stores the entries and runs the attention over what it holds, by the
layer's own methods (MLA.naive / MLA.absorbed / MLA.paged_latent_attention, BaselineAttention.attend_kv). A fused
decode step (dsv2.cpu.decode_step) bypasses the layers and asks a cache for its rows instead (`latent_decode`). So a
cache decides its layout and which path each token takes: KVCache below (contiguous, left-padded batches, the
absorbed path for single-token steps) for dsv2.generate, the engine's paged cache (dsv2/inference/engine) for
ragged batches.

What is cached: for MLA only the latent (Sec. 2.1.2 and Table 1): per token and layer the normalised c_KV
(kv_lora_rank) and the roped shared key k_R (qk_rope_head_dim), i.e. (d_c + d_h^R) * l elements per token. The
MHA/GQA/MQA baselines store full keys and values per KV head in the same structure, so the two can be measured
side by side.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch


class AttentionCache(Protocol):
    """What DeepseekV2.forward and its attention layers ask of a cache."""

    def start(self, n_new: int, pad_mask: torch.Tensor | None, absorb: bool | None) -> None:
        """Before a forward of n_new tokens per batch row."""

    def positions(self, batch_size: int, n_new: int, device: torch.device) -> torch.Tensor:
        """RoPE positions [B, S] of the new tokens when the caller gives none."""

    def mla(self, attn: Any, q_nope_BSHN, q_pe_BSHR, c_kv_BSC, k_pe_BSR) -> torch.Tensor:
        """Store one MLA layer's new entries and return its attention output [B, S, H, V]."""

    def kv_attention(self, attn: Any, q_BSHK, k_BSW, v_BSW) -> torch.Tensor:
        """Store one baseline layer's new keys and values ([B, S, G*K], [B, S, G*V]) and attend: [B, S, H, V]."""

    def finish(self, n_new: int) -> None:
        """After the forward."""


def causal_mask(valid_BT: torch.Tensor, start: int) -> torch.Tensor:
    """[B, 1, S, T] bool: query i (slot start+i) sees valid keys at slots <= its own, and always itself (so a
    padding query has a finite softmax; its output is never used)."""
    T = valid_BT.shape[1]
    q_S = torch.arange(start, T, device=valid_BT.device)[:, None]
    k_T = torch.arange(T, device=valid_BT.device)[None, :]
    return (valid_BT[:, None, None, :] & (k_T <= q_S)) | (k_T == q_S)


class LatentDecode(NamedTuple):
    """One MLA layer's cache as a fused decode step (dsv2.cpu.decode_step) reads it, for a step of one new token
    per sequence, between start() and finish(): the new tokens' rows go to `slots` [B] of `rows` [*, X] (the
    layer's slots, flat); then they attend either to kv [B, T, X] under mask [B, T] (or an empty mask: every
    slot) for a contiguous cache, or to kv = the blocks [N, S, X] through table [B, M] and lens [B] (paged)."""

    rows: torch.Tensor
    slots: torch.Tensor
    kv: torch.Tensor
    mask: torch.Tensor
    table: torch.Tensor | None
    lens: torch.Tensor | None


NO_MASK = torch.empty(0, dtype=torch.bool)


class CacheFullError(RuntimeError):
    pass


class KVCache:
    """Per-layer streams of shape [L, B, max_len, width], written at a shared position `length`.

    Left-padded batches: `valid[b, t]` says whether slot t of row b holds a real token; attention masks are built
    from it, so prompts of different lengths share one cache with one write position."""

    def __init__(self, widths: dict[str, int], num_layers: int, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.widths = dict(widths)
        self.max_len = max_len
        # One row per token and layer holds every stream side by side ([c_KV | k_R] for MLA): MLA's absorbed
        # decode scores its queries against both in one matmul over `joint(layer)`. `buffers` are views per stream.
        self.storage = torch.zeros(num_layers, batch_size, max_len, sum(self.widths.values()), dtype=dtype,
                                   device=device)
        self.buffers: dict[str, torch.Tensor] = {}
        start = 0
        for name, w in self.widths.items():  # plain slices (not split()'s multi-output views): writable in any mode
            self.buffers[name] = self.storage[..., start:start + w]
            start += w
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.padded = False  # some slot holds padding: attention needs an explicit mask (see DeepseekV2.forward)
        self._slots_at, self._slots = -1, None  # latent_decode's write slots, for the step at length _slots_at

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers (what Table 1 counts, times the dtype size)."""
        return self.storage[:, 0, 0].numel() * self.storage.element_size()

    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def begin(self, n_new: int, valid: torch.Tensor | None = None) -> None:
        """Reserve `n_new` slots for the next forward; `valid` [B, n_new] marks padding (default: all real)."""
        if self.length + n_new > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} tokens; {self.length} used, {n_new} more asked")
        self.valid[:, self.length:self.length + n_new] = True if valid is None else valid
        if valid is not None and not self.padded:
            self.padded = not bool(valid.all())

    def update(self, layer: int, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this forward's entries ([B, S, width] each) for one layer; return the filled prefixes."""
        out = []
        for name, x in new.items():
            buf = self.buffers[name][layer]
            buf[:, self.length:self.length + x.shape[1]] = x
            out.append(buf[:, :self.length + x.shape[1]])
        return tuple(out)

    def joint(self, layer: int, end: int) -> torch.Tensor:
        """All streams of one layer's first `end` slots side by side, in `widths` order: [B, end, sum(widths)]."""
        return self.storage[layer, :, :end]

    def advance(self, n_new: int) -> None:
        """Called once after all layers have written `n_new` tokens."""
        self.length += n_new

    # -- AttentionCache ------------------------------------------------------------------------------------------
    def start(self, n_new: int, pad_mask: torch.Tensor | None, absorb: bool | None) -> None:
        start = self.length
        self.begin(n_new, pad_mask)
        # no padding in the cache: a fresh prefill is plain causal and a single new token sees every slot, so
        # attention takes no mask (SDPA's causal kernel; no [B, 1, S, T] tensor built per step)
        self._mask = (causal_mask(self.valid[:, : start + n_new], start)
                      if self.padded or (start > 0 and n_new > 1) else None)
        self._absorb = n_new == 1 if absorb is None else absorb  # weight absorption for decode steps

    def positions(self, batch_size: int, n_new: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + n_new, device=device).expand(batch_size, n_new)

    def mla(self, attn, q_nope_BSHN, q_pe_BSHR, c_kv_BSC, k_pe_BSR) -> torch.Tensor:
        c_kv_BTC, k_pe_BTR = self.update(attn.layer_idx, c_kv=c_kv_BSC, k_pe=k_pe_BSR)
        if self._absorb:
            return attn.absorbed(q_nope_BSHN, q_pe_BSHR, self.joint(attn.layer_idx, c_kv_BTC.shape[1]), self._mask)
        return attn.naive(q_nope_BSHN, q_pe_BSHR, c_kv_BTC, k_pe_BTR, self._mask)

    def kv_attention(self, attn, q_BSHK, k_BSW, v_BSW) -> torch.Tensor:
        k_BTW, v_BTW = self.update(attn.layer_idx, k=k_BSW, v=v_BSW)
        return attn.attend_kv(q_BSHK, k_BTW, v_BTW, self._mask)

    def latent_decode(self, layer: int) -> LatentDecode:
        _, B, M, X = self.storage.shape
        if self._slots_at != self.length:  # the same for every layer of a step
            self._slots_at, self._slots = self.length, torch.arange(B, device=self.storage.device) * M + self.length
        store = self.storage[layer]
        mask = self.valid[:, : self.length + 1] if self.padded else NO_MASK
        return LatentDecode(store.view(B * M, X), self._slots, store[:, : self.length + 1], mask, None, None)

    def finish(self, n_new: int) -> None:
        self.advance(n_new)
