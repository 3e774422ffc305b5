"""The preallocated inference cache.

For MLA it holds only the latent (Sec. 2.1.2 and Table 1): per token and layer the normalised c_KV
(kv_lora_rank) and the roped shared key k_R (qk_rope_head_dim), i.e. (d_c + d_h^R) * l elements per token.
The MHA/GQA/MQA baselines store full keys and values per KV head in the same structure, so the two can be
measured side by side.

Left-padded batches: `valid[b, t]` says whether slot t of row b holds a real token; attention masks are built
from it, so prompts of different lengths share one cache with one write position.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class KVCache:
    """Per-layer streams of shape [L, B, max_len, width], written at a shared position `length`."""

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
