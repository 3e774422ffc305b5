"""The DeepSeekMoE layer: router -> dispatcher -> routed experts -> combine, plus shared experts (Sec. 2.2).

    y_t = sum_{i in shared} FFN_i(u_t) + sum_{i in top-K} g_{i,t} FFN_i(u_t)

The dispatcher is the seam for expert parallelism: `LocalDispatcher` sorts token copies by expert in one
process; a distributed dispatcher (dsv2/distributed/expert_parallel.py) does the same over ranks with
all-to-all, behind the same two calls. The layer itself never mentions ranks. Token dropping (training) is a
policy passed to the forward that marks assignments to drop before dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .experts import ACTIVATIONS, RoutedExperts
from .router import Router, Routing


class MLP(nn.Module):
    """SwiGLU FFN: the dense layers, and the shared experts (one MLP of width n_shared * moe_intermediate)."""

    def __init__(self, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Dispatched:
    """What combine() needs to bring expert outputs back to their tokens."""

    token_N: torch.Tensor  # source token of each sorted copy
    slot_N: torch.Tensor  # index into the flattened [T*K] assignments
    n_tokens: int
    overlapped: torch.Tensor | None = None  # what dispatch(overlap=...) returned


class LocalDispatcher:
    """Single-process dispatch: sort the kept token-expert assignments by expert."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def sort(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept assignments in expert order, by token within an expert: slot_N (index into the flat [T*K]
        assignments) and counts_E (how many each expert got)."""
        expert_A = routing.experts_TK.flatten()  # A = T*K assignments
        if routing.keep_TK is not None:  # dropped assignments sort past the last expert and are cut off
            expert_A = expert_A.masked_fill(~routing.keep_TK.flatten(), self.n_experts)
        slot_A = torch.argsort(expert_A, stable=True)
        counts_E = torch.bincount(expert_A, minlength=self.n_experts + 1)[: self.n_experts]
        return (slot_A if routing.keep_TK is None else slot_A[: int(counts_E.sum())]), counts_E

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, overlap: Callable[[], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        """`overlap`: work to run while the token copies are in flight (nothing is here: it runs first)."""
        overlapped = overlap() if overlap is not None else None
        slot_N, counts_E = self.sort(routing)
        token_N = slot_N // routing.experts_TK.shape[1]
        # index_select, not x_TD[token_N]: the gradient of indexing is index_put_(accumulate=True), which on a
        # multi-threaded CPU adds each token's K copies with atomics in whatever order the threads run (two
        # identical runs then differ in the last bits); index_select's gradient, index_add_, adds them in order.
        return x_TD.index_select(0, token_N), counts_E, Dispatched(token_N, slot_N, x_TD.shape[0], overlapped)

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, d: Dispatched) -> torch.Tensor:
        y_ND = self.weigh(y_ND, weights_TK.flatten()[d.slot_N])
        return y_ND.new_zeros(d.n_tokens, y_ND.shape[-1]).index_add_(0, d.token_N, y_ND)

    def weigh(self, y_ND: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
        """Each expert output times its gate weight, in the outputs' dtype."""
        return (y_ND * w_N[:, None]).to(y_ND.dtype)


TokenDropPolicy = Callable[[Routing, int], torch.Tensor]
"""(routing, batch_size) -> keep_TK bool mask; passed to the forward, applied in training mode only."""


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gate = Router(c)
        self.experts = RoutedExperts(c.num_routed, c.hidden_size, c.moe_intermediate_size, c.hidden_act)
        n_shared = c.n_shared_experts or 0
        self.shared_experts = MLP(c.hidden_size, n_shared * c.moe_intermediate_size, c.hidden_act) if n_shared else None
        self.dispatcher = LocalDispatcher(c.num_routed)

    def forward(self, x_BSD: torch.Tensor, token_drop: TokenDropPolicy | None = None,
                ) -> tuple[torch.Tensor, Routing]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.gate(x_TD)
        if self.training and token_drop is not None:
            routing.keep_TK = token_drop(routing, B)
        # the shared experts run while the routed copies are in flight (with expert parallelism, an all-to-all)
        shared = self.shared_experts
        overlap = (lambda: shared(x_TD)) if shared is not None else None
        x_ND, counts_E, ctx = self.dispatcher.dispatch(x_TD, routing, overlap)
        y_TD = self.dispatcher.combine(self.experts(x_ND, counts_E), routing.weights_TK, ctx)
        if ctx.overlapped is not None:
            y_TD = y_TD + ctx.overlapped
        return y_TD.view(B, S, D), routing


def dense_or_moe(config: ModelConfig, layer_idx: int) -> nn.Module:
    if config.is_moe_layer(layer_idx):
        return MoE(config)
    return MLP(config.hidden_size, config.intermediate_size, config.hidden_act)



