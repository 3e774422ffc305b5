"""The CPU versions of the model's modules: subclasses that dsv2.cpu.optimize swaps in (same parameters, same
state-dict names), each overriding only what runs faster on a CPU.

Why each exists:

- Decode (batch-1 and small batches) reads every active weight once per token: it is bound by memory bandwidth,
  and what matters is whether a kernel streams the weights with all cores. MKL serves GEMMs of a few rows from one
  thread, and on CPUs without native bf16 (ops.native_bf16) both MKL and oneDNN emulate bf16. The few-row ops
  (ops.rows_dot, ops.rows_combine, ops.rms_norm) stream fp32 or bf16 weights with all threads; they serve the
  linears, the routed experts of a few token copies (one product per chosen expert, no gathered weight copy) and
  MLA's per-head W_UK/W_UV products. Where the kernels are not built, fp32 linears use oneDNN.
- MLA's absorbed decode attention (ops.mla_decode) makes one pass over the latent cache, where the two batched GEMMs
  it replaces each stream the whole cache.
- Where bf16 GEMMs are emulated, many-row bf16 GEMMs (prefill, training) run in fp32 on the same bf16 values: the
  products are exact in fp32 and accumulation is fp32 either way (as in oneDNN's and cuBLAS's bf16 GEMMs), so only
  the summation order differs. Few rows keep bf16: widening would triple the bytes a bandwidth-bound step reads.
- SDPA's CPU flash kernel (blocked, causal blocks skipped, no [S, T] score matrix) needs equal q/k and v head dims;
  MLA's differ (qk_nope + qk_rope vs v), so the narrower side is zero-padded (zero value dims give zero outputs,
  zero q/k dims add nothing to the scores) and the padding cut off again.
- Without autograd (prefill), the routed experts' grouped GEMMs run in blocks of token copies whose intermediates
  fit the last-level cache, so the down projection reads the activations the gate/up projection just wrote from
  cache; and intermediates are updated in place instead of allocating fresh tens of MB.

One convention throughout: a method takes its fast path when the condition for it holds (CPU tensors, no autograd
graph, few rows, the kernels loaded) and otherwise calls the plain method it overrides (super()). tests/test_cpu.py
holds every fast path equal to the plain model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import MLA, BaselineAttention, attend
from ..model.cache import NO_MASK
from ..model.experts import RoutedExperts, grouped_mm
from ..model.moe import LocalDispatcher
from ..model.norm import RMSNorm
from ..quant.formats import dequantize_blocks
from . import ops

SMALL_ROWS = 16
"""Rows of x per weight matrix (decode: tokens per step) up to which the few-row kernels serve a product: beyond
it a GEMM's reuse of each weight row wins."""
NATIVE_BF16_EXPERT_ROWS = 8
"""SMALL_ROWS for bf16 routed experts where bf16 GEMMs are native (AMX, AVX512-BF16): there a grouped GEMM already
beats the few-row kernel at about 8 copies per expert."""
BLOCK_BYTES = 16 * 2**20
"""Bytes of a block of routed-expert rows (input, [2F] intermediate, activation, output): about a last-level
cache's worth."""
MIN_BLOCK_ROWS = 256
"""Fewest token copies per block: below that the per-block cost of a grouped GEMM call dominates."""

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def no_grad_needed(*tensors: torch.Tensor) -> bool:
    """No autograd graph will be recorded through these tensors: in-place updates and the ops are safe."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for a bf16/fp16 CPU tensor where bf16 matmuls are emulated, else t's dtype."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and not ops.native_bf16():
        return torch.float32
    return t.dtype


def gemm_dtype(x: torch.Tensor, rows: int) -> torch.dtype:
    """The dtype a GEMM with `rows` rows of x computes in: matmul_dtype for many rows, x's own for few."""
    return matmul_dtype(x) if rows > SMALL_ROWS else x.dtype


def few_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The few-row ops apply (the caller checks the row count): CPU inference, fp32/bf16 x, fp32/bf16 or quantized
    (dsv2.quant) weights with contiguous rows, the kernels loaded."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and w.stride(-1) == 1
            and w.dtype in (torch.float32, torch.bfloat16, torch.uint8)
            and x.dtype in (torch.float32, torch.bfloat16) and no_grad_needed(x, w) and ops.available)


def kernel_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor the ops read for a module's weight: its quantized rows (`<name>_q`, uint8 blocked int8/int4 rows:
    dsv2.quant) where it has them, else the parameter itself."""
    q = getattr(module, f"{name}_q", None)
    return q if isinstance(q, torch.Tensor) else getattr(module, name)


def dense(w: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """w as a dense matrix in dtype: quantized rows (uint8, K values each) dequantized, by the C++ kernel on the CPU
    where it is built and takes dtype, else by the reference; a float w cast."""
    if w.dtype != torch.uint8:
        return w.to(dtype)
    if w.device.type == "cpu" and ops.available and dtype in (torch.float32, torch.bfloat16):
        return ops.dequantize(w, K, dtype)
    return dequantize_blocks(w, K, dtype)


@functools.lru_cache(maxsize=64)
def _ends(rows_per_group: int, groups: int) -> torch.Tensor:
    """rows_dot's group ends for `groups` groups of equal size (cached: decode asks for the same few every step)."""
    return torch.arange(1, groups + 1) * rows_per_group


class CpuLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        rows = x.numel() // max(x.shape[-1], 1)
        if rows > SMALL_ROWS:
            dtype = gemm_dtype(x, rows)
            if dtype != x.dtype and w.dtype == x.dtype:
                return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).to(x.dtype)
        elif few_rows(x, w):
            if b is None:
                return ops.rows_dot(x, w)
            return (ops.rows_dot(x.float(), w) + b).to(x.dtype)  # the bias added before rounding
        elif (_ONEDNN and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
              and no_grad_needed(x, w)):
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return super().forward(x)


class CpuRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= SMALL_ROWS * x.shape[-1] and x.dtype == self.weight.dtype and few_rows(x, self.weight):
            return ops.rms_norm(x, self.weight, self.eps)  # decode: one fused call
        return super().forward(x)


class _FlashAttention:
    """attend() for the CPU flash kernel: zero-pad the narrower of q/k and v heads to a common width."""

    def attend(self, q_BHSK, k_BHTK, v_BHTV, mask_B1ST, scale) -> torch.Tensor:
        K, V = q_BHSK.shape[-1], v_BHTV.shape[-1]
        if K == V or q_BHSK.device.type != "cpu":
            return super().attend(q_BHSK, k_BHTK, v_BHTV, mask_B1ST, scale)
        if V < K:
            v_BHTV = F.pad(v_BHTV, (0, K - V))
        else:
            q_BHSK, k_BHTK = F.pad(q_BHSK, (0, V - K)), F.pad(k_BHTK, (0, V - K))
        return attend(q_BHSK, k_BHTK, v_BHTV, mask_B1ST, scale)[..., :V]


class CpuBaselineAttention(_FlashAttention, BaselineAttention):
    pass


class CpuMLA(_FlashAttention, MLA):
    def absorb_weights(self) -> torch.Tensor:
        return kernel_weight(self.kv_b_proj)  # quantized rows are read in place (or dequantized below)

    def absorb_query(self, q_nope_HMN: torch.Tensor, w_uk_HNC: torch.Tensor) -> torch.Tensor:
        quantized = w_uk_HNC.dtype == torch.uint8
        if q_nope_HMN.shape[1] <= SMALL_ROWS and few_rows(q_nope_HMN, w_uk_HNC):
            return ops.rows_combine(q_nope_HMN.transpose(1, 2).float(), w_uk_HNC, self.kv_rank if quantized else 0)
        dtype = matmul_dtype(q_nope_HMN)
        return super().absorb_query(q_nope_HMN.to(dtype), dense(w_uk_HNC, self.kv_rank, dtype))

    def apply_w_uv(self, o_lat_HMC: torch.Tensor, w_uv_HVC: torch.Tensor) -> torch.Tensor:
        G, M, C = o_lat_HMC.shape
        if M <= SMALL_ROWS and few_rows(o_lat_HMC, w_uv_HVC):
            return ops.rows_dot(o_lat_HMC.reshape(G * M, -1).float(), w_uv_HVC, _ends(M, G)).view(G, M, -1)
        dtype = matmul_dtype(o_lat_HMC)
        return super().apply_w_uv(o_lat_HMC.to(dtype), dense(w_uv_HVC, C, dtype))

    def matmul_dtype(self, t: torch.Tensor) -> torch.dtype:
        return matmul_dtype(t)

    def scores(self, q_BQX: torch.Tensor, kv_BTX: torch.Tensor) -> torch.Tensor:
        # with few query rows, batched GEMM streams the cache at a fraction of the rate of oneDNN's inner product
        # with the cache as its many-row input
        if (_ONEDNN and kv_BTX.device.type == "cpu" and q_BQX.dtype == kv_BTX.dtype == torch.float32
                and q_BQX.shape[1] <= SMALL_ROWS and no_grad_needed(q_BQX, kv_BTX)):
            q_BQX = q_BQX.contiguous()  # a strided "weight" makes oneDNN reorder it at every call
            return torch.stack([torch.ops.mkldnn._linear_pointwise(kv_BTX[b], q_BQX[b], None, "none", [], "")
                                for b in range(q_BQX.shape[0])]).transpose(1, 2)
        return super().scores(q_BQX, kv_BTX)

    def latent_attention(self, q_BQX, kv_BTX, mask_B1ST, S, H) -> torch.Tensor:
        if (S == 1 and kv_BTX.device.type == "cpu" and kv_BTX.stride(-1) == 1 and no_grad_needed(q_BQX, kv_BTX)
                and kv_BTX.dtype in (torch.float32, torch.bfloat16, torch.float16) and ops.available):
            mask = NO_MASK if mask_B1ST is None else mask_B1ST[:, 0, 0, :].contiguous()
            return ops.mla_decode(q_BQX.float().contiguous(), kv_BTX, mask, self.kv_rank)
        return super().latent_attention(q_BQX, kv_BTX, mask_B1ST, S, H)

    def paged_latent_attention(self, q_BQX, blocks_NbX, table_BM, lens_B) -> torch.Tensor:
        # the kernel reads each sequence's blocks in place through its table: no gathered copy of the cache
        if (blocks_NbX.device.type == "cpu" and blocks_NbX.is_contiguous() and no_grad_needed(q_BQX, blocks_NbX)
                and blocks_NbX.dtype in (torch.float32, torch.bfloat16, torch.float16) and ops.available):
            return ops.mla_decode_paged(q_BQX.float().contiguous(), blocks_NbX, table_BM, lens_B, self.kv_rank)
        return super().paged_latent_attention(q_BQX, blocks_NbX, table_BM, lens_B)


class CpuRoutedExperts(RoutedExperts):
    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        w_up, w_down = self.stacked("gate_up_proj"), self.stacked("down_proj")
        if few_rows(x_ND, w_up) and x_ND.shape[0] <= self._per_expert_rows() * int((counts_E > 0).sum()):
            ends_E = counts_E.cumsum(0)  # decode: each chosen expert's weights read once, in place
            gate_NF, up_NF = ops.rows_dot(x_ND, w_up, ends_E).chunk(2, dim=-1)
            return ops.rows_dot(self.act(gate_NF) * up_NF, w_down, ends_E)
        ends_E = counts_E.cumsum(0)
        dtype = gemm_dtype(x_ND, x_ND.shape[0] // self.n_experts)  # each widened expert serves enough copies
        w_up_EDX, w_down_EFD = (w.to(dtype).transpose(-2, -1) for w in (w_up, w_down))
        N = x_ND.shape[0]
        block = self._block_rows(x_ND, dtype)
        if block >= N:
            return self.swiglu(x_ND.to(dtype), w_up_EDX, w_down_EFD, ends_E.to(torch.int32)).to(x_ND.dtype)
        y_ND = torch.empty_like(x_ND)
        for s in range(0, N, block):  # a block's group ends: experts outside it get no rows (skipped)
            e = min(N, s + block)
            ends_b = (ends_E.clamp(s, e) - s).to(torch.int32)
            y_ND[s:e] = self.swiglu(x_ND[s:e].to(dtype), w_up_EDX, w_down_EFD, ends_b)
        return y_ND

    def grouped(self, x_NK: torch.Tensor, name: str, counts_E: torch.Tensor) -> torch.Tensor:
        w = self.stacked(name)
        if few_rows(x_NK, w) and x_NK.shape[0] <= self._per_expert_rows() * int((counts_E > 0).sum()):
            return ops.rows_dot(x_NK, w, counts_E.cumsum(0))
        dtype = gemm_dtype(x_NK, x_NK.shape[0] // self.n_experts)
        return grouped_mm(x_NK.to(dtype), w.to(dtype).transpose(-2, -1), counts_E.cumsum(0).to(torch.int32)
                          ).to(x_NK.dtype)

    def _per_expert_rows(self) -> int:
        """Copies per chosen expert up to which the few-row kernels beat a grouped GEMM."""
        return (NATIVE_BF16_EXPERT_ROWS if self.gate_up_proj.dtype == torch.bfloat16 and ops.native_bf16()
                else SMALL_ROWS)

    def gated(self, gate_NF: torch.Tensor, up_NF: torch.Tensor) -> torch.Tensor:
        if no_grad_needed(gate_NF, up_NF):
            return self.act(gate_NF).mul_(up_NF)
        return super().gated(gate_NF, up_NF)

    def _block_rows(self, x_ND: torch.Tensor, dtype: torch.dtype) -> int:
        """Copies per block: all of them with autograd or off the CPU; else as many as fit BLOCK_BYTES."""
        if x_ND.device.type != "cpu" or not no_grad_needed(x_ND, self.gate_up_proj):
            return x_ND.shape[0]
        row_bytes = (2 * self.hidden + 3 * self.inter) * torch.finfo(dtype).bits // 8
        return max(MIN_BLOCK_ROWS, BLOCK_BYTES // row_bytes)


class CpuLocalDispatcher(LocalDispatcher):
    def weigh(self, y_ND: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
        if no_grad_needed(y_ND, w_N):  # prefill: no fresh [N, D] copy
            return y_ND.mul_(w_N[:, None])
        return super().weigh(y_ND, w_N)


SWAPS: dict[type, type] = {nn.Linear: CpuLinear, RMSNorm: CpuRMSNorm, MLA: CpuMLA,
                           BaselineAttention: CpuBaselineAttention, RoutedExperts: CpuRoutedExperts}
"""The plain module classes and the CPU classes optimize() gives them."""
