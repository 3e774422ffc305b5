"""One parameter at a time from a checkpoint in the official layout: what a rank of a sharded run reads, so that it
never holds more of the model than one whole parameter (a stacked expert tensor: one layer's experts) before
keeping its shard of it (dsv2/distributed/fsdp.py materialize)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .hf_names import official_names, slot
from .io import _open, _read, check_finite, checkpoint_files


class WeightReader:
    def __init__(self, path: str | Path):
        self.files = checkpoint_files(Path(path))
        self.where: dict[str, Path] = {}
        for file in self.files:
            with _open(file) as f:
                self.where.update(dict.fromkeys(f.keys(), file))

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}")
        with _open(self.where[key]) as f:
            t = _read(f, key, self.where[key])
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {key!r} in {self.where[key].name} is {t.dtype}; a model weight must be "
                                  "floating-point")
        check_finite(t, key, self.where[key].name)
        return t

    def full(self, name: str, shape: torch.Size) -> torch.Tensor:
        """dsv2 parameter `name` whole: its official tensor, or the stacked experts assembled from theirs."""
        if name in self.where:  # a plain weight, or the experts stored stacked
            out = self._tensor(name)
        else:
            out = torch.empty(shape)
            for official, (_, part, j) in official_names({name: out}).items():
                slot(out, part, j).copy_(self._tensor(official))
        if tuple(out.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(out.shape)}, the config expects {tuple(shape)}")
        return out
