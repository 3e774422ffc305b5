"""Fine-grained routed experts (DeepSeekMoE, Sec. 2.2.1) stored stacked for grouped GEMM.

The checkpoints hold one SwiGLU MLP per expert (experts.{j}.{gate,up,down}_proj); dsv2 stacks them as
gate_up_proj [E, 2F, D] (gate rows first, then up rows) and down_proj [E, D, F] so that all experts run as two
grouped matrix multiplies over tokens sorted by expert (`torch._grouped_mm`), with no Python loop over experts.
checkpoint.py splits and stacks at the boundary. Legend: N token copies sorted by expert, E experts, D hidden,
F moe_intermediate_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h_N2F = torch._grouped_mm(x_ND, self.gate_up_proj.transpose(-2, -1), offs=offs_E)
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        return torch._grouped_mm(self.act(gate_NF) * up_NF, self.down_proj.transpose(-2, -1), offs=offs_E)
