"""What device-limited routing buys: devices per token and all-to-all traffic as M = topk_group varies.

DeepSeek-V2 (Sec. 2.2.2) spreads E = 160 routed experts over D = 8 devices and lets each token pick its top-K = 6
experts inside its M = 3 best devices (a device scored by its best affinity), so that a token visits at most M
devices; the report notes M >= 3 routes about as well as unrestricted top-K. This module measures, for a router
and each M = 1..D:

- devices per token: distinct devices holding a chosen expert (<= M by construction);
- off-device copies per token: the token copies that cross a device boundary. A token lives on one device
  (token t on device t mod D, as when the batch is spread evenly) and is sent ONCE to every other device holding
  its experts (the all-to-all dispatcher of dsv2/distributed/ deduplicates copies the same way);
- traffic vs top-K: off-device copies relative to unrestricted top-K (M = D), the saving on the wire;
- affinity kept: the chosen experts' affinity mass relative to unrestricted top-K, a proxy for routing quality.

The router is either random (iid Gaussian gate logits, as from a randomly initialised gate) or a trained
checkpoint's: its tokenizer encodes text, the model runs, and every MoE layer's affinities are pooled.
`dsv2 routing-sim` prints the table and writes routing_sim.{md,json,png}.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..files import atomic_write
from ..model.router import Router, device_group
from ..presets import get_config

SEQUENCES_PER_FORWARD = 8
"""Windows of text per forward of a checkpoint's model (bounds the activations it holds)."""


def group_limited_topk(scores_TE: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """[T, K] experts chosen by V2's device-limited rule (router.Router, the same code the model runs)."""
    E = scores_TE.shape[-1]
    cfg = get_config("deepseek-v2", n_routed_experts=E, n_group=n_group, topk_group=topk_group,
                     num_experts_per_tok=top_k, hidden_size=1)
    with torch.device("meta"):
        router = Router(cfg)
    return torch.topk(router.limit_to_groups(scores_TE), top_k, dim=-1).indices


def simulate(scores_TE: torch.Tensor, n_devices: int, top_k: int) -> list[dict[str, float]]:
    """One row per M = 1..n_devices (see the module docstring); scores_TE are softmax affinities [T, E]."""
    T, E = scores_TE.shape
    if E % n_devices:
        raise ValueError(f"{E} experts do not split evenly over {n_devices} devices")
    source_T = torch.arange(T) % n_devices
    rows = []
    for M in range(1, n_devices + 1):
        if top_k > M * (E // n_devices):  # M devices hold fewer than K experts: no such routing (None, "n/a")
            rows.append({"M": M, "devices_per_token": None, "off_device_copies_per_token": None, "affinity": None,
                         "traffic_vs_topk": None, "affinity_vs_topk": None})
            continue
        experts_TK = group_limited_topk(scores_TE, n_devices, M, top_k)
        visit_TD = torch.zeros(T, n_devices, dtype=torch.bool).scatter_(1, device_group(experts_TK, E, n_devices), True)
        off_TD = visit_TD.clone()
        off_TD[torch.arange(T), source_T] = False
        rows.append({"M": M, "devices_per_token": visit_TD.sum(1).double().mean().item(),
                     "off_device_copies_per_token": off_TD.sum(1).double().mean().item(),
                     "affinity": scores_TE.gather(1, experts_TK).double().sum(1).mean().item()})
    full = rows[-1]
    for r in rows:
        if r["affinity"] is not None:
            r["traffic_vs_topk"] = r["off_device_copies_per_token"] / full["off_device_copies_per_token"]
            r["affinity_vs_topk"] = r["affinity"] / full["affinity"]
    return rows


def random_scores(n_tokens: int, n_experts: int, logit_std: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_tokens, n_experts, generator=g) * logit_std).softmax(-1)


@torch.no_grad()
def checkpoint_scores(path: str | os.PathLike, data: list[str] | None = None, n_tokens: int = 8192,
                      seq_len: int = 256) -> tuple[torch.Tensor, ModelConfig]:
    """Affinities [L*T, E] of every MoE layer of a checkpoint on ~n_tokens tokens of text, and its config."""
    from ..checkpoint import from_pretrained
    from ..training.data import STDLIB_SOURCE, TOKENIZER_FILE, iter_documents, load_tokenizer

    path = Path(path)
    model = from_pretrained(path, dtype=torch.float32)
    if not model.config.num_routed:
        raise ValueError(f"{path} has no routed experts")
    tok_file = path / TOKENIZER_FILE
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file} not found: the checkpoint's router needs its tokenizer")
    tokenizer = load_tokenizer(tok_file)
    ids: list[int] = []
    for doc in iter_documents(data or [STDLIB_SOURCE]):
        ids.extend(tokenizer.encode(doc).ids)
        if len(ids) >= n_tokens:
            break
    seq_len = min(seq_len, model.config.max_position_embeddings)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text gave {len(ids)} tokens, fewer than one window of {seq_len}")
    x = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    scores = []
    for i in range(0, n, SEQUENCES_PER_FORWARD):
        _, routings = model(x[i:i + SEQUENCES_PER_FORWARD], return_routing=True)
        scores.extend(r.scores_TE for r in routings)
    return torch.cat(scores), model.config


def format_table(rows: list[dict[str, float]], title: str) -> str:
    lines = [title, "", "| M | devices / token | off-device copies / token | traffic vs top-K | affinity kept |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["affinity"] is None:
            lines.append(f"| {r['M']} | n/a: {r['M']} devices hold fewer than top-K experts | | | |")
            continue
        lines.append(f"| {r['M']} | {r['devices_per_token']:.3f} | {r['off_device_copies_per_token']:.3f} | "
                     f"{100 * r['traffic_vs_topk']:.1f}% | {100 * r['affinity_vs_topk']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, float]], title: str, out: Path) -> None:
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["affinity"] is not None]
    M = [r["M"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(M, [r["devices_per_token"] for r in rows], "o-", label="devices per token")
    ax1.plot(M, [r["off_device_copies_per_token"] for r in rows], "s-", label="off-device copies per token")
    ax1.plot(M, M, ":", color="gray", label="bound: M")
    ax1.set_xlabel("M (topk_group)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(M, [100 * r["traffic_vs_topk"] for r in rows], "o-", label="all-to-all traffic")
    ax2.plot(M, [100 * r["affinity_vs_topk"] for r in rows], "s-", label="affinity kept")
    ax2.set_xlabel("M (topk_group)")
    ax2.set_ylabel("% of unrestricted top-K")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def run(out_dir: str | os.PathLike, checkpoint: str | None = None, n_experts: int = 160,
        n_devices: int | None = None, top_k: int | None = None, n_tokens: int = 8192, logit_std: float = 1.0,
        seed: int = 0, data: list[str] | None = None) -> tuple[list[dict[str, float]], str, dict[str, Path]]:
    """Simulate, write routing_sim.{md,json,png} under out_dir; returns (rows, table, paths). n_devices and top_k
    default to the checkpoint's n_group and num_experts_per_tok, or V2's 8 and 6 for the random router."""
    if n_tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {n_tokens}")
    if not (math.isfinite(logit_std) and logit_std > 0):
        raise ValueError(f"logit_std must be a finite number > 0, got {logit_std}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    if checkpoint:
        scores, cfg = checkpoint_scores(checkpoint, data, n_tokens)
        top_k = cfg.num_experts_per_tok if top_k is None else top_k
        n_devices = cfg.n_group if n_devices is None else n_devices
        source = f"checkpoint {checkpoint} ({scores.shape[0]} token-layers)"
    else:
        if n_experts < 1:
            raise ValueError(f"experts must be >= 1, got {n_experts}")
        top_k, n_devices = 6 if top_k is None else top_k, 8 if n_devices is None else n_devices
        scores = random_scores(n_tokens, n_experts, logit_std, seed)
        source = f"random router (gate logits ~ N(0, {logit_std:g}^2), {n_tokens} tokens)"
    E = scores.shape[1]
    if n_devices < 2:
        raise ValueError(f"devices must be >= 2 (one device has no device limit to simulate), got {n_devices}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E} experts], got {top_k}")
    rows = simulate(scores, n_devices, top_k)
    title = f"{E} experts on {n_devices} devices, top-{top_k}; {source}"
    table = format_table(rows, title)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "routing_sim.md", "json": out / "routing_sim.json", "plot": out / "routing_sim.png"}
    atomic_write(paths["table"], table)
    meta: dict[str, Any] = {"experts": E, "devices": n_devices, "top_k": top_k, "source": source, "rows": rows}
    atomic_write(paths["json"], json.dumps(meta, indent=1) + "\n")
    plot(rows, f"{E} experts / {n_devices} devices / top-{top_k}", paths["plot"])
    return rows, table, paths
