"""Training memory per rank under a parallel layout, from the config alone (`dsv2 info CONFIG --parallel ...`).

What a rank holds for AdamW training with fp32 master weights, per parameter it owns: the weight (4 bytes), its
gradient (4) and the two moments (8): 16 bytes. Which parameters it owns:

- routed experts: E / ep of each MoE layer's experts (expert parallelism); under FSDP, of those 1 / dp_shard
  without expert parallelism, 1 / (world / ep) with it (each block sharded over every rank that holds it, replicas
  included: distributed/fsdp.py);
- everything else: all of it (DDP replicates), or 1 / dp_shard under FSDP (HSDP: dp_shard = world / dp_replicate).

Buffers on top: DDP keeps its gradient buckets, a second fp32 copy of every gradient it all-reduces (the non-expert
ones). FSDP holds, while a layer runs, the layer's weights gathered whole in the compute dtype (the largest layer,
twice: FSDP2 prefetches the next one), in its backward the layer's whole gradient (compute dtype) and its fp32
reduce-scatter input, and the root (embeddings, final norm, LM head) gathered for the whole step. Activations depend
on the batch and are not counted (with --activation-checkpointing, each layer keeps its inputs only). Under FSDP's
CPU offload the 16 bytes a parameter live in host memory and the accelerator holds the buffers alone.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .info import _parameters

STATE_BYTES = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments


def memory_per_rank(config: ModelConfig, world: int, *, expert_parallel: int = 1, fsdp: bool = False,
                    dp_replicate: int = 1, compute_bytes: int = 2, cpu_offload: bool = False) -> dict[str, Any]:
    """Bytes one rank needs for weights, gradients, optimizer state and the parallelism's buffers (ValueError for a
    layout that cannot be); "total" is what the device the layers compute on holds, "host" what CPU offload moves
    off it (on a CPU run both are host memory). compute_bytes: 2 under bf16 autocast, 4 in fp32."""
    ep = expert_parallel
    if cpu_offload and not fsdp:
        raise ValueError("--cpu-offload applies with --fsdp: it moves FSDP's shards to the host")
    if world < 1 or ep < 1 or world % ep or dp_replicate < 1 or world % dp_replicate:
        raise ValueError(f"world {world} must be a multiple of expert_parallel {ep} and of dp_replicate "
                         f"{dp_replicate}")
    if config.num_routed and config.num_routed % ep:
        raise ValueError(f"expert_parallel {ep} must divide n_routed_experts {config.num_routed}")
    p, _, _ = _parameters(config)
    shard = world // dp_replicate if fsdp else 1
    expert_shard = (world // ep if ep > 1 else shard) if fsdp else 1
    experts, rest = p["routed_experts"], p["total"] - p["routed_experts"]
    params = experts / ep / expert_shard + rest / shard
    layer = p["per_layer"]
    routed = config.num_routed * layer["routed_expert"]  # one MoE layer's; a rank gathers or holds 1 / ep of them
    largest = layer["attention"] + layer["norms"] + max(layer["dense_ffn"], layer["moe_ffn"] - routed + routed / ep)
    root = p["embedding"] + p["lm_head"] + config.hidden_size
    buffers = ((2 * largest + root) * compute_bytes + largest * (compute_bytes + 4)) if fsdp else 4 * rest
    return {"world": world, "expert_parallel": ep, "fsdp": fsdp, "dp_shard": shard, "dp_replicate": dp_replicate,
            "parameters_owned": params, "weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params,
            "buffers": buffers, "cpu_offload": cpu_offload, "host": STATE_BYTES * params if cpu_offload else 0,
            "total": (0 if cpu_offload else STATE_BYTES * params) + buffers}


def format_memory(m: dict[str, Any]) -> str:
    gib = 2 ** 30
    ep = m["expert_parallel"]
    experts = (f", experts over {ep}" + (f", each block FSDP over {m['world'] // ep}" if m["fsdp"] else "")
               if ep > 1 else "")
    layout = (f"{m['world']} ranks: " + (f"FSDP over {m['dp_shard']}" + (f" x {m['dp_replicate']} replicas (HSDP)"
              if m["dp_replicate"] > 1 else "") if m["fsdp"] else "DDP") + experts)
    rows = [("parameters owned", f"{m['parameters_owned'] / 1e9:.2f}B"), ("fp32 weights", m["weights"]),
            ("fp32 gradients", m["gradients"]), ("AdamW moments", m["optimizer"]),
            ("FSDP gathers" if m["fsdp"] else "DDP gradient buckets", m["buffers"])]
    rows += [("host memory (offload)", m["host"]), ("accelerator per rank", m["total"])] if m["cpu_offload"] else [
        ("total per rank", m["total"])]
    lines = [f"training memory per rank, {layout} (activations not counted):"]
    lines += [f"  {k:<24} {v if isinstance(v, str) else f'{v / gib:.1f} GiB'}" for k, v in rows]
    return "\n".join(lines)
