"""Scale-out on torch.distributed: expert parallelism (EP) over real ranks, data parallelism (DP) for the rest.

Launch with torchrun; the ranks form a 2-D device mesh of shape (dp, ep), rank = dp_rank * ep + ep_rank:

    ep  ranks of one row hold ONE copy of the model between them: each holds every non-expert weight and a
        contiguous block of E / ep routed experts per MoE layer (rank r: experts r*E/ep ... (r+1)*E/ep - 1).
        Device groups map onto ranks (n_group = ep or a multiple of it), so V2's device-limited routing
        (topk_group = M) bounds the ranks a token visits by M. Token copies move with all_to_all_single.
    dp  rows are replicas. Every rank reads its own slice of the global batch; non-expert gradients are
        averaged over all ranks (DDP), expert gradients over the dp ranks holding the same expert block.

The model never mentions ranks: `wrap` swaps each MoE layer's dispatcher for an `AllToAllDispatcher` (same
dispatch()/combine() interface as moe.LocalDispatcher), shards the stacked expert weights, moves token dropping
to the ranks where the tokens arrive (`ArrivalTokenDrop`) and wraps the model in DDP. With one process,
`Parallel()` is the identity everywhere, so train.py calls the same methods either way.

Exactness. The all-to-all dispatcher keeps the single-process order of token copies (by expert, then by global
token index), so the grouped GEMMs see the same rows in the same order; dropping decides on the same global
candidates with the same capacity and tie-breaks when the expert-parallel group spans the batch (world = ep).
Each sequence lives on one rank, so the per-sequence balance losses are local and their batch mean is the mean
over ranks. Hence an ep-rank run reproduces the one-process run up to float re-association (tests hold 1e-5).
With dp > 1 each replica drops within its own share of the batch, as separate devices would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .losses import device_capacity, drop_over_capacity
from .moe import MoE
from .router import Routing

T_ = TypeVar("T_")


class ParallelError(ValueError):
    """A parallel setting that cannot work; the message says which and how to fix it."""


class RankError(RuntimeError):
    """Raised on every other rank when one rank fails in a section they run together (Parallel.together)."""


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


class _Exchange:
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


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single: the backward sends the gradients back with the splits swapped.

    With `pending` (a list), the forward only starts the exchange and appends its work handle; the caller must
    wait on it before reading the output (this is how the shared experts run while tokens are in flight).
    """

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], ex: _Exchange, pending: list | None):
        ctx.send, ctx.recv, ctx.ex = send, recv, ex
        out, work = ex(x, send, recv, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.ex(grad, ctx.recv, ctx.send)[0], None, None, None, None


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


class AllToAllDispatcher:
    """Expert-parallel dispatch: same interface as moe.LocalDispatcher, over the ranks of one process group.

    dispatch: sort kept assignments by expert; send ONE copy of a token to each rank holding any of its experts
    (so a token costs at most M copies under device-limited routing, however many of its K experts share a
    rank), plus per assignment its local expert and copy index; on arrival expand copies to assignments and
    sort them by local expert for the grouped GEMM. combine: weight each result by its gate weight (sent along,
    differentiable), sum per copy on the expert's rank, send the sums back, add them up per token.
    Collectives per layer: counts, metadata, tokens (async), gate weights, results; backward: the last three.
    """

    def __init__(self, n_experts: int, group: dist.ProcessGroup, stats: CommStats):
        self.ex = _Exchange(group, stats)
        self.stats = stats
        self.n_experts, self.n_local = n_experts, n_experts // self.ex.size
        self.last: AllToAllDispatched | None = None

    def dispatch(self, x_TD: Tensor, routing: Routing, overlap: Callable[[], Tensor] | None = None,
                 ) -> tuple[Tensor, Tensor, AllToAllDispatched]:
        ex, L = self.ex, self.n_local
        T, K = routing.experts_TK.shape
        expert_A = routing.experts_TK.flatten()
        if routing.keep_TK is not None:  # dropped assignments sort past the last expert and are cut off
            expert_A = expert_A.masked_fill(~routing.keep_TK.flatten(), self.n_experts)
        slot_A = torch.argsort(expert_A, stable=True)
        slot_N = slot_A if routing.keep_TK is None else slot_A[: int(routing.keep_TK.sum())]
        expert_N, token_N = expert_A[slot_N], slot_N // K
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
        recv_x = _AllToAll.apply(x_TD[token_P], send_rows, recv_rows, ex, pending)
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
        x_ND = recv_x[row_N]
        if x_ND.shape[0] == 0:  # grouped GEMM backward rejects empty inputs: run one zero row, ignored later
            x_ND = torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[1])])
            counts_E = counts_E.clone()
            counts_E[-1] += 1
        self.stats.tokens += T
        self.stats.copies_on_rank += send_rows[ex.me]
        self.stats.copies_off_rank += sum(send_rows) - send_rows[ex.me]
        ctx = AllToAllDispatched(slot_N, token_P, send_assign, recv_assign, send_rows, recv_rows, row_N, order_N,
                                 T, torch.bincount(token_P, minlength=T), overlapped)
        self.last = dataclasses.replace(ctx, overlapped=None)  # for inspection, without holding activations
        return x_ND, counts_E, ctx

    def combine(self, y_ND: Tensor, weights_TK: Tensor, d: AllToAllDispatched) -> Tensor:
        n = d.row_N.shape[0]
        w_N = _AllToAll.apply(weights_TK.flatten()[d.slot_N], d.send_assign, d.recv_assign, self.ex, None)
        w_N = w_N[d.order_N]
        y_ND = y_ND[:n]  # drop the padding row of an empty arrival
        out_RD = y_ND.new_zeros(sum(d.recv_rows), y_ND.shape[-1])
        out_RD = out_RD.index_add(0, d.row_N, (y_ND * w_N[:, None]).to(y_ND.dtype))
        back_PD = _AllToAll.apply(out_RD, d.recv_rows, d.send_rows, self.ex, None)
        return back_PD.new_zeros(d.n_tokens, back_PD.shape[-1]).index_add(0, d.token_P, back_PD)


# ------------------------------------------------------------------------------------------------------------
# token dropping where the tokens arrive
class ArrivalTokenDrop:
    """MoE.token_drop policy for expert parallelism, wrapping train.DeviceTokenDrop (its capacity_factor and
    protect mask in, its dropped/assignments counters out).

    Each rank sends, per assignment, the chosen expert's affinity, device group and protection to the rank
    holding the expert; that rank applies the device capacity rule (losses.drop_over_capacity) to what
    arrives, with capacity ceil(capacity_factor * N / n_group) from the N assignments of the whole
    expert-parallel group, and returns keep bits. Dropped assignments are then never dispatched.
    """

    def __init__(self, local: Any, n_experts: int, n_group: int, group: dist.ProcessGroup, stats: CommStats):
        self.local = local
        self.ex = _Exchange(group, stats)
        self.n_experts, self.n_group = n_experts, n_group
        self.group_local = n_group // self.ex.size

    def __call__(self, routing: Routing, batch_size: int) -> Tensor:
        ex = self.ex
        T, K = routing.experts_TK.shape
        experts_A = routing.experts_TK.flatten()
        group_A = experts_A // (self.n_experts // self.n_group)
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


# ------------------------------------------------------------------------------------------------------------
# process groups, wrapping, gradients, checkpoints
class Parallel:
    """The ranks of a run and what train.py asks of them. `Parallel()` is the one-process identity."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, expert_parallel: int = 1,
                 mesh: Any = None, owns_process_group: bool = False):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.ep, self.dp = expert_parallel, world // expert_parallel
        self.ep_rank, self.dp_rank = rank % expert_parallel, rank // expert_parallel
        self.mesh = mesh
        self.ep_group = mesh.get_group("ep") if mesh is not None else None
        self.dp_group = mesh.get_group("dp") if mesh is not None else None
        self.owns_process_group = owns_process_group
        self.comm = CommStats()
        self.expert_params: dict[int, int] = {}  # id(sharded expert parameter) -> experts in the full tensor
        self.dispatchers: list[AllToAllDispatcher] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Parallel(world={self.world}, rank={self.rank}, dp={self.dp}, ep={self.ep})"

    # -- lifecycle --------------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block that may fail on some ranks only (rank 0's file writes, a check one rank makes): it ends in a
        collective at which every rank learns whether any failed, and the others then raise RankError, so no
        rank is left waiting in a barrier or an all-to-all for one that has gone."""
        error: BaseException | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            error = e
        if self.world > 1:
            said: list[str | None] = [None] * self.world
            dist.all_gather_object(said, None if error is None else str(error))
            failed = [(r, msg) for r, msg in enumerate(said) if msg is not None]
            if failed and error is None:
                raise RankError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        if error is not None:
            raise error

    def in_turn(self, fn: Callable[[], T_]) -> T_:
        """fn() on rank 0 first, then on each other machine's first rank, then on the rest: file caches
        (tokenizer, token files) are built once per filesystem, never by two ranks at the same time. A failure
        on any rank raises on all (together)."""
        out = None
        for phase in range(3):
            with self.together():
                if phase == (0 if self.rank == 0 else 1 if self.local_rank == 0 else 2):
                    out = fn()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- model --------------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard experts, install the all-to-all dispatcher and arrival-side dropping, wrap in DDP.

        Call after loading weights and installing the token-drop policy, before building the optimizer.
        Returns the module to call for training forwards (DDP, or the model itself with one process);
        everything else (evaluation, saving, the optimizer) keeps using `model`.
        """
        if self.world == 1:
            return model
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        if self.ep > 1:
            check_expert_parallel(model.config, self.ep, self.world)
            for moe in moes:
                self._shard(moe)
        ignore = [name for name, p in model.named_parameters() if id(p) in self.expert_params]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        on_cuda = next(model.parameters()).device.type == "cuda"
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank] if on_cuda else None,
                                                   forward_sync_buffers=False)  # nothing to sync: no buffers

    def _shard(self, moe: MoE) -> None:
        experts, E = moe.experts, moe.experts.n_experts
        lo, hi = self.ep_rank * E // self.ep, (self.ep_rank + 1) * E // self.ep
        for name in ("gate_up_proj", "down_proj"):
            p = nn.Parameter(getattr(experts, name).detach()[lo:hi].clone())
            setattr(experts, name, p)
            self.expert_params[id(p)] = E
            # Each rank's loss reaches these experts through the all-to-all, so their local gradient already
            # sums over the ep ranks of the row: scale by 1/ep (before accumulation) so that, averaged over
            # the dp replicas, it is the gradient of the mean loss over all ranks, as DDP gives the rest.
            p.register_hook(lambda g: g / self.ep)
            if self.dp > 1:
                p.register_post_accumulate_grad_hook(self._average_over_replicas)
        experts.n_experts = hi - lo
        moe.dispatcher = AllToAllDispatcher(E, self.ep_group, self.comm)
        self.dispatchers.append(moe.dispatcher)
        if moe.token_drop is not None:
            moe.token_drop = ArrivalTokenDrop(moe.token_drop, E, moe.gate.n_group, self.ep_group, self.comm)

    def _average_over_replicas(self, p: Tensor) -> None:
        # Averaging is idempotent on the part accumulated by earlier micro-batches (already equal on the
        # replicas), so averaging after every backward is right under gradient accumulation too.
        dist.all_reduce(p.grad, group=self.dp_group)
        p.grad.div_(self.dp)

    def is_expert(self, p: Tensor) -> bool:
        return id(p) in self.expert_params

    # -- gradients and metrics ---------------------------------------------------------------------------------
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole (sharded) model: the norm of every expert, all ranks."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.ep == 1:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params]
        norms = [torch.linalg.vector_norm(g) for g in grads]
        expert = [i for i, p in enumerate(params) if self.is_expert(p)]
        if expert:
            sq = torch.stack([norms[i].double() ** 2 for i in expert])
            dist.all_reduce(sq, group=self.ep_group)
            for i, s in zip(expert, sq.sqrt().to(norms[0].dtype), strict=True):
                norms[i] = s
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over all ranks (rank losses are means over equal shares of the batch)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. a stop signal that reached one rank)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, t: Tensor) -> Tensor:
        """t summed over all ranks (a copy)."""
        if self.world == 1:
            return t
        out = t.to(self._device(), copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def _device(self) -> torch.device:
        return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")

    def comm_metrics(self) -> dict[str, float]:
        """This step's expert-parallel traffic, summed over ranks, then the counters are reset. Empty without EP.

        comm_token_copies: token copies sent to another rank by the forward (all MoE layers and micro-batches);
        comm_bytes: bytes sent to other ranks by every all-to-all of the step (forward and backward);
        comm_ranks_per_token: ranks a token visits per MoE layer, its own included, on average.
        """
        if self.ep == 1:
            return {}
        c = self.comm
        t = self.sum(torch.tensor([c.tokens, c.copies_off_rank, c.copies_on_rank, c.bytes_off_rank],
                                  dtype=torch.float64))
        c.reset()
        tokens, off, on, nbytes = t.tolist()
        return {"comm_token_copies": int(off), "comm_bytes": int(nbytes),
                "comm_ranks_per_token": (off + on) / max(tokens, 1)}

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _gather(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.ep)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def full_parameters(self, model: nn.Module) -> dict[str, Tensor]:
        """name -> parameter, the experts gathered from their ranks (a collective: every rank must call it)."""
        return {name: self._gather(p) if self.is_expert(p) else p.detach() for name, p in model.named_parameters()}

    def full_optimizer_tensors(self, opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Optimizer state tensors named state.{index}.{key}, expert moments gathered (collective)."""
        params = [p for g in opt.param_groups for p in g["params"]]
        out = {}
        for name, t in tensors.items():
            p = params[int(name.split(".")[1])]
            out[name] = self._gather(t) if self.is_expert(p) and t.shape == p.shape else t
        return out

    def local_optimizer_tensors(self, opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inverse of full_optimizer_tensors: this rank's block of each expert moment."""
        params = [p for g in opt.param_groups for p in g["params"]]
        out = {}
        for name, t in tensors.items():
            p = params[int(name.split(".")[1])]
            if self.is_expert(p) and t.dim() == p.dim() and t.shape != p.shape:  # moments, not the step count
                E = self.expert_params[id(p)]
                if t.shape != (E, *p.shape[1:]):
                    raise ParallelError(f"optimizer tensor {name} has shape {tuple(t.shape)}, expected "
                                        f"{(E, *p.shape[1:])}")
                t = t[self.ep_rank * p.shape[0]:(self.ep_rank + 1) * p.shape[0]].clone()
            out[name] = t
        return out


def check_expert_parallel(config: Any, ep: int, world: int) -> None:
    """Raise ParallelError unless `ep` ranks can share the routed experts of `config` within `world` ranks."""
    E = config.num_routed
    if ep < 1 or world % ep:
        raise ParallelError(f"expert_parallel={ep} must divide the number of processes ({world})")
    if ep == 1:
        return
    if E == 0:
        raise ParallelError(f"expert_parallel={ep} needs a model with routed experts (n_routed_experts is {E})")
    if E % ep:
        raise ParallelError(f"expert_parallel={ep} must divide n_routed_experts={E}: each rank holds a contiguous "
                            "block of E / expert_parallel experts")
    if config.n_group % ep:
        raise ParallelError(
            f"n_group={config.n_group} must be a multiple of expert_parallel={ep}: device groups map onto ranks so "
            f"that topk_group bounds the ranks a token visits (e.g. --set n_group={ep} --set topk_group=...)")


def init_parallel(expert_parallel: int = 1, device: torch.device | str = "cpu") -> Parallel:
    """A Parallel from the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    Initialises the default process group (gloo on CPU, NCCL on CUDA) unless it already is, and builds the
    (dp, ep) device mesh. Without torchrun (no WORLD_SIZE) it returns the one-process Parallel().
    """
    device = torch.device(device)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if expert_parallel != 1:
            raise ParallelError(f"expert_parallel={expert_parallel} shards the experts over that many processes, "
                                f"but this is one process: launch with torchrun --nproc_per_node="
                                f"{expert_parallel} -m dsv2 train --expert-parallel {expert_parallel} ...")
        return Parallel()
    if expert_parallel < 1 or world % expert_parallel:
        raise ParallelError(f"expert_parallel={expert_parallel} must divide the number of processes ({world})")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))
    return Parallel(world, dist.get_rank(), local_rank, expert_parallel, mesh, owns)


__all__ = ["AllToAllDispatcher", "ArrivalTokenDrop", "CommStats", "Parallel", "ParallelError", "RankError",
           "check_expert_parallel", "init_parallel"]
