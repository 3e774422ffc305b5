"""`dsv2 quantize IN OUT`: a float checkpoint to a quantized one, a tensor at a time (the model is never built).

Each stored tensor is read from its shard, quantized if the recipe covers it (compressed-tensors' weight_packed,
weight_scale, weight_shape: formats.py) or copied as it is, and collected into output shards of at most
max_shard_bytes, each written atomically; config.json gains the recipe's quantization_config, and the checkpoint's
other files (tokenizer, generation config, chat template) are copied. Peak memory: one output shard and one tensor.
The result loads with from_pretrained (no flag), `dsv2 generate|serve --model OUT`, and the tools that read
compressed-tensors' pack-quantized checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write
from ..model import DeepseekV2
from ..quant.convert import quantize_model, recipe_of, with_recipe
from ..quant.formats import compressed_parts, quantize
from ..quant.recipe import Recipe
from ..tokenizer import TOKENIZER_FILE
from .hf_names import official_names, slot
from .io import DEFAULT_MAX_SHARD_BYTES, ShardWriter, _keys, _open, _read, checkpoint_files, copy_tokenizer_of


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, recipe: Recipe,
                        max_shard_bytes: int | None = None, progress: bool = True) -> dict:
    """Write the quantized checkpoint; returns {"tensors", "quantized", "bytes_in", "bytes_out"}."""
    src, dst = Path(src), Path(dst)
    config, files = _source(src, dst, recipe)
    out = ShardWriter(dst, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    stats = {"tensors": 0, "quantized": 0, "bytes_in": 0}
    dtype = None
    bar = tqdm(total=sum(len(_keys(f)) for f in files), unit="tensor", desc="quantizing",
               disable=not progress or None)
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                t = _read(f, key, file)
                bar.update()
                stats["tensors"] += 1
                stats["bytes_in"] += t.numel() * t.element_size()
                dtype = dtype or (t.dtype if t.is_floating_point() else None)
                for name, w in _per_expert(key, t):
                    scheme = recipe.scheme_for(name.removesuffix(".weight")) if name.endswith(".weight") else None
                    if scheme is None or w.dim() != 2 or not w.is_floating_point():
                        out.put(name, w)
                        continue
                    if not bool(torch.isfinite(w).all()):
                        raise CheckpointError(f"tensor {name!r} in {file.name} holds NaN or infinite values")
                    try:
                        q, scale = quantize(w, scheme, name)
                    except ConfigError as e:
                        raise CheckpointError(str(e)) from None
                    for part, t in compressed_parts(q, scale, scheme.bits, w.dtype).items():
                        out.put(f"{name}_{part}", t)
                    stats["quantized"] += 1
                del t
    bar.close()
    stats["bytes_out"] = out.finish()
    for extra in src.iterdir():  # tokenizer, generation config, chat template, remote code ...
        if extra.is_file() and not extra.name.startswith("model.safetensors") and extra.name != "config.json" \
                and not (extra.name.startswith("model-") and ".safetensors" in extra.name):
            shutil.copy2(extra, dst / extra.name)
    if (src / TOKENIZER_FILE).is_file():  # its tokenizer_config.json, or one made for it
        copy_tokenizer_of(src, dst, config)
    cfg = with_recipe(config, recipe).to_dict()
    cfg["torch_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
    atomic_write(dst / "config.json", json.dumps(cfg, indent=2) + "\n")
    return stats


def _source(src: Path, dst: Path, recipe: Recipe) -> tuple[ModelConfig, list[Path]]:
    """The source checkpoint's config and files, checked: a float MLA checkpoint the recipe fits."""
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a checkpoint directory")
    if src.resolve() == dst.resolve():
        raise CheckpointError("the output folder must differ from the input checkpoint")
    try:
        config = ModelConfig.from_json(src / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"invalid config: {e}") from None
    stored = recipe_of(config)
    if stored is not None:
        raise CheckpointError(f"{src} is already quantized ({stored.describe()}); quantize its float original")
    if config.attention_type != "mla":
        raise CheckpointError("quantization covers MLA models (the MHA/GQA/MQA baselines are not quantized)")
    try:  # every weight's shape against the recipe (group sizes), on the meta device: before anything is written
        with torch.device("meta"):
            quantize_model(DeepseekV2(config), recipe)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return config, checkpoint_files(src)


def _per_expert(key: str, t: torch.Tensor):
    """(name, tensor) for a stored tensor: the stacked expert form (experts.gate_up_proj [E, 2F, D], experts.down_proj
    [E, D, F]) as the per-expert official tensors (hf_names' mapping), anything else as it is."""
    if t.dim() == 3 and key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        for official, (_, part, j) in official_names({key: t}).items():
            yield official, slot(t, part, j)
    else:
        yield key, t
