"""Quantized modules, swapped in from outside the model (as dsv2.cpu swaps its CPU classes): the model stays plain.

- QuantLinear replaces a linear: `weight_q` uint8 [out, row_bytes] holds its blocked int8/int4 rows (formats.py).
- QuantRoutedExperts replaces the routed experts: `gate_up_proj_q` [E, 2F, bytes(D)] and `down_proj_q` [E, D, bytes(F)],
  the stacked layout of model/experts.py with each row quantized (rows are independent, so the checkpoints'
  per-expert tensors land in their rows exactly as the float ones do: hf_names.slot).

Decode (a few rows) reads the quantized rows in place through the same ops as fp32/bf16 weights (ops.rows_dot with a
uint8 w), and so does the fused decode step: a module's quantized rows are its `<weight name>_q` buffer, which the CPU
code reads wherever there is one (cpu/modules.py kernel_weight). Many
rows (prefill) dequantize a weight (for the experts: a chunk of experts at a time, so no whole layer's dense copy
exists) into the GEMM's dtype and run the GEMM the float model runs: the dequantization is one pass over the
weight against a GEMM's many.

`weight` / `gate_up_proj` / `down_proj` remain as properties giving the dequantized tensor, for code that needs a
dense matrix (MLA's plain absorbed path off the CPU, tools); they are computed on each access.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import ops
from ..cpu.modules import SMALL_ROWS, dense, few_rows, gemm_dtype
from ..model.experts import ACTIVATIONS, RoutedExperts, grouped_mm
from .formats import Scheme

EXPERT_CHUNK_BYTES = 64 * 2**20
"""Dense bytes of the experts dequantized at once for a many-row forward (about a chunk of the last-level cache's
order, and a small fraction of any model's size)."""


class QuantLinear(nn.Module):
    """y = x W^T with W held as blocked int8/int4 rows; no bias (DeepSeek-V2's linears have none)."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, dtype: torch.dtype, name: str = ""):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.dtype = in_features, out_features, scheme, dtype
        scheme.group_of(in_features, name)
        self.register_buffer("weight_q", torch.empty(out_features, scheme.row_bytes(in_features), dtype=torch.uint8))

    @property
    def weight(self) -> torch.Tensor:
        return dense(self.weight_q, self.in_features, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= SMALL_ROWS and few_rows(x, self.weight_q):
            return ops.rows_dot(x, self.weight_q)
        w = dense(self.weight_q, self.in_features, gemm_dtype(x, rows))
        return F.linear(x.to(w.dtype), w).to(x.dtype)

    def quantized_rows(self) -> dict[str, tuple[torch.Tensor, int]]:
        """weight name -> (its blocked rows, values per row): what checkpoint loading fills and saving writes."""
        return {"weight": (self.weight_q, self.in_features)}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


class QuantRoutedExperts(RoutedExperts):
    """The routed experts with quantized rows (gate_up_proj_q, down_proj_q); routing and combine are the MoE layer's."""

    def __init__(self, n_experts: int, hidden: int, inter: int, scheme: Scheme, dtype: torch.dtype,
                 act: str = "silu", name: str = ""):
        nn.Module.__init__(self)
        self.n_experts, self.hidden, self.inter, self.scheme, self.dtype = n_experts, hidden, inter, scheme, dtype
        self.act = ACTIVATIONS[act]
        scheme.group_of(hidden, f"{name}.gate_proj/up_proj")
        scheme.group_of(inter, f"{name}.down_proj")
        self.register_buffer("gate_up_proj_q", torch.empty(n_experts, 2 * inter, scheme.row_bytes(hidden),
                                                      dtype=torch.uint8))
        self.register_buffer("down_proj_q", torch.empty(n_experts, hidden, scheme.row_bytes(inter), dtype=torch.uint8))

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return dense(self.gate_up_proj_q, self.hidden, self.dtype)

    @property
    def down_proj(self) -> torch.Tensor:
        return dense(self.down_proj_q, self.inter, self.dtype)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        ends_E = counts_E.cumsum(0)
        if few_rows(x_ND, self.gate_up_proj_q) and x_ND.shape[0] <= SMALL_ROWS * int((counts_E > 0).sum()):
            gate_NF, up_NF = ops.rows_dot(x_ND, self.gate_up_proj_q, ends_E).chunk(2, dim=-1)
            return ops.rows_dot(self.act(gate_NF) * up_NF, self.down_proj_q, ends_E)
        dtype = gemm_dtype(x_ND, x_ND.shape[0] // self.n_experts)
        chunk = max(1, EXPERT_CHUNK_BYTES // (3 * self.hidden * self.inter * torch.finfo(dtype).bits // 8))
        y_ND = torch.empty_like(x_ND)
        bounds = [0, *ends_E.tolist()]
        for e0 in range(0, self.n_experts, chunk):  # experts e0 .. e1-1 own rows s .. t-1 (sorted by expert)
            e1 = min(self.n_experts, e0 + chunk)
            s, t = bounds[e0], bounds[e1]
            if s == t:
                continue
            w_up_EDX = dense(self.gate_up_proj_q[e0:e1], self.hidden, dtype).transpose(-2, -1)
            w_down_EFD = dense(self.down_proj_q[e0:e1], self.inter, dtype).transpose(-2, -1)
            ends = (ends_E[e0:e1] - s).to(torch.int32)
            y_ND[s:t] = self.swiglu(x_ND[s:t].to(dtype), w_up_EDX, w_down_EFD, ends).to(x_ND.dtype)
        return y_ND

    def quantized_rows(self) -> dict[str, tuple[torch.Tensor, int]]:
        return {"gate_up_proj": (self.gate_up_proj_q, self.hidden), "down_proj": (self.down_proj_q, self.inter)}

    def grouped(self, x_NK: torch.Tensor, name: str, counts_E: torch.Tensor) -> torch.Tensor:
        w_q, K = self.quantized_rows()[name]
        if few_rows(x_NK, w_q) and x_NK.shape[0] <= SMALL_ROWS * int((counts_E > 0).sum()):
            return ops.rows_dot(x_NK, w_q, counts_E.cumsum(0))
        dtype = gemm_dtype(x_NK, x_NK.shape[0] // self.n_experts)
        return grouped_mm(x_NK.to(dtype), dense(w_q, K, dtype).transpose(-2, -1), counts_E.cumsum(0).to(torch.int32)
                          ).to(x_NK.dtype)

    def shard(self, lo: int, hi: int) -> list[nn.Parameter]:
        """Keep experts lo .. hi-1 (expert parallelism); their rows are buffers, never trained: no parameter."""
        self.gate_up_proj_q = self.gate_up_proj_q[lo:hi].clone()
        self.down_proj_q = self.down_proj_q[lo:hi].clone()
        self.n_experts = hi - lo
        return []

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, {self.scheme}"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantRoutedExperts)) for m in model.modules())
