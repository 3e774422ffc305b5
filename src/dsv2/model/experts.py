"""Fine-grained routed experts (DeepSeekMoE, Sec. 2.2.1) stored stacked for grouped GEMM.

The checkpoints hold one SwiGLU MLP per expert (experts.{j}.{gate,up,down}_proj); dsv2 stacks them as
gate_up_proj [E, 2F, D] (gate rows first, then up rows) and down_proj [E, D, F] so that all experts run as two
grouped matrix multiplies over tokens sorted by expert (`torch._grouped_mm`), with no Python loop over experts.
dsv2.checkpoint splits and stacks at the boundary; dsv2.cpu runs decode's few token copies with its own kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


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


def local_block(w: torch.Tensor) -> torch.Tensor:
    """This process's experts of a stacked weight: the weight itself, or, when expert parallelism has made it a
    DTensor sharded over the ranks (dsv2/distributed/: under FSDP2 the experts are such DTensors), its local block,
    the experts the dispatcher sends this rank's rows to. Duck-typed, so the model imports nothing distributed."""
    to_local = getattr(w, "to_local", None)
    return w if to_local is None else to_local()


class RoutedExperts(nn.Module):
    def __init__(self, n_experts: int, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.n_experts, self.hidden, self.inter = n_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.act = ACTIVATIONS[act]

    def shard(self, lo: int, hi: int) -> list[nn.Parameter]:
        """Keep experts lo .. hi-1 only (expert parallelism: dsv2/distributed/); returns the new stacked parameters."""
        out = []
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(self, name)
            p = nn.Parameter(old.detach()[lo:hi].clone(), requires_grad=old.requires_grad)
            setattr(self, name, p)
            out.append(p)
        self.n_experts = hi - lo
        return out

    def stacked(self, name: str) -> torch.Tensor:
        """gate_up_proj or down_proj as the forward uses it: this rank's block under expert parallelism."""
        return local_block(getattr(self, name))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: token copies sorted by expert, counts_E[e] of them for expert e. Returns [N, D]."""
        w_up_EDX, w_down_EFD = (self.stacked(n).to(x_ND.dtype).transpose(-2, -1) for n in ("gate_up_proj", "down_proj"))
        return self.swiglu(x_ND, w_up_EDX, w_down_EFD, counts_E.cumsum(0).to(torch.int32))

    def grouped(self, x_NK: torch.Tensor, name: str, counts_E: torch.Tensor) -> torch.Tensor:
        """One of the two products alone: each expert's rows of x times its `name` weight (gate_up_proj: [N, 2F],
        down_proj: [N, D]), for code that works between them (LoRA adapters, dsv2.lora); the subclasses of
        dsv2.cpu and dsv2.quant compute it as their forward does."""
        w = self.stacked(name).to(x_NK.dtype).transpose(-2, -1)
        return grouped_mm(x_NK, w, counts_E.cumsum(0).to(torch.int32))

    def swiglu(self, x_ND, w_up_EDX, w_down_EFD, ends_E) -> torch.Tensor:
        """Each expert's SwiGLU over its rows of x (ends_E: cumulative row counts): two grouped GEMMs."""
        gate_NF, up_NF = grouped_mm(x_ND, w_up_EDX, ends_E).chunk(2, dim=-1)
        return grouped_mm(self.gated(gate_NF, up_NF), w_down_EFD, ends_E)

    def gated(self, gate_NF: torch.Tensor, up_NF: torch.Tensor) -> torch.Tensor:
        return self.act(gate_NF) * up_NF
