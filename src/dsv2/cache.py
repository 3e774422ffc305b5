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
        self.buffers = {name: torch.zeros(num_layers, batch_size, max_len, w, dtype=dtype, device=device)
                        for name, w in widths.items()}
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers (what Table 1 counts, times the dtype size)."""
        return sum(b[:, 0, 0].numel() * b.element_size() for b in self.buffers.values())

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def begin(self, n_new: int, valid: torch.Tensor | None = None) -> None:
        """Reserve `n_new` slots for the next forward; `valid` [B, n_new] marks padding (default: all real)."""
        if self.length + n_new > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} tokens; {self.length} used, {n_new} more asked")
        self.valid[:, self.length:self.length + n_new] = True if valid is None else valid

    def update(self, layer: int, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this forward's entries ([B, S, width] each) for one layer; return the filled prefixes."""
        out = []
        for name, x in new.items():
            buf = self.buffers[name][layer]
            buf[:, self.length:self.length + x.shape[1]] = x
            out.append(buf[:, :self.length + x.shape[1]])
        return tuple(out)

    def advance(self, n_new: int) -> None:
        """Called once after all layers have written `n_new` tokens."""
        self.length += n_new
