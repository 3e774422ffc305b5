"""Which modules get adapters, wrapping them (from outside the model, in place), and merging adapters back in.

Targets are given by module name (the last part of an official tensor name: q_proj, kv_b_proj, gate_proj, ...;
`experts` for the routed experts) or by group:

    attention   q_proj (V2-Lite) or q_a_proj / q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj
    dense       the dense layers' MLP (gate_proj, up_proj, down_proj)
    shared      the shared experts' gate_proj, up_proj, down_proj
    experts     the routed experts: every expert's gate_proj, up_proj, down_proj
    all-linear  all of the above (as PEFT's all-linear: not lm_head; the router is never adapted)

The base model's parameters are frozen when adapters are added for training; only the adapters train.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import ConfigError
from ..model.experts import RoutedExperts
from ..model.moe import MoE
from .layers import LoRA, LoRAExperts, LoRALinear, Rows, SlotDispatch

ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
GROUPS = {"attention": ATTENTION, "dense": MLP_NAMES, "shared": MLP_NAMES, "experts": ("experts",)}
NAMES = frozenset(ATTENTION + MLP_NAMES + ("experts",))
DEFAULT_TARGETS = ("attention",)


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Groups and names, comma-separated or a list; ConfigError for an unknown one."""
    items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not items:
        raise ConfigError("lora targets: name at least one group or module")
    known = sorted(GROUPS) + ["all-linear"]
    for t in items:
        if t not in NAMES and t not in known:
            raise ConfigError(f"lora target {t!r} is neither a group ({', '.join(known)}) nor a module name "
                              f"({', '.join(sorted(NAMES))})")
    return tuple(dict.fromkeys(items))


def _role(name: str) -> str:
    """The group a module of the model belongs to, by its name."""
    if ".self_attn." in name:
        return "attention"
    if ".shared_experts." in name:
        return "shared"
    if name.endswith(".experts"):
        return "experts"
    return "dense"


def targeted(model: nn.Module, targets: Iterable[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every linear or routed-experts module the targets select (not lm_head, not the router)."""
    targets = set(parse_targets(targets))
    if "all-linear" in targets:
        targets |= set(GROUPS)
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAExperts)):
            m = m.base_layer
        leaf = name.rsplit(".", 1)[-1]
        is_linear = hasattr(m, "in_features") and leaf in NAMES and ".layers." in name
        if not (is_linear or isinstance(m, RoutedExperts)):
            continue
        if leaf in targets or _role(name) in targets and leaf in GROUPS[_role(name)]:
            yield name, m


def adapted(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAExperts]]:
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAExperts)):
            yield name, m


def rows_of(model: nn.Module) -> Rows | None:
    """The model's shared Rows (None: no adapters)."""
    return next((m.rows if isinstance(m, LoRAExperts) else m.lora.rows for _, m in adapted(model)), None)


def wrap(model: nn.Module, names: Iterable[str], slots: int, r: int, dropout: float = 0.0) -> Rows:
    """Give the named modules (linears or routed experts) `slots` adapter slots of rank r, in place; modules
    already wrapped stay as they are. Returns the model's Rows."""
    rows = rows_of(model) or Rows()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        m = getattr(parent, child)
        if isinstance(m, (LoRALinear, LoRAExperts)):
            continue
        cls = LoRAExperts if isinstance(m, RoutedExperts) else LoRALinear
        setattr(parent, child, cls(m, slots, r, dropout, rows).to(_device(m)))
        if isinstance(parent, MoE) and not isinstance(parent.dispatcher, SlotDispatch):
            d = parent.dispatcher
            d.__class__ = type(f"Slot{type(d).__name__}", (SlotDispatch, type(d)), {})
            d.rows = rows
    return rows


def _device(m: nn.Module) -> torch.device:
    return next(t for t in (*m.parameters(), *m.buffers())).device


def add_lora(model: nn.Module, targets: str | Iterable[str] = DEFAULT_TARGETS, r: int = 16,
             alpha: float | None = None, dropout: float = 0.0, seed: int = 0) -> Rows:
    """Fresh adapters for training (one slot): A random (seeded), B = 0 so the model is the base model; every base
    parameter frozen. alpha: default 2 r."""
    if r < 1:
        raise ConfigError(f"lora rank must be >= 1, got {r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout}")
    names = [n for n, _ in targeted(model, targets)]
    if not names:
        raise ConfigError(f"lora targets {','.join(parse_targets(targets))} select no module of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    rows = wrap(model, names, 1, r, dropout)
    gen = torch.Generator().manual_seed(seed)
    for _, m in adapted(model):
        (m.lora if isinstance(m, LoRALinear) else m).reset(0, 2.0 * r if alpha is None else alpha, gen)
    return rows


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if _is_lora(n)}


def _is_lora(name: str) -> bool:
    return ".lora." in name or name.rsplit(".", 1)[-1].startswith("lora_")


@torch.no_grad()
def merge_lora(model: nn.Module, slot: int = 0) -> nn.Module:
    """Fold each adapter of `slot` into its base weight (W += s B A) and unwrap: a plain model again (in place)."""
    for name, m in list(adapted(model)):
        base = m.base_layer
        if not isinstance(getattr(base, "weight" if isinstance(m, LoRALinear) else "gate_up_proj"), nn.Parameter):
            raise ConfigError(f"{name}: merging needs float base weights (this one is quantized): merge into the "
                              "float checkpoint, then quantize")
        if isinstance(m, LoRALinear):
            lo: LoRA = m.lora
            base.weight += (lo.scaling[slot] * lo.lora_B[slot] @ lo.lora_A[slot]).to(base.weight.dtype)
        else:
            _merge_experts(m, slot)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, base)
        if isinstance(parent, MoE) and isinstance(parent.dispatcher, SlotDispatch):
            d = parent.dispatcher
            d.__class__ = type(d).__mro__[2]
            del d.rows
    return model


def _merge_experts(m: LoRAExperts, slot: int) -> None:
    base, r, E = m.base_layer, m.r, m.base_layer.n_experts
    e = slice(slot * E, (slot + 1) * E)
    s = m.scaling[slot]
    A_gate, A_up = m.lora_A_gate_up[e].split(r, dim=1)
    F_ = base.inter
    gu = base.gate_up_proj
    gu[:, :F_] += (s * torch.bmm(m.lora_B_gate[e], A_gate)).to(gu.dtype)
    gu[:, F_:] += (s * torch.bmm(m.lora_B_up[e], A_up)).to(gu.dtype)
    base.down_proj += (s * torch.bmm(m.lora_B_down[e], m.lora_A_down[e])).to(base.down_proj.dtype)
