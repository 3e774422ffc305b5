"""Training memory per rank under a parallel layout, from the config alone (`dsv2 info CONFIG --parallel ...`).

What a rank holds for AdamW training with fp32 master weights, per parameter it owns: the weight (4 bytes), its
gradient (4) and the two moments (8): 16 bytes. Which parameters it owns:

- routed experts: E / ep of each MoE layer's experts (expert parallelism), and of those 1 / dp_shard under FSDP;
- everything else: all of it (DDP replicates), or 1 / dp_shard under FSDP (HSDP: dp_shard = world / dp_replicate).

Under FSDP a rank also holds, while a layer runs, that layer's weights gathered whole in the compute dtype (the
largest layer, twice: FSDP2 prefetches the next one). Activations depend on the batch and are not counted (with
--activation-checkpointing, each layer keeps its inputs only).
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .info import _parameters

STATE_BYTES = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments


def memory_per_rank(config: ModelConfig, world: int, *, expert_parallel: int = 1, fsdp: bool = False,
                    dp_replicate: int = 1, compute_bytes: int = 2) -> dict[str, Any]:
    """Bytes one rank needs for weights, gradients and optimizer state (ValueError for a layout that cannot be)."""
    ep = expert_parallel
    if world < 1 or ep < 1 or world % ep or dp_replicate < 1 or world % dp_replicate:
        raise ValueError(f"world {world} must be a multiple of expert_parallel {ep} and of dp_replicate "
                         f"{dp_replicate}")
    if config.num_routed and config.num_routed % ep:
        raise ValueError(f"expert_parallel {ep} must divide n_routed_experts {config.num_routed}")
    p, _, _ = _parameters(config)
    shard = world // dp_replicate if fsdp else 1
    experts, rest = p["routed_experts"], p["total"] - p["routed_experts"]
    owned = {"routed_experts": experts / ep / shard, "other": rest / shard}
    per_layer = p["per_layer"]
    largest = per_layer["attention"] + per_layer["norms"] + max(per_layer["dense_ffn"], per_layer["moe_ffn"] / ep)
    gathered = 2 * largest * compute_bytes if fsdp else 0
    params = sum(owned.values())
    return {"world": world, "expert_parallel": ep, "fsdp": fsdp, "dp_shard": shard, "dp_replicate": dp_replicate,
            "parameters_owned": params, "weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params,
            "gathered_layers": gathered, "total": STATE_BYTES * params + gathered}


def format_memory(m: dict[str, Any]) -> str:
    gib = 2 ** 30
    layout = (f"{m['world']} ranks: " + (f"FSDP over {m['dp_shard']}" + (f" x {m['dp_replicate']} replicas (HSDP)"
              if m["dp_replicate"] > 1 else "") if m["fsdp"] else "DDP") +
              (f", experts over {m['expert_parallel']}" if m["expert_parallel"] > 1 else ""))
    rows = [("parameters owned", f"{m['parameters_owned'] / 1e9:.2f}B"), ("fp32 weights", m["weights"]),
            ("fp32 gradients", m["gradients"]), ("AdamW moments", m["optimizer"]),
            ("gathered layers (FSDP)", m["gathered_layers"]), ("total per rank", m["total"])]
    lines = [f"training memory per rank, {layout} (activations not counted):"]
    lines += [f"  {k:<24} {v if isinstance(v, str) else f'{v / gib:.1f} GiB'}" for k, v in rows]
    return "\n".join(lines)
