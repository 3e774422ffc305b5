"""Adapters in and out of a model's LoRA slots: PEFT's per-module pairs (peft.py) <-> the stacked slots (layers.py).

load_adapter(model, dir) is what a user calls to apply an adapter folder to a model (wrapping the modules it
adapts); the engine puts adapters into slots of a model wrapped for serving several (put_adapter), and training
reads the trained slot back out (adapter_of) to save it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from .attach import MLP_NAMES, adapted, merge_lora, rows_of, targeted, wrap
from .layers import LoRAExperts, LoRALinear
from .peft import _EXPERT, Adapter, peft_config, read_adapter, write_adapter


def _expert_factors(m: LoRAExperts, t: Mapping[str, torch.Tensor], slot: int, j: int, part: str):
    """Views of one expert's (A, B) for one part inside the stacked tensors t (the module's, or gathered ones)."""
    E, r = t["lora_A_down"].shape[0] // _slots(m), m.r
    g = slot * E + j
    if part == "gate_proj":
        return t["lora_A_gate_up"][g, :r], t["lora_B_gate"][g]
    if part == "up_proj":
        return t["lora_A_gate_up"][g, r:], t["lora_B_up"][g]
    return t["lora_A_down"][g], t["lora_B_down"][g]


def _slots(m: LoRALinear | LoRAExperts) -> int:
    return m.lora.lora_A.shape[0] if isinstance(m, LoRALinear) else m.scaling.shape[0]


def adapter_of(model: nn.Module, slot: int = 0, *, alpha: float, dropout: float = 0.0, base: str | None = None,
               params: Mapping[str, torch.Tensor] | None = None) -> Adapter:
    """The adapter in `slot` as PEFT stores it. params: name -> tensor to read instead of the model's own (the
    experts' adapters gathered from expert-parallel ranks)."""
    pairs, scales = {}, {}
    for name, m in adapted(model):
        own = dict(m.named_parameters(recurse=False)) if isinstance(m, LoRAExperts) else \
            dict(m.lora.named_parameters())
        prefix = f"{name}." if isinstance(m, LoRAExperts) else f"{name}.lora."
        t = {k: (params[prefix + k] if params is not None else v).detach() for k, v in own.items()
             if k.startswith("lora_")}
        if isinstance(m, LoRALinear):
            pairs[name] = (t["lora_A"][slot].clone(), t["lora_B"][slot].clone())
            scales[name] = float(m.lora.scaling[slot])
            continue
        for j in range(t["lora_A_down"].shape[0] // _slots(m)):
            for part in MLP_NAMES:
                A, B = _expert_factors(m, t, slot, j, part)
                pairs[f"{name}.{j}.{part}"] = (A.clone(), B.clone())
                scales[f"{name}.{j}.{part}"] = float(m.scaling[slot])
    r = max(a.shape[0] for a, _ in pairs.values())
    for key, (A, B) in pairs.items():  # one alpha / r in the config: a module scaled otherwise (an adapter loaded
        if scales[key] != alpha / r:  # with rank_pattern, alpha_pattern or rsLoRA) has its ratio folded into B
            pairs[key] = (A, B * (scales[key] / (alpha / r)))
            scales[key] = alpha / r
    return Adapter(pairs, scales, peft_config(r, alpha, dropout, [n for n, _ in adapted(model)], base))


def save_adapter(model: nn.Module, path: str | Path, *, alpha: float, dropout: float = 0.0, base: str | None = None,
                 slot: int = 0) -> None:
    write_adapter(path, adapter_of(model, slot, alpha=alpha, dropout=dropout, base=base))


@torch.no_grad()
def put_adapter(model: nn.Module, adapter: Adapter, slot: int, where: str = "the adapter") -> None:
    """Write the adapter into `slot` of the model's wrapped modules (the slot's other modules zeroed): AdapterError
    for a module the model has not wrapped or whose shapes differ, or a rank above the slots'."""
    modules = dict(adapted(model))
    for name in adapter.modules():
        if name not in modules:
            raise AdapterError(f"{where} adapts {name}, which is not an adapted module of this model (not one of "
                               "its modules, or not among the targets it was wrapped for)")
    for name, m in modules.items():
        if isinstance(m, LoRALinear):
            _put_linear(m, name, adapter, slot, where)
        else:
            _put_experts(m, name, adapter, slot, where)


def _fit(dst_A: torch.Tensor, dst_B: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ratio: float, key: str,
         where: str) -> None:
    """A, B into the (zeroed) slot views dst_A [R, in], dst_B [out, R], zero-padded from rank r to R."""
    r = A.shape[0]
    if A.shape[1] != dst_A.shape[1] or B.shape[0] != dst_B.shape[0]:
        raise AdapterError(f"{where}: {key} has A {tuple(A.shape)} and B {tuple(B.shape)}; this model's module takes "
                           f"A [r, {dst_A.shape[1]}] and B [{dst_B.shape[0]}, r] (an adapter of another base model?)")
    if r > dst_A.shape[0]:
        raise AdapterError(f"{where}: {key} has rank {r}, more than the {dst_A.shape[0]} the model's adapter slots "
                           "hold (--max-lora-rank)")
    dst_A[:r] = A
    dst_B[:, :r] = B * ratio


def _put_linear(m: LoRALinear, name: str, adapter: Adapter, slot: int, where: str) -> None:
    lo = m.lora
    lo.lora_A[slot].zero_()
    lo.lora_B[slot].zero_()
    lo.scaling[slot] = adapter.scales.get(name, 0.0)
    if name in adapter.pairs:
        _fit(lo.lora_A[slot], lo.lora_B[slot], *adapter.pairs[name], 1.0, name, where)


def _put_experts(m: LoRAExperts, name: str, adapter: Adapter, slot: int, where: str) -> None:
    t = dict(m.named_parameters(recurse=False))
    E = m.base_layer.n_experts
    for k, p in t.items():
        if k.startswith("lora_"):
            p[slot * E:(slot + 1) * E].zero_()
    keys = [k for k in adapter.pairs if (e := _EXPERT.match(k)) and e.group(1) == name]
    scale = adapter.scales[keys[0]] if keys else 0.0
    m.scaling[slot] = scale
    for key in keys:
        j, part = int(_EXPERT.match(key).group(2)), _EXPERT.match(key).group(3)
        if j >= E:
            raise AdapterError(f"{where}: {key}: this model's layer has {E} routed experts")
        A_dst, B_dst = _expert_factors(m, t, slot, j, part)
        _fit(A_dst, B_dst, *adapter.pairs[key], adapter.scales[key] / scale if scale else 0.0, key, where)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a PEFT-format LoRA adapter folder to the model, in place (its modules wrapped with one slot of the
    adapter's rank): the model then computes W x + s B A x wherever the adapter has a pair. Returns the model."""
    adapter = read_adapter(path)
    if rows_of(model) is not None:
        raise AdapterError("this model has adapters already (merge them with dsv2.merge_lora, or load the adapter "
                           "into a fresh model)")
    check_modules(model, adapter, str(path))
    wrap(model, adapter.modules(), 1, adapter.rank)
    put_adapter(model, adapter, 0, str(path))
    return model


def check_modules(model: nn.Module, adapter: Adapter, where: str) -> None:
    """AdapterError unless every pair of the adapter is for a module dsv2 adapts (attach.py: the linears of attention
    and the MLPs, and the routed experts per expert; not lm_head, the router, norms or embeddings)."""
    adaptable = {name for name, _ in targeted(model, "all-linear")}
    for key in adapter.pairs:
        e = _EXPERT.match(key)
        if e is None and key.endswith(".experts"):
            raise AdapterError(f"{where}: {key} has one pair for all its experts (PEFT's target_parameters on fused "
                               "experts); dsv2 reads per-expert pairs (experts.{j}.gate_proj, ...)")
        if (e.group(1) if e else key) not in adaptable:
            raise AdapterError(f"{where}: the adapter has a pair for {key}, which is not a module dsv2 adapts (the "
                               "linears of attention and of the MLPs, and the routed experts)")


def merged(model: nn.Module, path: str | Path) -> nn.Module:
    """The model with the adapter folder's weights folded in: a plain model (what `dsv2 merge-lora` writes)."""
    return merge_lora(load_adapter(model, path))
