"""Distributed checkpoints of FSDP runs: every rank writes its own shards (torch.distributed.checkpoint), nobody
gathers the model.

    RUN_DIR/checkpoints/step_N/   dcp/            the model's and AdamW's state, each rank's shards + .metadata
                                  rng.safetensors rank 0's RNG state (every rank resumes with it, as state.py's)
                                  config.json, tokenizer files, trainer_state.json (step, settings, data)

The same discipline as state.py's checkpoints: written under a temporary name, renamed by rank 0 once every rank's
shards and the metadata are on disk, so a rank killed midway leaves the earlier checkpoints whole. A checkpoint
loads on another number of ranks, or in one process (DCP reshards the DTensors' saved pieces onto whatever the
loading model holds). `dsv2 export` writes one as a Hugging Face checkpoint, a layer at a time.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..checkpoint import hf_names
from ..checkpoint.io import DEFAULT_MAX_SHARD_BYTES, ShardWriter, copy_tokenizer_of, write_config
from ..config import ModelConfig
from ..files import atomic_write, fsync_path, write_safetensors
from ..tokenizer import TOKENIZER_FILE
from .run_dir import STATE_FILE, RunDir

DCP_DIR = "dcp"
RNG_FILE = "rng.safetensors"


class ShardError(OSError):
    """A distributed checkpoint that cannot be written or read (DCP's CheckpointException is a BaseException,
    which no one-line error handler catches: it is turned into this)."""


def is_sharded(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def _metadata(path: Path):
    """The checkpoint's DCP metadata (which tensors, in which files); ShardError if it does not read."""
    try:
        return dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a missing or unreadable .metadata: the checkpoint's damage
        raise ShardError(f"{DCP_DIR}/.metadata does not read ({type(e).__name__}: {e})") from None


def check_shards(path: Path) -> str | None:
    """What is wrong with a distributed checkpoint's files (None: every shard the metadata names is whole)."""
    try:
        meta = _metadata(path)
    except ShardError as e:
        return str(e)
    for info in (meta.storage_data or {}).values():
        f = path / DCP_DIR / info.relative_path
        if not f.is_file() or f.stat().st_size < info.offset + info.length:
            return f"{DCP_DIR}/{info.relative_path} is missing or truncated"
    return None


def _dcp(fn, what: str, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CheckpointException as e:
        raise ShardError(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def save_sharded(run: RunDir, step: int, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                 tokenizer_path: Path | None, keep_last: int, par) -> Path:
    """Every rank calls it: each writes its shards, rank 0 the rest and the rename."""
    final = run.checkpoint_path(step)
    tmp = run.checkpoints_dir / f".tmp-{final.name}"
    with par.together():
        if par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / DCP_DIR).mkdir(parents=True)
    if opt.state:
        msd, osd = get_state_dict(model, opt)
        payload = {"model": msd, "optim": osd}
    else:  # no step taken yet (every one so far skipped): DCP would make up a state with a zero step in it
        payload = {"model": get_model_state_dict(model)}
    _dcp(dcp.save, f"writing {final}", payload, checkpoint_id=str(tmp / DCP_DIR))  # collective
    with par.together():
        if par.is_main:
            try:
                write_config(tmp, model.config, torch.float32)  # the master weights' dtype
                if tokenizer_path is not None:
                    copy_tokenizer_of(tokenizer_path, tmp, model.config)
                rng = {"rng.cpu": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["rng.cuda"] = torch.cuda.get_rng_state()
                write_safetensors(tmp / RNG_FILE, rng)
                atomic_write(tmp / STATE_FILE, json.dumps({**state, "sharded": True, "time": time.time()}, indent=1))
                shutil.rmtree(final, ignore_errors=True)
                tmp.replace(final)
                fsync_path(run.checkpoints_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for old in run.checkpoints()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    return final


def restore_sharded(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None) -> None:
    """The checkpoint's model (and optimizer) state into this model, sharded or not, whatever the saving world. A
    checkpoint saved before any optimizer step has none: `opt` stays as built."""
    if opt is None or not _has_optimizer(path):
        msd = get_model_state_dict(model)
        _dcp(dcp.load, f"reading {path}", {"model": msd}, checkpoint_id=str(path / DCP_DIR))
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, opt)
    _dcp(dcp.load, f"reading {path}", {"model": msd, "optim": osd}, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def _has_optimizer(path: Path) -> bool:
    return any(k.startswith("optim.") for k in _metadata(path).state_dict_metadata)


def export(path: Path, out: Path, max_shard_bytes: int | None = None) -> int:
    """A sharded checkpoint as a Hugging Face checkpoint (official names, the experts split), read and written a
    layer at a time: at most one layer's tensors in memory. Returns the bytes written."""
    reader = dcp.FileSystemReader(str(path / DCP_DIR))
    meta = reader.read_metadata().state_dict_metadata
    keys = sorted(k for k in meta if k.startswith("model."))
    groups: dict[str, list[str]] = {}
    for k in keys:  # model.model.layers.{i}.* by layer, the rest (embeddings, norm, lm_head) together
        parts = k.split(".")
        groups.setdefault(".".join(parts[:4]) if parts[2:3] == ["layers"] else "rest", []).append(k)
    cfg = ModelConfig.from_json(path / "config.json")
    shards = ShardWriter(out, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    for group in sorted(groups, key=lambda g: (g == "rest", int(g.split(".")[-1]) if g != "rest" else 0)):
        sd = {k[len("model."):]: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in groups[group]}
        _dcp(dcp.load, f"reading {path}", {"model": sd}, checkpoint_id=str(path / DCP_DIR))
        if cfg.tie_word_embeddings:  # one tensor, written once as the embedding (as save_pretrained does)
            sd.pop("lm_head.weight", None)
        for name, t in hf_names.official_tensors(sd):
            shards.put(name, t.clone())
    total = shards.finish()
    write_config(out, cfg, meta[keys[0]].properties.dtype)
    if (path / TOKENIZER_FILE).exists():
        copy_tokenizer_of(path, out, cfg)
    return total
