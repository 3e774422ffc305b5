"""Fine-grained routed experts (DeepSeekMoE, Sec. 2.2.1) stored stacked for grouped GEMM.

The checkpoints hold one SwiGLU MLP per expert (experts.{j}.{gate,up,down}_proj); dsv2 stacks them as
gate_up_proj [E, 2F, D] (gate rows first, then up rows) and down_proj [E, D, F] so that all experts run as two
grouped matrix multiplies over tokens sorted by expert (`torch._grouped_mm`), with no Python loop over experts.
checkpoint.py splits and stacks at the boundary. Decode (a few token copies per chosen expert) takes
fastpath.small_batch_swiglu instead when it applies. Legend: N token copies sorted by expert, E experts, D hidden,
F moe_intermediate_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import fastpath

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}
BLOCK_BYTES = 16 * 2**20  # see RoutedExperts._block_rows


def _grouped_mm_layout(t: torch.Tensor) -> bool:
    """torch._grouped_mm's rule: 16-byte aligned data and strides (a width like 6 or 7 in fp32 breaks it)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride() if st != 1)


def grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Rows ends_E[e-1]:ends_E[e] of x times w[e], for every expert e: torch._grouped_mm, or one matmul per expert
    for widths that break its alignment rule, inputs' or output's (unusual configs; same result, slower)."""
    widths_ok = all(n * x_NK.element_size() % 16 == 0 for n in (x_NK.shape[-1], w_EKM.shape[-1]))
    if widths_ok and _grouped_mm_layout(x_NK) and _grouped_mm_layout(w_EKM):
        return torch._grouped_mm(x_NK, w_EKM, offs=ends_E)
    bounds = [0, *ends_E.tolist()]
    return torch.cat([x_NK[bounds[e]:bounds[e + 1]] @ w_EKM[e] for e in range(w_EKM.shape[0])])


class RoutedExperts(nn.Module):
    def __init__(self, n_experts: int, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.n_experts, self.hidden, self.inter = n_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.act = ACTIVATIONS[act]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: token copies sorted by expert, counts_E[e] of them for expert e. Returns [N, D]."""
        y_ND = fastpath.small_batch_swiglu(x_ND, counts_E, self.gate_up_proj, self.down_proj, self.act)  # decode
        return self.grouped(x_ND, counts_E) if y_ND is None else y_ND

    def grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Two grouped GEMMs over the expert-sorted copies (any N; the path with autograd). Without autograd on CPU,
        in blocks of copies whose intermediates fit the last-level cache (`_block_rows`)."""
        ends_E = counts_E.cumsum(0)
        # fp32 where bf16 GEMMs are emulated and each widened expert serves enough copies (fastpath.gemm_dtype)
        dtype = fastpath.gemm_dtype(x_ND, x_ND.shape[0] // self.n_experts)
        w_up_EDX, w_down_EFD = (w.to(dtype).transpose(-2, -1) for w in (self.gate_up_proj, self.down_proj))
        N = x_ND.shape[0]
        block = self._block_rows(x_ND, dtype)
        if block >= N:
            return self._swiglu(x_ND.to(dtype), w_up_EDX, w_down_EFD, ends_E.to(torch.int32)).to(x_ND.dtype)
        y_ND = torch.empty_like(x_ND)
        for s in range(0, N, block):  # a block's group ends: experts outside it get no rows (skipped)
            e = min(N, s + block)
            ends_b = (ends_E.clamp(s, e) - s).to(torch.int32)
            y_ND[s:e] = self._swiglu(x_ND[s:e].to(dtype), w_up_EDX, w_down_EFD, ends_b)
        return y_ND

    def _swiglu(self, x_ND, w_up_EDX, w_down_EFD, ends_E) -> torch.Tensor:
        h_N2F = grouped_mm(x_ND, w_up_EDX, ends_E)
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        a_NF = self.act(gate_NF)
        # in place without autograd: a prefill's [N, F] intermediates are tens of MB (fresh pages each time)
        a_NF = a_NF.mul_(up_NF) if fastpath.no_grad_needed(x_ND, w_up_EDX) else a_NF * up_NF
        return grouped_mm(a_NF, w_down_EFD, ends_E)

    def _block_rows(self, x_ND: torch.Tensor, dtype: torch.dtype) -> int:
        """Copies per block: all of them with autograd or off CPU; else as many as keep a block's input, [2F]
        intermediate, activation and output (BLOCK_BYTES in all) in the last-level cache, so the down projection
        reads the activations the gate/up projection just wrote from cache, not memory: the benchmark model's MoE
        layer over a 2K-token prefill runs 6-9% faster (fp32 and bf16, medians of interleaved runs), and its
        expert GEMMs at 155 instead of 105 GFLOP/s, as fast as a Python loop of F.linear per expert."""
        if x_ND.device.type != "cpu" or not fastpath.no_grad_needed(x_ND, self.gate_up_proj):
            return x_ND.shape[0]
        row_bytes = (2 * self.hidden + 3 * self.inter) * torch.finfo(dtype).bits // 8
        return max(256, BLOCK_BYTES // row_bytes)
