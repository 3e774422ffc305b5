"""The DeepSeekMoE gate and V2's device-limited routing (Sec. 2.2.1 and 2.2.2).

Affinities s_{i,t} = softmax_i(u_t . e_i), computed in fp32 whatever the model dtype. Then:
- greedy: the top-K_r experts of each token;
- group_limited_greedy: experts are split into D = n_group contiguous device groups; each group is scored by the
  MAX affinity of its experts, the M = topk_group best groups are kept, and the top-K_r experts are chosen inside
  them only. A token therefore visits at most M devices. (V3 scores a group by the sum of its top-2 affinities:
  a different rule, deliberately not used here.)
Combine weights are the chosen affinities times routed_scaling_factor, or, with norm_topk_prob, the chosen
affinities renormalised to sum to one (the official V2 rule).

The router returns everything later stages need (affinities, choices, weights, groups), so balance losses, token
dropping and metrics never recompute routing. Shape legend: T tokens, E routed experts, K chosen per token,
G device groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


def device_group(experts: torch.Tensor, n_experts: int, n_group: int) -> torch.Tensor:
    """The device group of each expert id: the experts are split into n_group contiguous blocks (Sec. 2.2.2)."""
    return experts // (n_experts // n_group)


@dataclass
class Routing:
    scores_TE: torch.Tensor
    """fp32 softmax affinities s_{i,t} of every expert (differentiable: the balance losses need them)."""
    experts_TK: torch.Tensor
    """int64 ids of the chosen experts."""
    weights_TK: torch.Tensor
    """fp32 combine weights of the chosen experts."""
    n_group: int
    """Device groups D the experts are split into (contiguous blocks of E / D)."""
    keep_TK: torch.Tensor | None = None
    """bool: False where device-level token dropping removed an assignment (training only)."""

    @property
    def groups_TK(self) -> torch.Tensor:
        """Device group of each chosen expert."""
        return device_group(self.experts_TK, self.scores_TE.shape[-1], self.n_group)


class Router(nn.Module):
    """`mlp.gate` in the checkpoints: one [E, D] weight."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.num_routed
        self.top_k = config.num_experts_per_tok
        self.method = config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scaling = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if torch.is_autocast_enabled(x_TD.device.type):  # affinities in fp32 even under bf16 autocast
            with torch.autocast(x_TD.device.type, enabled=False):
                return self.forward(x_TD)
        scores_TE = F.linear(x_TD.float(), self.weight.float()).softmax(dim=-1)
        weights_TK, experts_TK = torch.topk(self.limit_to_groups(scores_TE.detach()), self.top_k, dim=-1)
        weights_TK = scores_TE.gather(-1, experts_TK)  # differentiable, and exact (not the masked copy)
        if self.top_k > 1 and self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights_TK = weights_TK * self.scaling
        return Routing(scores_TE, experts_TK, weights_TK, self.n_group)

    def limit_to_groups(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Zero the affinities outside each token's topk_group best device groups (identity for greedy)."""
        if self.method == "greedy" or self.topk_group == self.n_group:
            return scores_TE
        T = scores_TE.shape[0]
        group_scores_TG = scores_TE.view(T, self.n_group, -1).amax(dim=-1)  # V2: the group's MAX affinity
        top_groups_TM = torch.topk(group_scores_TG, self.topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TM, True)
        # softmax affinities are > 0, so a zeroed expert never outranks a kept one
        return scores_TE.masked_fill(~keep_TG.repeat_interleave(self.n_experts // self.n_group, dim=1), 0.0)
