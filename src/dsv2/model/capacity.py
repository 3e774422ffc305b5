"""Device-level capacity (DeepSeek-V2 Sec. 2.2.4): the rule that decides which routed assignments a device group
takes when more arrive than its share. It works on routed assignments alone, so the training-time dropping of one
process (training/token_drop.py) and the arrival-side dropping of expert parallelism (distributed/) both use it.

Each device group d has a capacity of ceil(capacity_factor * N / D) of the N token-expert assignments, its share
under perfect balance. Beyond it, the lowest-affinity assignments are dropped; ties keep the earlier assignment.
Assignments of protected sequences are kept first and still take capacity (they cost the device the same compute).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def device_capacity(n_assignments: int | Tensor, n_group: int, capacity_factor: float = 1.0) -> int | Tensor:
    """ceil(capacity_factor * n_assignments / n_group): a group's share of the assignments, times the factor.

    An int gives an int; a tensor (e.g. a count of valid assignments, kept on device) gives a long tensor.
    """
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be finite and > 0, got {capacity_factor}")
    # Shrink by 1e-12 before ceil: float error (1.1 * 100 = 110.00000000000001) must not add a slot.
    if isinstance(n_assignments, Tensor):
        share = capacity_factor * n_assignments.double() / n_group
        return torch.ceil(share * (1 - 1e-12)).long()
    return math.ceil(capacity_factor * n_assignments / n_group * (1 - 1e-12))


def drop_over_capacity(group_N: Tensor, affinity_N: Tensor, n_group: int, capacity: int | Tensor,
                       protected_N: Tensor | None = None) -> Tensor:
    """Keep mask [N] bool for N assignments: per group, protected ones first, then the highest affinities,
    up to ``capacity`` (an int, or a [n_group] tensor for per-group budgets); protected ones are always kept.

    group_N [N] long in [0, n_group); affinity_N [N] float; protected_N [N] bool or None. Ties in affinity
    keep the lower index. Sort-based, no host synchronisation.
    """
    device = group_N.device
    n = group_N.numel()
    if protected_N is None:
        protected_N = torch.zeros(n, dtype=torch.bool, device=device)
    # One lexicographic order (group, protected first, affinity descending, index) from two stable sorts,
    # least significant key first.
    order_N = torch.argsort(affinity_N.detach(), descending=True, stable=True)
    major_N = group_N * 2 + (~protected_N).long()
    order_N = order_N[torch.argsort(major_N[order_N], stable=True)]
    group_sorted_N = group_N[order_N]
    load_G = torch.zeros(n_group, dtype=torch.long, device=device).scatter_add_(
        0, group_N, torch.ones_like(group_N))
    start_G = load_G.cumsum(0) - load_G
    rank_N = torch.arange(n, device=device) - start_G[group_sorted_N]  # position within its group
    capacity_G = torch.as_tensor(capacity, device=device).expand(n_group)
    keep_sorted_N = (rank_N < capacity_G[group_sorted_N]) | protected_N[order_N]
    return torch.empty_like(keep_sorted_N).scatter_(0, order_N, keep_sorted_N)
