"""Multi-head Latent Attention (DeepSeek-V2 Sec. 2.1), and the MHA/GQA/MQA baselines of Table 1.

Shapes follow the legend of dsv2.model.

MLA has ONE module with two paths over the same weights:
- naive (training, prefill): decompress the latent into per-head keys and values with kv_b_proj, then run
  ordinary attention (SDPA). This is what the reference code does at every step.
- absorbed (decode): W_UK is folded into the query (q_nope @ W_UK maps each head's query into the latent
  space) and W_UV is applied after the attention-weighted sum of latents, so per-head keys and values are never
  materialised and each decode step reads only the (C + R)-wide cache.
Both paths give the same outputs (tests/test_attention.py holds them equal).

The module is plain PyTorch. The few methods a device may run faster (`attend`, and the absorbed path's
`absorb_query`, `latent_attention`, `paged_latent_attention`, `apply_w_uv`, `matmul_dtype`, `scores`) are the seam:
dsv2.cpu overrides them in subclasses that it swaps in from outside (dsv2.cpu.optimize). A cache drives the
attention through `naive`, `absorbed`, `absorbed_paged` (MLA) and `attend_kv` (the baselines): model/cache.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


def attend(q_BHSK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTV: torch.Tensor, mask_B1ST: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """Softmax attention by SDPA (its own kernel choice); mask None means causal over S == T. Returns [B, S, H, V]."""
    causal = mask_B1ST is None and q_BHSK.shape[2] > 1
    o = F.scaled_dot_product_attention(q_BHSK, k_BHTK, v_BHTV, attn_mask=mask_B1ST, is_causal=causal,
                                       scale=scale)
    return o.transpose(1, 2)


class MLA(nn.Module):
    """Multi-head latent attention with the official checkpoints' module names."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim = (c.num_attention_heads, c.qk_nope_head_dim,
                                                          c.qk_rope_head_dim, c.v_head_dim)
        self.kv_rank = c.kv_lora_rank
        self.scale = c.softmax_scale
        H, qk = self.n_heads, c.qk_head_dim
        if c.q_lora_rank is None:  # V2-Lite: no query compression
            self.q_proj = nn.Linear(c.hidden_size, H * qk, bias=False)
        else:  # c_Q = W_DQ h -> RMSNorm -> [W_UQ; W_QR] c_Q
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * qk, bias=False)
        # [W_DKV; W_KR] h: the joint KV latent and the one shared RoPE key, in one matmul
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)  # on c_KV only: k_R is never normalised
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)  # [W_UK; W_UV]
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=False)

    def cache_widths(self) -> dict[str, int]:
        """Cached streams in this order: KVCache.joint() rows are [c_KV | k_R], what the absorbed path scores."""
        return {"c_kv": self.kv_rank, "k_pe": self.rope}

    def forward(self, x_BSD, rope, mask_B1ST=None, cache=None, absorb: bool = False) -> torch.Tensor:
        """With a cache, the cache stores the latent and runs the attention (model/cache.py); without one, the
        naive path (or the absorbed one, absorb=True) over these tokens alone."""
        B, S, _ = x_BSD.shape
        cos_BSr, sin_BSr = rope
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope_BSHN, q_pe_BSHR = q.view(B, S, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe_BSHR = apply_rope(q_pe_BSHR, cos_BSr[:, :, None], sin_BSr[:, :, None])

        c_kv_BSC, k_pe_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_rank, self.rope], dim=-1)
        c_kv_BSC = self.kv_a_layernorm(c_kv_BSC)
        k_pe_BSR = apply_rope(k_pe_BSR, cos_BSr, sin_BSr)
        if cache is not None:
            o_BSHV = cache.mla(self, q_nope_BSHN, q_pe_BSHR, c_kv_BSC, k_pe_BSR)
        elif absorb:
            o_BSHV = self.absorbed(q_nope_BSHN, q_pe_BSHR, torch.cat((c_kv_BSC, k_pe_BSR), dim=-1), mask_B1ST)
        else:
            o_BSHV = self.naive(q_nope_BSHN, q_pe_BSHR, c_kv_BSC, k_pe_BSR, mask_B1ST)
        return self.o_proj(o_BSHV.reshape(B, S, self.n_heads * self.v_dim))

    def naive(self, q_nope_BSHN, q_pe_BSHR, c_kv_BTC, k_pe_BTR, mask_B1ST) -> torch.Tensor:
        """Decompress the attended latents into per-head keys and values, then ordinary attention."""
        B, T, _ = c_kv_BTC.shape
        H = self.n_heads
        k_nope_BTHN, v_BTHV = self.kv_b_proj(c_kv_BTC).view(B, T, H, -1).split([self.nope, self.v_dim], dim=-1)
        q_BHSK = torch.cat((q_nope_BSHN, q_pe_BSHR), dim=-1).transpose(1, 2)
        k_BHTK = torch.cat((k_nope_BTHN, k_pe_BTR[:, :, None].expand(B, T, H, self.rope)), dim=-1).transpose(1, 2)
        return self.attend(q_BHSK, k_BHTK, v_BTHV.transpose(1, 2), mask_B1ST, self.scale)

    def absorbed(self, q_nope_BSHN, q_pe_BSHR, kv_BTX, mask_B1ST) -> torch.Tensor:
        """Weight absorption over kv_BTX, the [c_KV | k_R] rows of the attended tokens (X = C + R)."""
        S, H = q_nope_BSHN.shape[1], self.n_heads
        return self._absorb(q_nope_BSHN, q_pe_BSHR,
                            lambda q_BQX: self.latent_attention(q_BQX, kv_BTX, mask_B1ST, S, H))

    def absorbed_paged(self, q_nope_B1HN, q_pe_B1HR, blocks_NbX, table_BM, lens_B) -> torch.Tensor:
        """Weight absorption for one new token per sequence over a paged latent cache: sequence b attends to the
        first lens_B[b] rows of the blocks its row of table_BM lists (blocks_NbX: [blocks, block size, X])."""
        return self._absorb(q_nope_B1HN, q_pe_B1HR,
                            lambda q_BQX: self.paged_latent_attention(q_BQX, blocks_NbX, table_BM, lens_B))

    def _absorb(self, q_nope_BSHN, q_pe_BSHR, attend) -> torch.Tensor:
        """M = B*S query rows per head; each batch row's Q = S*H query rows ordered (s, h); attend(q_BQX) gives
        the attention-weighted latents [B, Q, C]."""
        B, S, H, N = q_nope_BSHN.shape
        C = self.kv_rank
        w_uk_HNC, w_uv_HVC = self.absorb_weights().view(H, N + self.v_dim, -1).split([N, self.v_dim], 1)
        # q_C^T k_C = q_C^T W_UK c_KV = (W_UK^T q_C)^T c_KV: map each head's query into the latent space, then score
        # [q_lat ; q_R] against [c_KV ; k_R] in one matmul (the softmax scale folded into the query)
        q_nope_HMN = q_nope_BSHN.reshape(B * S, H, N).transpose(0, 1)
        q_lat_HMC = self.absorb_query(q_nope_HMN, w_uk_HNC)
        # kv_b_proj may carry low-rank adapters (dsv2.lora: W' = W + s B A): the absorbed weights stay the base's and
        # the adapter adds its rank-r correction, so no per-adapter absorbed copy of W_UK / W_UV is ever made
        adapted = hasattr(self.kv_b_proj, "absorbed_query")
        if adapted:
            q_lat_HMC = q_lat_HMC + self.kv_b_proj.absorbed_query(q_nope_HMN, N, B).to(q_lat_HMC.dtype)
        q_pe_HMR = q_pe_BSHR.reshape(B * S, H, -1).transpose(0, 1).to(q_lat_HMC.dtype)
        q_HMX = torch.cat((q_lat_HMC, q_pe_HMR), dim=-1) * self.scale
        q_BQX = q_HMX.view(H, B, S, -1).permute(1, 2, 0, 3).reshape(B, S * H, -1)
        o_lat_BQC = attend(q_BQX)
        o_lat_HMC = o_lat_BQC.view(B * S, H, C).transpose(0, 1)
        o_HMV = self.apply_w_uv(o_lat_HMC, w_uv_HVC)
        if adapted:
            o_HMV = o_HMV + self.kv_b_proj.absorbed_output(o_lat_HMC, N, B).to(o_HMV.dtype)
        return o_HMV.transpose(0, 1).reshape(B, S, H, -1).to(q_nope_BSHN.dtype)

    # -- the seam (see the module docstring): plain PyTorch here -------------------------------------------------
    def attend(self, q_BHSK, k_BHTK, v_BHTV, mask_B1ST, scale) -> torch.Tensor:
        return attend(q_BHSK, k_BHTK, v_BHTV, mask_B1ST, scale)

    def absorb_weights(self) -> torch.Tensor:
        """kv_b_proj's weight [H (N + V), C] as absorb_query and apply_w_uv take it (per head: W_UK rows, then W_UV)."""
        return self.kv_b_proj.weight

    def absorb_query(self, q_nope_HMN: torch.Tensor, w_uk_HNC: torch.Tensor) -> torch.Tensor:
        """W_UK^T q per head: [H, M, N] x [H, N, C] -> [H, M, C] (the caller casts once)."""
        return torch.bmm(q_nope_HMN, w_uk_HNC.to(q_nope_HMN.dtype))

    def apply_w_uv(self, o_lat_HMC: torch.Tensor, w_uv_HVC: torch.Tensor) -> torch.Tensor:
        """W_UV o per head: [H, M, C] x [H, V, C]^T -> [H, M, V] (the caller casts once)."""
        return torch.bmm(o_lat_HMC, w_uv_HVC.to(o_lat_HMC.dtype).transpose(1, 2))

    def matmul_dtype(self, t: torch.Tensor) -> torch.dtype:
        """The dtype the latent GEMMs compute in: the cache's own here."""
        return t.dtype

    def scores(self, q_BQX: torch.Tensor, kv_BTX: torch.Tensor) -> torch.Tensor:
        """q kv^T per batch row: [B, Q, X] x [B, T, X] -> [B, Q, T]."""
        return torch.bmm(q_BQX, kv_BTX.transpose(1, 2))

    def latent_attention(self, q_BQX, kv_BTX, mask_B1ST, S, H) -> torch.Tensor:
        """softmax(q kv^T) kv[..., :C] by two batched GEMMs (any S: causal over the new tokens when unmasked), in the
        dtype they compute in (the caller casts once)."""
        B, T, C = kv_BTX.shape[0], kv_BTX.shape[1], self.kv_rank
        kv_BTX = kv_BTX.to(self.matmul_dtype(kv_BTX))
        scores_BSHT = self.scores(q_BQX.to(kv_BTX.dtype), kv_BTX).unflatten(1, (S, H)).float()
        if mask_B1ST is not None:
            scores_BSHT = scores_BSHT.masked_fill(~mask_B1ST.transpose(1, 2), float("-inf"))
        elif S > 1:  # causal over the new tokens (no cache)
            causal = torch.ones(S, T, dtype=torch.bool, device=scores_BSHT.device).tril(T - S)
            scores_BSHT = scores_BSHT.masked_fill(~causal[:, None], float("-inf"))
        p_BQT = scores_BSHT.softmax(dim=-1).to(kv_BTX.dtype).view(B, S * H, T)
        return torch.bmm(p_BQT, kv_BTX[..., :C])

    def paged_latent_attention(self, q_BQX, blocks_NbX, table_BM, lens_B) -> torch.Tensor:
        """latent_attention for one token per sequence over a paged cache: here on a gathered copy of each
        sequence's blocks, masked past its length."""
        B, M = table_BM.shape
        kv_BTX = blocks_NbX[table_BM].reshape(B, M * blocks_NbX.shape[1], blocks_NbX.shape[2])
        valid_BT = torch.arange(kv_BTX.shape[1], device=kv_BTX.device) < lens_B[:, None]
        return self.latent_attention(q_BQX, kv_BTX, valid_BT[:, None, None, :], 1, self.n_heads)


class BaselineAttention(nn.Module):
    """MHA / GQA / MQA with the same head dims, for the paper's Table 1 ablations.

    Heads are qk_nope_head_dim wide; RoPE rotates their last qk_rope_head_dim dims. The cache holds full keys
    and values per KV head: 2 * G * d_h elements per token and layer (Table 1) when v_head_dim == d_h.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim, self.rope, self.v_dim = (
            c.num_attention_heads, c.kv_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
        self.scale = c.softmax_scale
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.v_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=False)

    def cache_widths(self) -> dict[str, int]:
        return {"k": self.n_kv * self.head_dim, "v": self.n_kv * self.v_dim}

    def attend(self, q_BHSK, k_BHTK, v_BHTV, mask_B1ST, scale) -> torch.Tensor:
        return attend(q_BHSK, k_BHTK, v_BHTV, mask_B1ST, scale)

    def _rope(self, x_BSHK, cos_BSr, sin_BSr) -> torch.Tensor:
        split = self.head_dim - self.rope
        return torch.cat((x_BSHK[..., :split], apply_rope(x_BSHK[..., split:], cos_BSr[:, :, None],
                                                             sin_BSr[:, :, None])), dim=-1)

    def forward(self, x_BSD, rope, mask_B1ST=None, cache=None, absorb: bool = False) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHK = self._rope(self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim), *rope)
        k_BSW = self._rope(self.k_proj(x_BSD).view(B, S, self.n_kv, self.head_dim), *rope).flatten(2)
        v_BSW = self.v_proj(x_BSD)
        if cache is not None:
            o_BSHV = cache.kv_attention(self, q_BSHK, k_BSW, v_BSW)
        else:
            o_BSHV = self.attend_kv(q_BSHK, k_BSW, v_BSW, mask_B1ST)
        return self.o_proj(o_BSHV.reshape(B, S, self.n_heads * self.v_dim))

    def attend_kv(self, q_BSHK, k_BTW, v_BTW, mask_B1ST) -> torch.Tensor:
        """Attention over T stored keys and values, [B, T, G*K] and [B, T, G*V] (each KV head serves H/G heads)."""
        B, T = k_BTW.shape[:2]
        rep = self.n_heads // self.n_kv
        k_BHTK = k_BTW.view(B, T, self.n_kv, self.head_dim).repeat_interleave(rep, dim=2).transpose(1, 2)
        v_BHTV = v_BTW.view(B, T, self.n_kv, self.v_dim).repeat_interleave(rep, dim=2).transpose(1, 2)
        return self.attend(q_BSHK.transpose(1, 2), k_BHTK, v_BHTV, mask_B1ST, self.scale)


def build_attention(config: ModelConfig, layer_idx: int) -> nn.Module:
    return MLA(config, layer_idx) if config.attention_type == "mla" else BaselineAttention(config, layer_idx)
