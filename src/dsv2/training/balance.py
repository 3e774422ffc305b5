"""DeepSeek-V2's auxiliary balance losses (report, arXiv 2405.04434, Sec. 2.2.3 "Auxiliary Loss for Load
Balance"), and the per-step MoE statistics of a run (MoEStats).

Notation, per sequence of T tokens: E (= N_r) routed experts, K (= K_r) chosen per token, D device groups of
E/D contiguous experts (group d holds experts d*E/D ... (d+1)*E/D - 1), each token sent to at most M groups.

    P_i       = 1/T sum_t s_{i,t}                   mean affinity of expert i; the only term with a gradient
    f_i       = E/(K T) * #{t : t chose i}          load of expert i; 1 for every i under perfect balance
    L_ExpBal  = sum_i f_i P_i
    L_DevBal  = sum_d f'_d P'_d       f'_d = mean of f_i over d's experts, P'_d = sum of P_i over them
    L_CommBal = sum_d f''_d P''_d     f''_d = D/(M T) * #{t : t sends to d}, P''_d = P'_d

Choices this module makes (the report does not settle them):

- The loss functions return the sums WITHOUT their coefficients a1, a2, a3, so they can be logged unweighted;
  `balance_losses` also returns the weighted total.
- Each loss is computed per sequence, then averaged over the sequences of the batch. With a ``valid`` mask
  (False at padding) T counts valid tokens only, padding neither loads experts nor enters P, and a sequence
  with no valid token has no loss and is left out of the batch mean.
- f counts the routing decisions as the router made them, before any token dropping: the losses push the
  router towards balance; dropping is what happens to the imbalance that remains.
- Perfect balance gives exactly 1. sum_i f_i = E always, so f_i = 1 for all i gives sum_i P_i = 1, and
  uniform affinities give sum_i f_i / E = 1. Likewise L_DevBal = 1 when every f'_d = 1 or every P'_d = 1/D,
  and L_CommBal = 1 when every device receives T M / D tokens (or every P''_d = 1/D and every token visits M
  devices).
- D = 1: f'_1 = P'_1 = 1 and (M = 1) f''_1 = P''_1 = 1, so both device-level losses are the constant 1 with
  zero gradient. The functions return that 1; `balance_losses` reports it but leaves those two terms out of
  the total, so a D = 1 model (V2-Lite) trains and logs with the expert-level loss alone, as Lite did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..distributed.parallel import Parallel
from ..model.router import Routing, device_group


# ------------------------------------------------------------------------------------------------------------
# balance losses
@dataclass(frozen=True)
class _RoutingStats:
    """Per-sequence statistics shared by the three losses."""

    counts_BE: Tensor  # tokens choosing each expert (float, no gradient)
    visits_BD: Tensor  # tokens sending to each device group, a token counted once per group
    P_BE: Tensor  # mean affinity per expert (carries the gradient)
    T_B: Tensor  # valid tokens per sequence


def _routing_stats(scores: Tensor, experts: Tensor, n_experts: int, n_group: int, valid: Tensor | None,
                   ) -> _RoutingStats:
    B, S, E = scores.shape
    if E != n_experts:
        raise ValueError(f"scores has {E} experts in its last dimension, expected n_experts={n_experts}")
    if experts.shape[:2] != (B, S):
        raise ValueError(f"experts {tuple(experts.shape)} and scores {tuple(scores.shape)} differ in [B, S]")
    if n_group < 1 or E % n_group:
        raise ValueError(f"n_experts ({E}) must be divisible by n_group ({n_group})")
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=scores.device)
    # Counts in at least fp32: bf16 cannot count past 256 exactly.
    dtype = torch.promote_types(scores.dtype, torch.float32)
    valid_BSK = valid[..., None].expand(experts.shape)
    counts_BE = torch.zeros(B, E, dtype=dtype, device=scores.device).scatter_add_(
        1, experts.reshape(B, -1), valid_BSK.reshape(B, -1).to(dtype))
    group_BSK = device_group(experts, E, n_group)
    # scatter of True deduplicates: a token with several experts on one device visits it once.
    visit_BSD = torch.zeros(B, S, n_group, dtype=torch.bool, device=scores.device)
    visit_BSD.scatter_(-1, group_BSK, True)
    visits_BD = (visit_BSD & valid[..., None]).sum(1).to(dtype)
    T_B = valid.sum(1).to(dtype)
    # masked_fill rather than a product: padding affinities may be non-finite.
    P_BE = scores.to(dtype).masked_fill(~valid[..., None], 0).sum(1) / T_B.clamp(min=1)[:, None]
    return _RoutingStats(counts_BE, visits_BD, P_BE, T_B)


def _batch_mean(loss_B: Tensor, T_B: Tensor) -> Tensor:
    has_tokens_B = T_B > 0
    return (loss_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1)


def _expert_term(st: _RoutingStats, top_k: int) -> tuple[Tensor, Tensor]:
    """(batch-mean loss, f_BE); f is reused by the device-level loss."""
    E = st.counts_BE.shape[1]
    f_BE = st.counts_BE * (E / top_k) / st.T_B.clamp(min=1)[:, None]
    return _batch_mean((f_BE * st.P_BE).sum(1), st.T_B), f_BE


def _device_term(st: _RoutingStats, f_BE: Tensor, n_group: int) -> Tensor:
    B, E = f_BE.shape
    f_BD = f_BE.view(B, n_group, E // n_group).mean(-1)
    P_BD = st.P_BE.view(B, n_group, E // n_group).sum(-1)
    return _batch_mean((f_BD * P_BD).sum(1), st.T_B)


def _comm_term(st: _RoutingStats, n_group: int, topk_group: int) -> Tensor:
    B, E = st.P_BE.shape
    f_BD = st.visits_BD * (n_group / topk_group) / st.T_B.clamp(min=1)[:, None]
    P_BD = st.P_BE.view(B, n_group, E // n_group).sum(-1)
    return _batch_mean((f_BD * P_BD).sum(1), st.T_B)


def _check_top_k(experts: Tensor, top_k: int) -> None:
    if experts.shape[-1] != top_k:
        raise ValueError(f"experts has {experts.shape[-1]} choices per token, expected top_k={top_k}")


def expert_balance_loss(scores: Tensor, experts: Tensor, n_experts: int, top_k: int,
                        valid: Tensor | None = None) -> Tensor:
    """L_ExpBal / a1 = sum_i f_i P_i, per sequence, batch mean.

    scores [B, S, E] softmax affinities; experts [B, S, K] chosen expert ids; valid [B, S] bool or None.
    """
    _check_top_k(experts, top_k)
    return _expert_term(_routing_stats(scores, experts, n_experts, 1, valid), top_k)[0]


def device_balance_loss(scores: Tensor, experts: Tensor, n_experts: int, top_k: int, n_group: int,
                        valid: Tensor | None = None) -> Tensor:
    """L_DevBal / a2 = sum_d f'_d P'_d over the n_group contiguous device groups, per sequence, batch mean."""
    _check_top_k(experts, top_k)
    st = _routing_stats(scores, experts, n_experts, n_group, valid)
    return _device_term(st, _expert_term(st, top_k)[1], n_group)


def comm_balance_loss(scores: Tensor, experts: Tensor, n_experts: int, n_group: int, topk_group: int,
                      valid: Tensor | None = None) -> Tensor:
    """L_CommBal / a3 = sum_d f''_d P''_d (a token counts once per device); per-sequence, batch mean.

    topk_group is M, the most devices a token may visit.
    """
    return _comm_term(_routing_stats(scores, experts, n_experts, n_group, valid), n_group, topk_group)


def balance_losses(scores: Tensor, experts: Tensor, config: ModelConfig, valid: Tensor | None = None,
                   ) -> dict[str, Tensor]:
    """The three unweighted losses of one MoE layer and their weighted total.

    Returns {"expert_balance", "device_balance", "comm_balance", "total"} where total = a1 L_ExpBal
    + a2 L_DevBal + a3 L_CommBal, the last two only when n_group > 1 (with one group they are the constant 1).
    """
    if config.num_routed == 0:
        raise ValueError("balance_losses needs a config with routed experts (n_routed_experts > 0)")
    top_k, n_group = config.num_experts_per_tok, config.n_group
    _check_top_k(experts, top_k)
    st = _routing_stats(scores, experts, config.num_routed, n_group, valid)
    expert, f_BE = _expert_term(st, top_k)
    device = _device_term(st, f_BE, n_group)
    comm = _comm_term(st, n_group, config.topk_group)
    total = config.expert_balance_alpha * expert
    if n_group > 1:
        total = total + config.device_balance_alpha * device + config.comm_balance_alpha * comm
    return {"expert_balance": expert, "device_balance": device, "comm_balance": comm, "total": total}


class MoEStats:
    """Accumulates, over a step's micro-batches, balance losses and expert loads per MoE layer."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0
        self.counts: list[torch.Tensor] = []

    def add(self, losses: list[dict[str, torch.Tensor]], routings: list[Routing]) -> None:
        for key in ("expert_balance", "device_balance", "comm_balance"):
            mean = sum(float(d[key].detach()) for d in losses) / max(1, len(losses))
            self.sums[key] = self.sums.get(key, 0.0) + mean
        self.n += 1
        counts = [torch.bincount(r.experts_TK.flatten(), minlength=r.scores_TE.shape[-1]).cpu() for r in routings]
        self.counts = counts if not self.counts else [a + b for a, b in zip(self.counts, counts, strict=True)]

    def all_reduce(self, par: Parallel) -> None:
        """Over all ranks: balance losses averaged (ranks hold equal shares of the batch), loads summed."""
        keys = sorted(self.sums)
        self.sums = dict(zip(keys, par.mean([self.sums[k] for k in keys]), strict=True))
        self.counts = [par.sum(c) for c in self.counts]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v / max(1, self.n) for k, v in self.sums.items()}
        if self.counts:
            out["expert_load_max_mean"] = [round(float(c.max() / c.float().mean()), 4) for c in self.counts]
            out["expert_load"] = [[round(float(x), 5) for x in c.float() / c.sum()] for c in self.counts]
        return out
