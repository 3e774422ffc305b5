"""Communication for expert parallelism: all_to_all_single within a process group, differentiable, with every
byte sent to other ranks counted (CommStats: the communication figures of metrics.jsonl)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


# ------------------------------------------------------------------------------------------------------------
# communication accounting
@dataclass
class CommStats:
    """Per-rank counters of the expert-parallel all-to-alls since the last reset (plain ints: no host syncs)."""

    tokens: int = 0
    """Tokens dispatched (each MoE layer's forward counts its tokens once)."""
    copies_off_rank: int = 0
    """Token copies sent to another rank (one per token and destination rank: copies are deduplicated)."""
    copies_on_rank: int = 0
    """Token copies whose experts live on the token's own rank (no traffic)."""
    bytes_off_rank: int = 0
    """Bytes sent to other ranks by every all-to-all: tokens, results, gate weights, metadata, backward too."""

    def reset(self) -> None:
        self.tokens = self.copies_off_rank = self.copies_on_rank = self.bytes_off_rank = 0


class Exchange:
    """all_to_all_single within one process group, counting the bytes this rank sends to the others."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats):
        self.group, self.stats = group, stats
        self.size, self.me = dist.get_world_size(group), dist.get_rank(group)

    def __call__(self, x: Tensor, send: list[int], recv: list[int], async_op: bool = False):
        x = x.contiguous()
        out = x.new_empty((sum(recv), *x.shape[1:]))
        row_bytes = x[0:1].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        self.stats.bytes_off_rank += (sum(send) - send[self.me]) * row_bytes
        work = dist.all_to_all_single(out, x, recv, send, group=self.group, async_op=async_op)
        return out, work

    def counts(self, counts: Tensor) -> Tensor:
        """Exchange one row of counts per rank: counts [size, ...] -> what each rank sent to this one."""
        return self(counts, [1] * self.size, [1] * self.size)[0]


class AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single: the backward sends the gradients back with the splits swapped.

    With `pending` (a list), the forward only starts the exchange and appends its work handle; the caller must
    wait on it before reading the output (this is how the shared experts run while tokens are in flight).
    """

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], ex: Exchange, pending: list | None):
        ctx.send, ctx.recv, ctx.ex = send, recv, ex
        out, work = ex(x, send, recv, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.ex(grad, ctx.recv, ctx.send)[0], None, None, None, None
