"""Scale-out on torch.distributed: expert parallelism (EP) over real ranks, data parallelism (DP) for the rest.

Launch with torchrun; the ranks form a 2-D device mesh of shape (dp, ep), rank = dp_rank * ep + ep_rank:

    ep  ranks of one row hold ONE copy of the model between them: each holds every non-expert weight and a
        contiguous block of E / ep routed experts per MoE layer (rank r: experts r*E/ep ... (r+1)*E/ep - 1).
        Device groups map onto ranks (n_group = ep or a multiple of it), so V2's device-limited routing
        (topk_group = M) bounds the ranks a token visits by M. A model without device groups (n_group = 1,
        V2-Lite's greedy routing) takes any ep: its tokens may visit every rank, and token dropping's devices are
        then the ep ranks. Token copies move with all_to_all_single.
    dp  rows are replicas. Every rank reads its own slice of the global batch; non-expert gradients are
        averaged over all ranks (DDP), expert gradients over the dp ranks holding the same expert block.

With FSDP2 (fsdp.py) the same mesh carries the experts (DTensors over ep, FSDP-sharded over dp) and the rest of
the model is FSDP-sharded over its own mesh (all ranks, or (dp_replicate, dp_shard) for HSDP), instead of DDP.

The model never mentions ranks: `wrap` swaps each MoE layer's dispatcher for an `AllToAllDispatcher` (same
dispatch()/combine() interface as moe.LocalDispatcher), shards the stacked expert weights and wraps the model in
DDP; `token_drop` moves the trainer's token dropping to the ranks where the tokens arrive (`ArrivalTokenDrop`);
`micro_batch` syncs gradients in the last micro-batch of a step only. With one process, `Parallel()` is the
identity everywhere, so the trainer calls the same methods either way.

Exactness. The all-to-all dispatcher keeps the single-process order of token copies (by expert, then by global
token index), so the grouped GEMMs see the same rows in the same order; dropping decides on the same global
candidates with the same capacity and tie-breaks when the expert-parallel group spans the batch (world = ep).
Each sequence lives on one rank, so the per-sequence balance losses are local and their batch mean is the mean
over ranks. Hence an ep-rank run reproduces the one-process run up to float re-association (tests hold 1e-5).
With dp > 1 each replica drops within its own share of the batch, as separate devices would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..config import ModelConfig
from ..model.moe import MoE, TokenDropPolicy
from .comm import CommStats
from .expert_parallel import AllToAllDispatcher, ArrivalTokenDrop
from .fsdp import apply_fsdp, by_mesh

T_ = TypeVar("T_")


class ParallelError(ValueError):
    """A parallel setting that cannot work; the message says which and how to fix it."""


class RankError(RuntimeError):
    """Raised on every other rank when one rank fails in a section they run together (Parallel.together)."""


# ------------------------------------------------------------------------------------------------------------
# process groups, wrapping, gradients, checkpoints
class Parallel:
    """The ranks of a run and what the trainer asks of them. `Parallel()` is the one-process identity."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, expert_parallel: int = 1,
                 mesh: Any = None, owns_process_group: bool = False, fsdp_mesh: Any = None, cpu_offload: bool = False):
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
        self.syncing = True  # False inside micro_batch(last=False): gradients accumulate locally
        self.fsdp_mesh = fsdp_mesh  # FSDP2's mesh (fsdp.py) instead of DDP, or None
        self.cpu_offload = cpu_offload  # FSDP2 keeps the shards and their optimizer state in host memory

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
    def wrap(self, model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
        """Shard experts, install the all-to-all dispatcher, wrap in DDP; or, with an FSDP mesh, fully_shard it
        (fsdp.py: layers gathered in param_dtype, None: their own).

        Call after loading weights (or on the meta device, then fsdp.materialize), before building the optimizer.
        Returns the module to call for training forwards (DDP, or the model itself with one process);
        everything else (evaluation, saving, the optimizer) keeps using `model`.
        """
        if self.world == 1:
            return model
        moes = [m for m in model.modules() if isinstance(m, MoE)] if self.ep > 1 else []
        if self.ep > 1:
            check_expert_parallel(model.config, self.ep, self.world)
        if self.fsdp_mesh is not None:  # the trainer calls the model itself: FSDP2's hooks are on its modules
            for moe in moes:
                self._place_experts(moe)
            return apply_fsdp(model, self.fsdp_mesh, param_dtype, self.mesh["dp"] if moes else None, self.world,
                              self.cpu_offload)
        for moe in moes:
            self._hook_experts(moe)
        ignore = [name for name, p in model.named_parameters() if id(p) in self.expert_params]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        on_cuda = next(model.parameters()).device.type == "cuda"
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank] if on_cuda else None,
                                                   forward_sync_buffers=False)  # nothing to sync: no buffers

    def shard_device(self, device: torch.device) -> torch.device:
        """Where a sharded model's shards live (fsdp.materialize): the host under CPU offload, else `device`."""
        return torch.device("cpu") if self.cpu_offload else device

    def _shard(self, moe: MoE) -> list[nn.Parameter]:
        """Keep this rank's block of E / ep experts, install the all-to-all dispatcher; the block's parameters."""
        experts, E = moe.experts, moe.experts.n_experts
        moe.dispatcher = AllToAllDispatcher(E, self.ep_group, self.comm)
        self.dispatchers.append(moe.dispatcher)
        return experts.shard(self.ep_rank * E // self.ep, (self.ep_rank + 1) * E // self.ep)

    def _hook_experts(self, moe: MoE) -> None:
        """Expert parallelism under DDP: the block's gradients are made the mean loss's by hooks (DDP ignores them)."""
        E = moe.experts.n_experts
        for p in self._shard(moe):
            self.expert_params[id(p)] = E
            if not p.requires_grad:  # frozen (a LoRA run's base experts): sharded, never updated
                continue
            # Each rank's loss reaches these experts through the all-to-all, so their local gradient already
            # sums over the ep ranks of the row: scale by 1/ep (before accumulation) so that, averaged over
            # the dp replicas, it is the gradient of the mean loss over all ranks, as DDP gives the rest.
            p.register_hook(lambda g: g / self.ep)
            if self.dp > 1:
                p.register_post_accumulate_grad_hook(self._average_over_replicas)

    def _place_experts(self, moe: MoE) -> None:
        """Expert parallelism under FSDP2 (torchtitan's layout): the block as DTensors sharded over the ep ranks, so
        a checkpoint names every expert at its place in the whole stack (any layout loads it); apply_fsdp then
        shards each block over the ranks holding the same experts and scales its gradients as DDP's hooks do."""
        block = {id(p) for p in self._shard(moe)}
        for module in moe.experts.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) in block:
                    placed = DTensor.from_local(p.detach(), self.mesh["ep"], [Shard(0)], run_check=False)
                    setattr(module, name, nn.Parameter(placed, requires_grad=p.requires_grad))

    def token_drop(self, policy: Any, config: ModelConfig) -> TokenDropPolicy | None:
        """The token-dropping policy for the training forward: with expert parallelism, the trainer's `policy`
        (a DeviceTokenDrop) applied where the tokens arrive, ArrivalTokenDrop (which reads its settings and adds
        to its counters); otherwise `policy` itself. None: no dropping."""
        if self.ep == 1 or policy is None:
            return policy
        devices = self.ep if config.n_group == 1 else config.n_group  # no device groups: the ranks are the devices
        return ArrivalTokenDrop(policy, config.num_routed, devices, self.ep_group, self.comm)

    def _average_over_replicas(self, p: Tensor) -> None:
        # Under micro_batch only the last backward of a step averages, the sum of every micro-batch's gradient.
        # Outside it every backward does: averaging is idempotent on the part accumulated by earlier
        # micro-batches (already equal on the replicas), so that is right under gradient accumulation too.
        if not self.syncing:
            return
        dist.all_reduce(p.grad, group=self.dp_group)
        p.grad.div_(self.dp)

    @contextlib.contextmanager
    def micro_batch(self, net: nn.Module, last: bool) -> Iterator[None]:
        """The forward and backward of one micro-batch through `net` (what wrap returned). Gradients are averaged
        over the ranks in the last micro-batch of a step only (last=True); the others accumulate them locally
        (DDP's no_sync, and no averaging of the expert gradients over the replicas): one all-reduce a step. Under
        FSDP every micro-batch reduce-scatters: skipping it would keep each layer's whole gradient on every rank
        until the last one."""
        if self.world == 1 or last or self.fsdp_mesh is not None:
            yield
            return
        self.syncing = False
        try:
            with net.no_sync():
                yield
        finally:
            self.syncing = True

    def is_expert(self, p: Tensor) -> bool:
        return id(p) in self.expert_params

    # -- gradients and metrics ---------------------------------------------------------------------------------
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole (sharded) model: the norm of every expert, all ranks."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        if self.ep == 1 or self.fsdp_mesh is not None:  # every sharded gradient a DTensor: its norm over all ranks
            groups = by_mesh(params)
            norms = [_full(torch.nn.utils.get_total_norm([p.grad for p in ps])) for ps in groups]
            total = torch.linalg.vector_norm(torch.stack(norms))
            for ps in groups:
                torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
            return total
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

    def full_parameters(self, model: nn.Module, trainable_only: bool = False) -> dict[str, Tensor]:
        """name -> parameter, the experts gathered from their ranks (a collective: every rank must call it);
        trainable_only: those that require a gradient (a LoRA run's adapters)."""
        return {name: self._gather(p) if self.is_expert(p) else _full(p.detach())
                for name, p in model.named_parameters() if p.requires_grad or not trainable_only}

    def full_tensor(self, p: Tensor, t: Tensor) -> Tensor:
        """t, a state tensor of parameter p (an optimizer moment), with every rank's experts if p is a sharded
        expert parameter (a collective: every rank calls it, in the same order)."""
        return self._gather(t) if self.is_expert(p) and t.shape == p.shape else _full(t)

    def local_tensor(self, p: Tensor, t: Tensor, what: str) -> Tensor:
        """The inverse of full_tensor: this rank's block of t if p is a sharded expert parameter, its shard if p
        is FSDP2's (a DTensor: any world size takes a checkpoint, every rank cuts its own shard)."""
        if isinstance(p, DTensor) and t.dim() == p.dim():
            if t.shape != p.shape:
                raise ParallelError(f"{what} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        if self.is_expert(p) and t.dim() == p.dim() and t.shape != p.shape:  # moments, not the step count
            E = self.expert_params[id(p)]
            if t.shape != (E, *p.shape[1:]):
                raise ParallelError(f"{what} has shape {tuple(t.shape)}, expected {(E, *p.shape[1:])}")
            t = t[self.ep_rank * p.shape[0]:(self.ep_rank + 1) * p.shape[0]].clone()
        return t


def _full(t: Tensor) -> Tensor:
    """A DTensor (FSDP2's shards) gathered whole on every rank (a collective); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


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
    if config.n_group % ep and config.n_group != 1:
        raise ParallelError(
            f"n_group={config.n_group} must be 1 or a multiple of expert_parallel={ep}: device groups map onto ranks "
            f"so that topk_group bounds the ranks a token visits (e.g. --set n_group={ep} --set topk_group=...)")


def init_parallel(expert_parallel: int = 1, device: torch.device | str = "cpu", fsdp: bool = False,
                  dp_replicate: int = 1, dp_shard: int | None = None, cpu_offload: bool = False) -> Parallel:
    """A Parallel from the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    Initialises the default process group (gloo on CPU, NCCL on CUDA; under CPU offload NCCL for CUDA tensors and
    gloo for the host's: the offloaded gradients' norm is a collective over them) unless it already is,
    and builds the (dp, ep) device mesh, and with fsdp FSDP2's (dp_replicate, dp_shard) mesh. Without torchrun (no
    WORLD_SIZE) it returns the one-process Parallel().
    """
    device = torch.device(device)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if fsdp:
            raise ParallelError("--fsdp shards the model over processes, but this is one process: launch with "
                                "torchrun --nproc_per_node=N -m dsv2 train --fsdp ...")
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
        dist.init_process_group(("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if device.type == "cuda" else "gloo")
        owns = True
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))
    fsdp_mesh = _fsdp_mesh(device, world, dp_replicate, dp_shard) if fsdp else None
    return Parallel(world, dist.get_rank(), local_rank, expert_parallel, mesh, owns, fsdp_mesh, cpu_offload)


def _fsdp_mesh(device: torch.device, world: int, dp_replicate: int, dp_shard: int | None):
    """FSDP2's mesh for all but the routed experts (with expert parallelism theirs is the (dp, ep) mesh, fsdp.py):
    dp_shard = world / dp_replicate ranks shard each weight; 1-D without replication (FSDP), 2-D (dp_replicate,
    dp_shard) with it (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    if dp_replicate < 1 or world % dp_replicate:
        raise ParallelError(f"--dp-replicate {dp_replicate} must divide the number of processes ({world})")
    shard = world // dp_replicate
    if dp_shard is not None and dp_shard != shard:
        raise ParallelError(f"--dp-shard {dp_shard} x --dp-replicate {dp_replicate} must be the number of "
                            f"processes ({world}): --dp-shard {shard}")
    if dp_replicate == 1:
        return init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device.type, (dp_replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


__all__ = ["Parallel", "ParallelError", "RankError", "check_expert_parallel", "init_parallel"]
