"""Inference fast paths for small batches (decode), each falling back to the plain PyTorch op it replaces.

Batch-1 decode reads every active weight once per token: it is bound by memory bandwidth, and what matters is
whether a kernel streams weights with all cores. Measured on an AVX2 2-core EPYC (torch 2.13, cold weights, GB/s
of weights read; a plain sum reads 20-30 there, depending on the host's other tenants):

- few-row products (`linear`, `heads_xwt`, `heads_xw`, `small_batch_swiglu`; kernels/few_rows.cpp): MKL's sgemm
  serves 1-16 rows from one thread (1 row: 9-14 GB/s, 8 rows: 3-6) and oneDNN's inner product reaches 12-19 at 1
  row and 6-9 at 8; on CPUs without native bf16 both emulate bf16 (8 rows: 2 GB/s). The kernels stream fp32 or bf16
  weights with all threads, widening bf16 in registers (1 row: 15-20 in both dtypes; 8 rows: 9-14 / 8-10). They
  serve the linears, the routed experts of a few token copies (one GEMV per chosen expert in one parallel loop: no
  gathered weight copy, no Python loop over experts) and MLA's per-head W_UK/W_UV products. Where the kernels
  cannot be built, fp32 linears use oneDNN and the rest keeps its PyTorch op.
- `latent_attention`: MLA's absorbed decode attention in one pass over the latent cache (kernels/mla_decode.cpp,
  flash-decoding on CPU threads): the two batched GEMMs it replaces each stream the whole cache, the second with
  MKL's single-threaded few-row kernel. It is faster from the shortest caches on.
- `matmul_dtype`/`gemm_dtype`: on CPUs without native bf16 matmul, many-row bf16 GEMMs (prefill) and the absorbed
  attention's GEMM fallback run in fp32 on the same bf16 values (bf16 prefill at 2K tokens ~5x faster on an AVX2
  EPYC).

The kernels are built once per machine with torch's C++ extension loader (about a minute; cached under
~/.cache/torch_extensions) by kernels/build.py, which no killed process can leave waiting; without a compiler, or
with DSV2_NO_KERNELS=1, every op keeps its fallback. None of
them runs under autograd or a dispatch mode. tests/test_fastpath.py holds each fast path equal to its fallback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import build as kernel_build

SMALL_ROWS = 16
"""Rows of x per weight matrix (decode: tokens per step) up to which CPU inference uses the few-row kernels."""

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _cpu_native_low_precision() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # unknown: leave dtypes alone
        return True


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for a bf16/fp16 CPU tensor when the CPU has no native low-precision matmul (AVX512-BF16 or AMX): there
    those GEMMs are emulated, several times slower than fp32. For MLA's absorbed attention over a long cache, which
    is compute-bound, upcasting the cache slice costs less than the emulation."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and not _cpu_native_low_precision():
        return torch.float32
    return t.dtype


def plain_eager() -> bool:
    """No dispatch mode (FlopCounterMode, fake tensors, profilers' modes) and no tracing: the fast paths call
    kernels that such modes cannot count or trace, so under them every op takes its reference form."""
    return torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling()


def no_grad_needed(*tensors: torch.Tensor) -> bool:
    """No autograd graph will be recorded through these tensors: in-place updates and non-differentiable kernels
    are safe."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def gemm_dtype(x: torch.Tensor, rows: int) -> torch.dtype:
    """The dtype a GEMM with `rows` rows of x should compute in: fp32 for bf16/fp16 on CPUs without native
    low-precision matmul once there are enough rows to amortise widening the weights (prefill, training): the
    products of bf16 values are exact in fp32 and accumulation is fp32 either way (as in oneDNN's and cuBLAS's bf16
    GEMMs), so only the summation order differs, at fp32 speed instead of the emulated bf16 rate (~6x slower here).
    Few rows (decode) read each weight once: widening would triple the bytes moved, so they keep x.dtype."""
    return matmul_dtype(x) if rows > SMALL_ROWS else x.dtype


def _few_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The few-row kernels apply (the caller checks the row count against SMALL_ROWS: beyond it a GEMM's reuse of
    each weight row wins): CPU inference outside any dispatch mode, fp32/bf16 weights with contiguous rows, and the
    kernels build."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and w.stride(-1) == 1
            and w.dtype in (torch.float32, torch.bfloat16) and x.is_floating_point() and no_grad_needed(x, w)
            and plain_eager() and _kernels() is not None)


@functools.lru_cache(maxsize=64)
def _ends(rows_per_group: int, groups: int) -> torch.Tensor:
    """rows_dot's group ends for `groups` groups of equal size (cached: decode asks for the same few every step)."""
    return torch.arange(1, groups + 1) * rows_per_group


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with few-row CPU inference calls served by the few-row kernel (oneDNN for fp32 where it cannot be
    built) and many-row bf16 calls computed in fp32 where bf16 GEMMs are emulated (see the module docstring)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > SMALL_ROWS:
        dtype = gemm_dtype(x, rows)
        if dtype != x.dtype and weight.dtype == x.dtype:
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).to(x.dtype)
    elif _few_rows(x, weight):
        if bias is None:
            return _kernels().rows_dot(x, weight)
        return (_kernels().rows_dot(x.float(), weight) + bias).to(x.dtype)  # the bias added before rounding
    elif (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and no_grad_needed(x, weight) and plain_eager()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """dsv2.attention.RMSNorm's output for a few rows by the C++ kernel (decode: one fused call instead of a handful
    of ops on a 1-row tensor), or None where it does not apply."""
    if x.numel() > SMALL_ROWS * x.shape[-1] or x.dtype != weight.dtype or not _few_rows(x, weight):
        return None
    return _kernels().rms_norm(x, weight, eps)


def heads_xwt(x_GMK: torch.Tensor, w_GRK: torch.Tensor) -> torch.Tensor:
    """x @ w^T per group ([G, M, K] x [G, R, K] -> [G, M, R]: MLA's W_UV per head), in fp32 by the few-row kernel
    for few rows, else by bmm in matmul_dtype (the caller casts once)."""
    G, M, _ = x_GMK.shape
    if M <= SMALL_ROWS and _few_rows(x_GMK, w_GRK):
        return _kernels().rows_dot(x_GMK.reshape(G * M, -1).float(), w_GRK, _ends(M, G)).view(G, M, -1)
    dtype = matmul_dtype(x_GMK)
    return torch.bmm(x_GMK.to(dtype), w_GRK.to(dtype).transpose(1, 2))


def heads_xw(x_GMN: torch.Tensor, w_GNC: torch.Tensor) -> torch.Tensor:
    """x @ w per group ([G, M, N] x [G, N, C] -> [G, M, C]: MLA's W_UK absorbed into each head's query), in fp32 by
    the few-row kernel for few rows, else by bmm in matmul_dtype (the caller casts once)."""
    if x_GMN.shape[1] <= SMALL_ROWS and _few_rows(x_GMN, w_GNC):
        return _kernels().rows_combine(x_GMN.transpose(1, 2).float(), w_GNC)
    dtype = matmul_dtype(x_GMN)
    return torch.bmm(x_GMN.to(dtype), w_GNC.to(dtype))


def scores(q_BKX: torch.Tensor, kv_BTX: torch.Tensor) -> torch.Tensor:
    """q @ kv^T per batch row: [B, K, X] x [B, T, X] -> [B, K, T] (the absorbed attention's GEMM fallback: K query
    rows, T cached tokens). With few query rows, batched GEMM streams the cache at a third of the rate of oneDNN's
    inner product with the cache as its many-row input (measured 3.6 vs 10.2 GB/s at T=8K, K=8, X=576, 2 threads)."""
    if (_ONEDNN and kv_BTX.device.type == "cpu" and q_BKX.dtype == kv_BTX.dtype == torch.float32
            and q_BKX.shape[1] <= SMALL_ROWS and no_grad_needed(q_BKX, kv_BTX) and plain_eager()):
        q_BKX = q_BKX.contiguous()  # a strided "weight" makes oneDNN reorder it at every call
        return torch.stack([torch.ops.mkldnn._linear_pointwise(kv_BTX[b], q_BKX[b], None, "none", [], "")
                            for b in range(q_BKX.shape[0])]).transpose(1, 2)
    return torch.bmm(q_BKX, kv_BTX.transpose(1, 2))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def small_batch_swiglu(x_ND: torch.Tensor, counts_E: torch.Tensor, gate_up_EXD: torch.Tensor,
                       down_EDF: torch.Tensor, act: Callable) -> torch.Tensor | None:
    """The routed experts of a few expert-sorted token copies (decode): each chosen expert's SwiGLU as two few-row
    products over its copies, all experts in one kernel call per projection, each chosen expert's weights read once
    in place. None where the kernel does not apply (the caller runs its grouped GEMMs)."""
    if not _few_rows(x_ND, gate_up_EXD) or x_ND.shape[0] > SMALL_ROWS * int((counts_E > 0).sum()):
        return None
    ends_E = counts_E.cumsum(0)
    gate_NF, up_NF = _kernels().rows_dot(x_ND, gate_up_EXD, ends_E).chunk(2, dim=-1)
    return _kernels().rows_dot(act(gate_NF) * up_NF, down_EDF, ends_E)


# ---------------------------------------------------------------------------------------------------------------
# the C++ kernels (kernels/), built at first use by kernels/build.py
_kernels = functools.cache(kernel_build.load)


_NO_MASK = torch.empty(0, dtype=torch.bool)


def latent_attention(q_BKX: torch.Tensor, kv_BTX: torch.Tensor, valid_BT: torch.Tensor | None,
                     C: int) -> torch.Tensor | None:
    """softmax(q kv^T) kv[..., :C] in fp32 for K query rows per batch row (the scale already in q), masking keys
    where valid_BT is False; None where the kernel does not apply (the caller then runs its GEMM path)."""
    if (kv_BTX.device.type != "cpu" or kv_BTX.stride(-1) != 1 or not no_grad_needed(q_BKX, kv_BTX)
            or not plain_eager() or kv_BTX.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    mask = _NO_MASK if valid_BT is None else valid_BT.contiguous()
    return kernels.mla_decode(q_BKX.float().contiguous(), kv_BTX, mask, C)
