"""The paged cache and one engine step's ragged batch as the model's attention sees it.

PagedCache: per layer, `num_blocks` blocks of `block_size` slots; a slot holds one token's row, for MLA the
normalised c_KV and the roped k_R side by side ([c_KV | k_R], 576 values for V2), for the MHA/GQA/MQA baselines
the keys and values of every KV head, so the two compare under one memory budget.

StepBatch: the tokens of every sequence scheduled in a step, packed into one flat batch [1, N] with no padding.
It is the step's AttentionCache (dsv2/model/cache.py): each attention layer hands it its queries and new entries,
and it writes the entries into their slots (the slot mapping), then attends: a segment that continues a prompt
(a prefill chunk) attends to the sequence's cached prefix plus itself, over a gathered copy of its rows, on the
naive path (or the absorbed one, for a short chunk after a long prefix); the decode tokens (one new token of a
sequence with a cache) all at once on the absorbed path, straight from the blocks through their block tables
(MLA.absorbed_paged; on CPU a kernel that reads the blocks in place).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...model.cache import NO_MASK, LatentDecode, causal_mask


def cache_widths(model) -> dict[str, int]:
    return model.model.layers[0].self_attn.cache_widths()


class PagedCache:
    def __init__(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.widths = cache_widths(model)
        self.width = sum(self.widths.values())
        self.num_blocks, self.block_size = num_blocks, block_size
        self.storage = torch.zeros(model.config.num_hidden_layers, num_blocks, block_size, self.width, dtype=dtype,
                                   device=device)

    @staticmethod
    def bytes_per_token(model, dtype: torch.dtype) -> int:
        """Cache bytes one token takes across all layers (what the paper's Table 1 counts, times the dtype)."""
        return model.config.num_hidden_layers * sum(cache_widths(model).values()) * torch.finfo(dtype).bits // 8

    @classmethod
    def blocks_for(cls, model, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
        return budget_bytes // (cls.bytes_per_token(model, dtype) * block_size)

    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def copy_block(self, src: int, dst: int) -> None:
        """Every layer's rows of block src into block dst (copy-on-write of a shared, partly filled block)."""
        self.storage[:, dst] = self.storage[:, src]


@dataclass
class Segment:
    """One sequence's part of a step: flat tokens [start, start + n_new), after n_cached tokens already in the
    cache, in the blocks of `table`."""

    start: int
    n_new: int
    n_cached: int
    table: list[int]

    @property
    def is_decode(self) -> bool:
        return self.n_new == 1 and self.n_cached > 0


class StepBatch:
    def __init__(self, cache: PagedCache, segments: list[Segment], device: torch.device):
        self.cache = cache
        bs = cache.block_size
        self.segments = segments
        self.n_tokens = sum(s.n_new for s in segments)
        positions, slots = [], []
        for s in segments:
            for p in range(s.n_cached, s.n_cached + s.n_new):
                positions.append(p)
                slots.append(s.table[p // bs] * bs + p % bs)
        self._positions = torch.tensor(positions, device=device)[None]
        self.slots = torch.tensor(slots, device=device)
        decode = [s for s in segments if s.is_decode]
        self.prefill = [s for s in segments if not s.is_decode]
        self.decode_rows = torch.tensor([s.start for s in decode], dtype=torch.long, device=device)
        if decode:
            width = max(len(s.table) for s in decode)
            self.decode_table = torch.tensor([s.table + [0] * (width - len(s.table)) for s in decode],
                                             dtype=torch.long, device=device)
            self.decode_lens = torch.tensor([s.n_cached + 1 for s in decode], dtype=torch.long, device=device)
        self._context: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # per segment, built when needed

    # -- AttentionCache (dsv2/model/cache.py) --------------------------------------------------------------------
    def start(self, n_new: int, pad_mask, absorb) -> None:
        if n_new != self.n_tokens or pad_mask is not None:
            raise ValueError("a StepBatch runs its own flat batch of tokens, unpadded")

    def positions(self, batch_size: int, n_new: int, device) -> torch.Tensor:
        return self._positions

    def finish(self, n_new: int) -> None:
        pass

    def _rows(self, layer: int) -> torch.Tensor:
        return self.cache.storage[layer].view(-1, self.cache.width)

    def mla(self, attn, q_nope_BSHN, q_pe_BSHR, c_kv_BSC, k_pe_BSR) -> torch.Tensor:
        rows = self._rows(attn.layer_idx)
        rows[self.slots] = torch.cat((c_kv_BSC[0], k_pe_BSR[0]), dim=-1).to(rows.dtype)
        out = q_nope_BSHN.new_empty(*q_nope_BSHN.shape[:3], attn.v_dim)
        if self.decode_rows.numel():
            d = self.decode_rows
            with _adapter_rows(attn, d):
                o = attn.absorbed_paged(q_nope_BSHN[0, d][:, None], q_pe_BSHR[0, d][:, None],
                                        self.cache.storage[attn.layer_idx], self.decode_table, self.decode_lens)
            out[0, d] = o[:, 0].to(out.dtype)
        # a chunk after a cached prefix: absorption costs n_new * (C + R + C) multiply-adds per head and cached
        # token, decompressing the prefix C * (N + V): the cheaper one (a chunk of a few tokens after a long
        # cached prompt, e.g. the last block of a prefix-cache hit, is absorbed)
        absorb_below = attn.kv_rank * (attn.nope + attn.v_dim) / (2 * attn.kv_rank + attn.rope)
        for s in self.prefill:
            ctx, mask = self._gathered(s)
            kv_TX = rows[ctx].to(q_nope_BSHN.dtype)
            span = slice(s.start, s.start + s.n_new)
            with _adapter_rows(attn, [s.start]):
                out[:, span] = self._prefill(attn, q_nope_BSHN[:, span], q_pe_BSHR[:, span], kv_TX, mask,
                                             bool(s.n_cached) and s.n_new < absorb_below)
        return out

    @staticmethod
    def _prefill(attn, q_nope_BSHN, q_pe_BSHR, kv_TX, mask, absorb: bool) -> torch.Tensor:
        if absorb:
            return attn.absorbed(q_nope_BSHN, q_pe_BSHR, kv_TX[None], mask)
        c_kv_TC, k_pe_TR = kv_TX.split([attn.kv_rank, attn.rope], dim=-1)
        return attn.naive(q_nope_BSHN, q_pe_BSHR, c_kv_TC[None], k_pe_TR[None], mask)

    def kv_attention(self, attn, q_BSHK, k_BSW, v_BSW) -> torch.Tensor:
        rows = self._rows(attn.layer_idx)
        rows[self.slots] = torch.cat((k_BSW[0], v_BSW[0]), dim=-1).to(rows.dtype)
        out = q_BSHK.new_empty(*q_BSHK.shape[:3], attn.v_dim)
        k_width = k_BSW.shape[-1]
        if self.decode_rows.numel():  # the baselines have no paged kernel: decodes over their gathered blocks
            d = self.decode_rows
            blocks = self.cache.storage[attn.layer_idx]
            kv_BTW = blocks[self.decode_table].flatten(1, 2)
            valid_B11T = (torch.arange(kv_BTW.shape[1], device=d.device) < self.decode_lens[:, None])[:, None, None]
            k_BTW, v_BTW = kv_BTW.split([k_width, kv_BTW.shape[-1] - k_width], dim=-1)
            o = attn.attend_kv(q_BSHK[0, d][:, None], k_BTW.to(q_BSHK.dtype), v_BTW.to(q_BSHK.dtype), valid_B11T)
            out[0, d] = o[:, 0]
        for s in self.prefill:
            ctx, mask = self._gathered(s)
            k_TW, v_TW = rows[ctx].to(q_BSHK.dtype).split([k_width, rows.shape[-1] - k_width], dim=-1)
            span = slice(s.start, s.start + s.n_new)
            out[:, span] = attn.attend_kv(q_BSHK[:, span], k_TW[None], v_TW[None], mask)
        return out

    def latent_decode(self, layer: int) -> LatentDecode:
        """The fused decode step's view of one layer (a step of decode tokens only: `decode_only`)."""
        blocks = self.cache.storage[layer]
        return LatentDecode(blocks.view(-1, self.cache.width), self.slots, blocks, NO_MASK, self.decode_table,
                            self.decode_lens)

    @property
    def decode_only(self) -> bool:
        """Every segment is one new token after a cached prefix (its rows are then in segment order)."""
        return not self.prefill

    def _gathered(self, s: Segment) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots of a prefill segment's whole context (cached prefix and new tokens) and its attention mask:
        causal over the new tokens after the prefix (None where that is plain causal attention: no prefix)."""
        if s.start not in self._context:
            bs, T, device = self.cache.block_size, s.n_cached + s.n_new, self.slots.device
            ctx = torch.tensor([s.table[p // bs] * bs + p % bs for p in range(T)], device=device)
            mask = None
            if s.n_cached:
                mask = causal_mask(torch.ones(1, T, dtype=torch.bool, device=device), s.n_cached)
            self._context[s.start] = (ctx, mask)
        return self._context[s.start]


def _adapter_rows(attn, token_B) -> contextlib.AbstractContextManager:
    """An adapter on kv_b_proj (dsv2.lora) applies per sequence, and an attention call's batch rows are some of the
    step's sequences: name them (token_B: a token of each) for the adapter's rows."""
    lora = getattr(attn, "kv_b_proj", None) and getattr(attn.kv_b_proj, "lora", None)
    return lora.rows.call(token_B) if lora is not None else contextlib.nullcontext()
