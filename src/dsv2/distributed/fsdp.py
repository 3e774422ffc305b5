"""Fully sharded data parallelism (FSDP2, torch.distributed.fsdp.fully_shard) and activation checkpointing, applied
to a model from outside, as torchtitan applies them.

FSDP2 shards every parameter of each decoder layer, and of the root (embeddings, final norm, LM head), over the
data-parallel ranks of a DeviceMesh: a rank holds 1/N of each weight, its gradient and its AdamW moments, gathers a
layer's weights just before the layer runs (forward and backward) and reduce-scatters its gradients after. With a
2-D mesh (dp_replicate, dp_shard) it is HSDP: sharded within a group of dp_shard ranks, replicated across the
groups (gradients all-reduced between them). Parameters become DTensors; their names do not change, so a
checkpoint's names are the model's own (Parallel.full_parameters gathers them for one).

With expert parallelism (parallel.py) each MoE layer's routed experts are DTensors sharded over the ep ranks of a
(dp, ep) mesh; their own fully_shard over the dp dim shards each block among the ranks that hold it (torchtitan's
MoE layout), so a checkpoint holds every expert once, at its place in the whole stack.

Mixed precision: under bf16 autocast the layers' weights are gathered in bf16 (half the bytes) and gradients reduced
in fp32 (MixedPrecisionPolicy), the master weights and moments stay fp32.

Activation checkpointing keeps, of each layer, only the inputs of its attention block and of its FFN's experts (or
dense MLP) and recomputes their insides in the backward: those are the parts whose activations grow with the
tokens and the widths, and they have no side effects (the router and token dropping, which count what they do, run
once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.moe import MoE


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype | None = None, expert_mesh=None, world: int = 1,
               cpu_offload: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root, over `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP), in
    place. param_dtype: the dtype layers' weights are gathered and computed in (None: their own).

    expert_mesh: with expert parallelism (the routed experts already DTensors over the ep ranks, parallel.py), the
    ranks that hold the same block of experts; each MoE layer's experts are sharded over those first, so that the
    layer's own shard group leaves them out. Their gradients are divided by the `world` size, not by the ranks of
    expert_mesh: a block's local gradient already sums the losses of its ep ranks (the all-to-all brought their
    tokens), so divided by all ranks it is the mean loss's, as the rest of the model's.

    cpu_offload: every shard, its gradient and (built after this) its optimizer state in host memory (FSDP2's
    CPUOffloadPolicy; pinned for fast copies when the layers compute on a GPU)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # the layers' inputs stay as they are (cast_forward_inputs off): RoPE's cos/sin tables are fp32 by design
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    on_gpu = mesh.device_type != "cpu"
    shard = functools.partial(fully_shard, offload_policy=CPUOffloadPolicy(pin_memory=on_gpu) if cpu_offload
                              else OffloadPolicy())
    for layer in model.model.layers:
        if expert_mesh is not None and isinstance(layer.mlp, MoE):
            experts = shard(layer.mlp.experts, mesh=expert_mesh, mp_policy=mp)
            experts.set_gradient_divide_factor(float(world))
            if expert_mesh.size() > 1:
                # A divide factor other than the group's size is NCCL's PREMUL_SUM, which gloo lacks: sum, then
                # divide (on every backend, so CUDA runs the same path). Not on a group of one rank (world = ep):
                # torch 2.13 then divides twice, once in its copy for one rank and once after it.
                experts.set_force_sum_reduction_for_comms(True)
        shard(layer, mesh=mesh, mp_policy=mp)
    # the root (embeddings, final norm, LM head) in its own dtype: the residual stream starts fp32, as in one process
    root = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    shard(model, mesh=mesh, mp_policy=root, reshard_after_forward=False)  # it runs last in the forward
    return model


def by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """params split by the DeviceMesh they are DTensors over (plain tensors: one group), in first-seen order. With
    expert parallelism under FSDP2 the experts and the rest live on different meshes, and DTensor's foreach kernels
    (AdamW's, the gradient clipping's) refuse a list that mixes meshes: each group is one such list."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(getattr(p, "device_mesh", None), []).append(p)
    return list(groups.values())


Full = Callable[[str, torch.Size, "tuple[int, int] | None"], torch.Tensor]
"""(name, whole shape, rows (lo, hi) or None) -> the parameter's rows lo .. hi-1 along dim 0, or all of it."""


def materialize(model: nn.Module, device: torch.device, full: Full | None) -> nn.Module:
    """A model built on the meta device and sharded: give every rank memory for its shards only, then, with
    `full` (e.g. read from a checkpoint, which reads the rows asked for alone, or drawn from the run's seed, which
    draws each whole parameter), fill each shard from the rows it covers, one parameter at a time: no rank ever
    holds the whole model. The pieces are cut on the host: no collective, and under CPU offload no trip through the
    accelerator."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    model.to_empty(device=device)
    config = getattr(model, "config", None)
    if config is not None and config.tie_word_embeddings:  # to_empty gives each module a new Parameter: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    if full is None:  # filled later (a distributed checkpoint loads straight into the shards)
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not isinstance(p, DTensor):
                p.copy_(full(name, p.shape, None))
                continue
            # this rank's region of p, by the rule DCP saves shards with (FSDP2 and EP split dim 0 only)
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            piece = full(name, p.shape, (offset[0], offset[0] + shape[0]))
            for dim in range(1, p.dim()):
                piece = piece.narrow(dim, offset[dim], shape[dim])
            p.to_local().copy_(piece)
            del piece
    return model


def seeded_init(seed: int, std: float) -> Full:
    """A fresh model's whole parameters, asked for in parameter order: ones for norms, N(0, std) for matrices, drawn
    from the seed in that order (DeepseekV2.init_weights' rule), so one process and any sharded run, which both
    build the model on the meta device and materialize it with this, start from the same weights."""
    torch.manual_seed(seed)

    def full(_name: str, shape: torch.Size, rows: tuple[int, int] | None = None) -> torch.Tensor:
        whole = torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0.0, std)  # the draws: all
        return whole if rows is None else whole[rows[0]:rows[1]]
    return full


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each layer's attention block and experts (or dense MLP) in the backward, in place; the state
    dict is unchanged (the modules' forwards are wrapped, not the modules)."""
    for layer in model.model.layers:
        ffn = layer.mlp.experts if isinstance(layer.mlp, MoE) else layer.mlp
        for m in (layer.self_attn, ffn):
            m.forward = functools.partial(_checkpointed, m.forward)
    return model
