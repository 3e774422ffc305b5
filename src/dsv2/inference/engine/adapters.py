"""The engine's LoRA adapters: names -> slots of the model's adapter slots (dsv2.lora), and each step's rows.

Serving several adapters over one base model (S-LoRA / Punica): the model's adapted modules hold `max_loras` slots
of rank `max_lora_rank`; an adapter loaded by name takes a free slot (its modules wrapped when first needed, their
other slots zero: no change for the adapters already there), and each step tells the model the slot of each of
its tokens (-1: the base model), so requests of different adapters and of the base model run in one batch.
A request's prefix-cache keys start from its adapter's own root (a fresh one at every load), so cached rows are
shared only by requests of the same adapter: the adapters change the cached latent through kv_a_proj.

Every method runs under the engine's lock, between steps.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterError
from ...lora import Adapter, Rows, check_modules, put_adapter, rows_of, wrap

_loads = itertools.count(1)


@dataclass
class Loaded:
    name: str
    path: str
    slot: int
    rank: int
    root: bytes
    """The first parent hash of its requests' prefix-cache keys."""


class Adapters:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise AdapterError(f"max_loras and max_lora_rank must be >= 1, got {max_loras} and {max_rank}")
        if rows_of(model) is not None:
            raise AdapterError("the model has an adapter applied already (load_adapter): give the engine the base "
                               "model and its adapters with add_adapter, or merge the adapter in (dsv2.merge_lora)")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.loaded: dict[str, Loaded] = {}
        self.rows: Rows | None = None  # the model's Rows, once a first adapter wrapped its modules

    def add(self, name: str, adapter: Adapter, path: str | Path) -> Loaded:
        """Put an adapter (read from its folder, `path`) into a free slot under `name` (AdapterError: a name in
        use, no free slot, a rank above max_lora_rank, modules this model does not have)."""
        if name in self.loaded:
            raise AdapterError(f"an adapter named {name!r} is loaded already (unload it first)")
        free = sorted(set(range(self.max_loras)) - {a.slot for a in self.loaded.values()})
        if not free:
            raise AdapterError(f"all {self.max_loras} adapter slots are taken (--max-loras): unload one first")
        if adapter.rank > self.max_rank:
            raise AdapterError(f"{path}: rank {adapter.rank} is above --max-lora-rank {self.max_rank}")
        check_modules(self.model, adapter, str(path))
        self.rows = wrap(self.model, adapter.modules(), self.max_loras, self.max_rank)
        put_adapter(self.model, adapter, free[0], str(path))
        root = hashlib.blake2b(f"lora:{name}:{next(_loads)}".encode(), digest_size=16).digest()
        self.loaded[name] = Loaded(name, str(path), free[0], adapter.rank, root)
        return self.loaded[name]

    def remove(self, name: str) -> None:
        a = self.loaded.pop(name, None)
        if a is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        put_adapter(self.model, Adapter({}, {}), a.slot)  # zeroed: a later adapter in this slot starts clean

    def set_rows(self, slot_T: list[int], device: torch.device) -> bool:
        """The slot of each token of the next forward: whether any uses an adapter."""
        if self.rows is None:
            return False
        self.rows.set(torch.tensor(slot_T, dtype=torch.long, device=device))
        return any(s >= 0 for s in slot_T)
