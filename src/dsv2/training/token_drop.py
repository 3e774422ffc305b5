"""Device-level token dropping during training (DeepSeek-V2 Sec. 2.2.4): the [B, S, K] interface on the capacity
rule of model/capacity.py, the ~10% of sequences it never drops, and the MoE layer's token-drop policy.

Evaluation never drops. The caller drops an assignment by not dispatching it (zero gate weight); the token keeps
its shared experts and the residual path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig
from ..model.capacity import device_capacity, drop_over_capacity
from ..model.router import Routing, device_group


@dataclass(frozen=True)
class DropStats:
    """What `device_token_drop` did to one batch (0-d tensors, except load_per_group [D])."""

    dropped_fraction: Tensor  # dropped assignments / all (valid) assignments
    n_dropped: Tensor
    n_assignments: Tensor
    capacity: Tensor  # per device group
    load_per_group: Tensor  # [D] assignments that landed on each group, before dropping


def device_token_drop(scores: Tensor, experts: Tensor, n_group: int, capacity_factor: float = 1.0,
                      protect: Tensor | None = None, valid: Tensor | None = None) -> tuple[Tensor, DropStats]:
    """Device-level token dropping for one MoE layer (training only).

    scores [B, S, E] affinities; experts [B, S, K] chosen ids; protect [B] bool: sequences never dropped;
    valid [B, S] bool: padding assignments are excluded from capacity and stats and returned as not kept.
    Returns keep [B, S, K] bool and DropStats.
    """
    B, S, E = scores.shape
    if n_group < 1 or E % n_group:
        raise ValueError(f"the {E} experts must split evenly into n_group={n_group} groups")
    K = experts.shape[-1]
    group_BSK = device_group(experts, E, n_group)
    affinity_BSK = scores.detach().gather(-1, experts)
    if valid is None:
        valid_BSK = torch.ones_like(experts, dtype=torch.bool)
        n_assignments = torch.tensor(B * S * K, device=scores.device)
    else:
        valid_BSK = valid[..., None].expand(B, S, K)
        # Padding sorts last in its group, so it never takes a slot from a real assignment.
        affinity_BSK = affinity_BSK.masked_fill(~valid_BSK, -math.inf)
        n_assignments = valid.sum() * K
    capacity = device_capacity(n_assignments, n_group, capacity_factor)
    protected_BSK = (torch.zeros(B, dtype=torch.bool, device=scores.device) if protect is None else protect
                     )[:, None, None].expand(B, S, K) & valid_BSK
    keep_BSK = drop_over_capacity(group_BSK.reshape(-1), affinity_BSK.reshape(-1), n_group, capacity,
                                  protected_BSK.reshape(-1)).view(B, S, K) & valid_BSK
    n_dropped = (valid_BSK & ~keep_BSK).sum()
    load_G = torch.zeros(n_group, dtype=torch.long, device=scores.device).scatter_add_(
        0, group_BSK.reshape(-1), valid_BSK.reshape(-1).long())
    stats = DropStats(dropped_fraction=n_dropped / n_assignments.clamp(min=1), n_dropped=n_dropped,
                      n_assignments=n_assignments, capacity=capacity, load_per_group=load_G)
    return keep_BSK, stats


def choose_protected(batch_size: int, fraction: float = 0.1, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """[B] bool: each sequence protected from dropping independently with probability ``fraction``.

    Independent draws (not an exact count) so small batches still protect a sequence now and then; the draw
    is on the CPU so one CPU generator gives the same choice on any device.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return (torch.rand(batch_size, generator=generator) < fraction).to(device)


PROTECT_SEED_STRIDE = 1_000_003
"""Seeds the protected-sequence draw of step k with seed * stride + k: a prime, so distinct (seed, k) pairs in
any realistic range never share a draw."""


# ------------------------------------------------------------------------------------------------------------
# token dropping and per-step MoE statistics
class DeviceTokenDrop:
    """The trainer's token-dropping policy (model.moe.TokenDropPolicy, passed to the training forward):
    device-level capacity per group, protected sequences chosen per micro-batch."""

    def __init__(self, config: ModelConfig, capacity_factor: float):
        self.config, self.capacity_factor = config, capacity_factor
        self.protect: torch.Tensor | None = None
        self.dropped = 0
        self.assignments = 0

    def __call__(self, routing: Routing, batch_size: int) -> torch.Tensor:
        E, K = routing.scores_TE.shape[-1], routing.experts_TK.shape[-1]
        keep, stats = device_token_drop(routing.scores_TE.detach().view(batch_size, -1, E),
                                        routing.experts_TK.view(batch_size, -1, K), self.config.n_group,
                                        self.capacity_factor, protect=self.protect)
        self.dropped += int(stats.n_dropped)
        self.assignments += int(stats.n_assignments)
        return keep.view(-1, K)
