"""One parameter at a time from a checkpoint in the official layout, or only the rows of it along dim 0 that a rank of
a sharded run keeps (dsv2/distributed/fsdp.py materialize): its bytes alone are read (of stacked experts, its
experts' tensors alone), so no rank ever holds more of the model than its shards and one piece in flight."""

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

    def _tensor(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if key not in self.where:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}")
        with _open(self.where[key]) as f:
            t = _read(f, key, self.where[key], rows)
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {key!r} in {self.where[key].name} is {t.dtype}; a model weight must be "
                                  "floating-point")
        check_finite(t, key, self.where[key].name)
        return t

    def _shape(self, key: str) -> tuple[int, ...]:
        with _open(self.where[key]) as f:
            return tuple(f.get_slice(key).get_shape())

    def full(self, name: str, shape: torch.Size, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """dsv2 parameter `name` whole, or its rows lo .. hi-1 along dim 0 (rows=(lo, hi)): its official tensor, or
        the stacked experts assembled from theirs (of rows, the experts lo .. hi-1)."""
        if name in self.where:  # a plain weight, or the experts stored stacked
            stored = self._shape(name)
            if stored != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {stored}, the config expects {tuple(shape)}")
            if rows is not None and not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise CheckpointError(f"rows {rows[0]}:{rows[1]} of tensor {name!r} are outside its {shape[0]}")
            return self._tensor(name, rows)
        if not name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            raise CheckpointError(f"the checkpoint has no tensor {name!r}")
        lo, hi = rows if rows is not None else (0, shape[0])
        out = torch.empty((hi - lo, *shape[1:]))
        for official, (_, part, j) in official_names({name: torch.empty(shape, device="meta")}).items():
            if lo <= j < hi:
                dst, t = slot(out, part, j - lo), self._tensor(official)
                if t.shape != dst.shape:
                    raise CheckpointError(f"tensor {official!r} has shape {tuple(t.shape)}, the config expects "
                                          f"{tuple(dst.shape)}")
                dst.copy_(t)
        return out
