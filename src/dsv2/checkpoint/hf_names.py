"""Official (Hugging Face) tensor names <-> dsv2's parameters, on state dicts: the model never sees a file.

Tensor names are the official ones; inside dsv2 only the routed experts differ: the checkpoints' per-expert
`experts.{j}.{gate,up,down}_proj.weight` are stacked into `experts.gate_up_proj` [E, 2F, D] (gate rows first,
then up rows) and `experts.down_proj` [E, D, F], so the experts run as grouped GEMMs. The stacked form some tools
write (`experts.gate_up_proj` / `experts.down_proj`) is accepted on load too (io.load_weights). A tied lm_head is
listed once, as the embedding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

Slot = tuple[str, str | None, int | None]
"""(dsv2 parameter name, expert part gate_proj/up_proj/down_proj or None, expert index or None)."""


def official_names(params: Mapping[str, torch.Tensor]) -> dict[str, Slot]:
    """official tensor name -> where it lives among `params` (dsv2 names -> tensors, e.g. named_parameters())."""
    out: dict[str, Slot] = {}
    for name, p in params.items():
        if name.endswith(".experts.gate_up_proj"):
            base = name[: -len(".gate_up_proj")]
            for j in range(p.shape[0]):
                out[f"{base}.{j}.gate_proj.weight"] = (name, "gate_proj", j)
                out[f"{base}.{j}.up_proj.weight"] = (name, "up_proj", j)
        elif name.endswith(".experts.down_proj"):
            base = name[: -len(".down_proj")]
            for j in range(p.shape[0]):
                out[f"{base}.{j}.down_proj.weight"] = (name, "down_proj", j)
        else:
            out[name] = (name, None, None)
    return out


def slot(param: torch.Tensor, part: str | None, j: int | None) -> torch.Tensor:
    """The part of a dsv2 parameter an official tensor maps to (a view: writing it writes the parameter)."""
    if part is None:
        return param
    if part == "down_proj":
        return param[j]
    F = param.shape[1] // 2
    return param[j, :F] if part == "gate_proj" else param[j, F:]


def official_tensors(params: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor) for every official tensor of `params` (views of them, detached)."""
    for official, (name, part, j) in official_names(params).items():
        yield official, slot(params[name].detach(), part, j)
