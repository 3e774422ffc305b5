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

from . import fastpath

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


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
        """Two grouped GEMMs over the expert-sorted copies (any N; the path with autograd)."""
        offs_E = counts_E.cumsum(0).to(torch.int32)
        # fp32 where bf16 GEMMs are emulated and each widened expert serves enough copies (fastpath.gemm_dtype)
        dtype = fastpath.gemm_dtype(x_ND, x_ND.shape[0] // self.n_experts)
        h_N2F = torch._grouped_mm(x_ND.to(dtype), self.gate_up_proj.to(dtype).transpose(-2, -1), offs=offs_E)
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        a_NF = self.act(gate_NF)
        # in place without autograd: a prefill's [N, F] intermediates are tens of MB (fresh pages each time)
        a_NF = a_NF.mul_(up_NF) if fastpath.no_grad_needed(x_ND, self.gate_up_proj) else a_NF * up_NF
        return torch._grouped_mm(a_NF, self.down_proj.to(dtype).transpose(-2, -1), offs=offs_E).to(x_ND.dtype)
