"""Expert parallelism: the routed experts of each MoE layer sharded over the ranks of a process group.

`AllToAllDispatcher` has the interface of model.moe.LocalDispatcher (dispatch / combine) and reuses its sort of the
kept assignments by expert; it sends one copy of a token to each rank holding any of its experts (so under
device-limited routing a token costs at most M copies), and brings the weighted results back. `ArrivalTokenDrop`
applies the device capacity rule (model/capacity.py) where the tokens arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..model.capacity import device_capacity, drop_over_capacity
from ..model.moe import LocalDispatcher
from ..model.router import Routing, device_group
from .comm import AllToAll, CommStats, Exchange


# ------------------------------------------------------------------------------------------------------------
# the all-to-all dispatcher
@dataclass
class AllToAllDispatched:
    """What combine() needs; `ranks_per_token` and `send_rows` are kept for inspection (tests, accounting)."""

    slot_N: Tensor  # kept assignments (index into the flat [T*K]) in send order: by expert, then token
    token_P: Tensor  # source token of each (token, rank) copy sent, in send order: by rank, then token
    send_assign: list[int]  # assignments sent to each rank
    recv_assign: list[int]  # assignments received from each rank
    send_rows: list[int]  # token copies sent to each rank
    recv_rows: list[int]  # token copies received from each rank
    row_N: Tensor  # arrived copy (row of the receive buffer) of each arrived assignment, expert-sorted
    order_N: Tensor  # arrival order -> expert-sorted order of the arrived assignments
    n_tokens: int
    ranks_per_token: Tensor  # [T] ranks each token was sent to (<= topk_group under group_limited_greedy)
    overlapped: Tensor | None = None  # the result of dispatch(overlap=...), computed while tokens were in flight


class AllToAllDispatcher(LocalDispatcher):
    """Expert-parallel dispatch: LocalDispatcher's interface and sort, over the ranks of one process group.

    dispatch: sort kept assignments by expert; send ONE copy of a token to each rank holding any of its experts
    (so a token costs at most M copies under device-limited routing, however many of its K experts share a
    rank), plus per assignment its local expert and copy index; on arrival expand copies to assignments and
    sort them by local expert for the grouped GEMM. combine: weight each result by its gate weight (sent along,
    differentiable), sum per copy on the expert's rank, send the sums back, add them up per token.
    Collectives per layer: counts, metadata, tokens (async), gate weights, results; backward: the last three.
    """

    def __init__(self, n_experts: int, group: dist.ProcessGroup, stats: CommStats):
        super().__init__(n_experts)
        self.ex = Exchange(group, stats)
        self.stats = stats
        self.n_local = n_experts // self.ex.size

    def dispatch(self, x_TD: Tensor, routing: Routing, overlap: Callable[[], Tensor] | None = None,
                 ) -> tuple[Tensor, Tensor, AllToAllDispatched]:
        ex, L = self.ex, self.n_local
        T, K = routing.experts_TK.shape
        slot_N, _ = self.sort(routing)
        expert_N, token_N = routing.experts_TK.flatten()[slot_N], slot_N // K
        dest_N = expert_N // L
        # one copy per (token, destination rank), ordered by rank then token
        pair_P, copy_N = torch.unique(dest_N * T + token_N, sorted=True, return_inverse=True)
        dest_P, token_P = pair_P // T, pair_P % T
        rows_R = torch.bincount(dest_P, minlength=ex.size)
        assign_R = torch.bincount(dest_N, minlength=ex.size)
        first_row_R = rows_R.cumsum(0) - rows_R
        recv_counts = ex.counts(torch.stack([rows_R, assign_R], 1))
        send_rows, send_assign = rows_R.tolist(), assign_R.tolist()
        recv_rows, recv_assign = recv_counts[:, 0].tolist(), recv_counts[:, 1].tolist()
        # metadata per assignment: its expert on the destination rank, and its copy among those sent there
        meta_N2 = torch.stack([expert_N - dest_N * L, copy_N - first_row_R[dest_N]], 1)
        recv_meta, _ = ex(meta_N2, send_assign, recv_assign)
        pending: list = []
        recv_x = AllToAll.apply(x_TD[token_P], send_rows, recv_rows, ex, pending)
        overlapped = overlap() if overlap is not None else None
        pending[0].wait()
        # arrival: assignments come by source rank; a stable sort by local expert keeps (source, token) order,
        # which is the single-process order (expert, global token index)
        local_expert = recv_meta[:, 0]
        recv_rows_R = torch.tensor(recv_rows, device=x_TD.device)
        recv_first = recv_rows_R.cumsum(0) - recv_rows_R
        source = torch.repeat_interleave(torch.arange(ex.size, device=x_TD.device),
                                         torch.tensor(recv_assign, device=x_TD.device))
        order_N = torch.argsort(local_expert, stable=True)
        row_N = (recv_meta[:, 1] + recv_first[source])[order_N]
        counts_E = torch.bincount(local_expert, minlength=L)
        x_ND = recv_x.index_select(0, row_N)  # its gradient adds in order (moe.LocalDispatcher.dispatch)
        if x_ND.shape[0] == 0:  # grouped GEMM backward rejects empty inputs: run one zero row, ignored later
            x_ND = torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[1])])
            counts_E = counts_E.clone()
            counts_E[-1] += 1
        self.stats.tokens += T
        self.stats.copies_on_rank += send_rows[ex.me]
        self.stats.copies_off_rank += sum(send_rows) - send_rows[ex.me]
        ctx = AllToAllDispatched(slot_N, token_P, send_assign, recv_assign, send_rows, recv_rows, row_N, order_N,
                                 T, torch.bincount(token_P, minlength=T), overlapped)
        return x_ND, counts_E, ctx

    def combine(self, y_ND: Tensor, weights_TK: Tensor, d: AllToAllDispatched) -> Tensor:
        n = d.row_N.shape[0]
        w_N = AllToAll.apply(weights_TK.flatten()[d.slot_N], d.send_assign, d.recv_assign, self.ex, None)
        w_N = w_N[d.order_N]
        y_ND = y_ND[:n]  # drop the padding row of an empty arrival
        out_RD = y_ND.new_zeros(sum(d.recv_rows), y_ND.shape[-1])
        out_RD = out_RD.index_add(0, d.row_N, self.weigh(y_ND, w_N))
        back_PD = AllToAll.apply(out_RD, d.recv_rows, d.send_rows, self.ex, None)
        return back_PD.new_zeros(d.n_tokens, back_PD.shape[-1]).index_add(0, d.token_P, back_PD)


# ------------------------------------------------------------------------------------------------------------
# token dropping where the tokens arrive
class ArrivalTokenDrop:
    """The token-dropping policy (model.moe.TokenDropPolicy) of expert parallelism, wrapping the trainer's
    DeviceTokenDrop (its capacity_factor and protect mask in, its dropped/assignments counters out); one for every
    MoE layer (Parallel.token_drop).

    Each rank sends, per assignment, the chosen expert's affinity, device group and protection to the rank
    holding the expert; that rank applies the device capacity rule (model/capacity.py drop_over_capacity) to what
    arrives, with capacity ceil(capacity_factor * N / n_group) from the N assignments of the whole
    expert-parallel group, and returns keep bits. Dropped assignments are then never dispatched.
    """

    def __init__(self, local: Any, n_experts: int, n_group: int, group: dist.ProcessGroup, stats: CommStats):
        self.local = local
        self.ex = Exchange(group, stats)
        self.n_experts, self.n_group = n_experts, n_group
        self.group_local = n_group // self.ex.size

    def __call__(self, routing: Routing, batch_size: int) -> Tensor:
        ex = self.ex
        T, K = routing.experts_TK.shape
        experts_A = routing.experts_TK.flatten()
        group_A = device_group(experts_A, self.n_experts, self.n_group)
        dest_A = group_A // self.group_local
        affinity_A = routing.scores_TE.detach().gather(-1, routing.experts_TK).flatten()
        protect_B = self.local.protect
        if protect_B is None:
            protect_B = torch.zeros(batch_size, dtype=torch.bool, device=experts_A.device)
        protected_A = protect_B.to(experts_A.device).repeat_interleave(T // batch_size * K)
        order_A = torch.argsort(dest_A, stable=True)  # by destination, then flat (= global) index
        send_R = torch.bincount(dest_A, minlength=ex.size)
        recv = ex.counts(torch.stack([send_R, torch.full_like(send_R, T * K)], 1))
        send, recv_n = send_R.tolist(), recv[:, 0].tolist()
        payload = torch.stack([affinity_A.double(), (group_A * 2 + protected_A).double()], 1)[order_A]
        got, _ = ex(payload, send, recv_n)
        code = got[:, 1].long()
        capacity = device_capacity(recv[:, 1].sum(), self.n_group, self.local.capacity_factor)
        keep = drop_over_capacity(code // 2 - ex.me * self.group_local, got[:, 0].float(), self.group_local,
                                  capacity, code % 2 == 1)
        back, _ = ex(keep, recv_n, send)
        keep_A = torch.empty_like(back).scatter_(0, order_A, back)
        self.local.dropped += int((~keep).sum())
        self.local.assignments += T * K
        return keep_A.view(T, K)
