"""The engine's options checked before anything is built (a server checks them before it loads the weights), and
the sizes they are given in."""

from __future__ import annotations

import os
import re

import torch

from ...config import ModelConfig
from ...errors import GenerationError

DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_BLOCK_SIZE = 64
CONTEXT_EXCEEDED = "context_length_exceeded"  # OpenAI's error code for a request past the context
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(size: str | int) -> int:
    """4096, "512MiB", "4GiB", "1.5GB" -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise GenerationError(f"cache_memory {size!r} is not a size like 4GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def check_options(config: ModelConfig, *, cache_memory: str | int | None = None, num_blocks: int | None = None,
                  block_size: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                  max_model_len: int | None = None) -> tuple[int, int]:
    """The engine's options checked against the model's config alone (a server checks them before it loads the
    weights): a GenerationError naming the option, else max_model_len and block_size resolved (defaults: the
    model's context, and 64 tokens or max_model_len if less)."""
    sizes = {"block_size": 1 if block_size is None else block_size, "max_num_seqs": max_num_seqs,
             "max_num_batched_tokens": max_num_batched_tokens, "num_blocks": 1 if num_blocks is None else num_blocks}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GenerationError(f"{name} must be >= 1 (an integer), got {value}")
    context = config.max_position_embeddings
    max_len = context if max_model_len is None else max_model_len
    if not isinstance(max_len, int) or not 1 < max_len <= context:
        raise GenerationError(f"max_model_len must be in [2, {context}] (the model's context), got {max_model_len}")
    if block_size is None:
        block_size = min(DEFAULT_BLOCK_SIZE, max_len)
    elif block_size > max_len:
        raise GenerationError(f"block_size {block_size} is more than max_model_len ({max_len}): no sequence would "
                              "fill a block")
    if cache_memory is not None:
        parse_bytes(cache_memory)
    return max_len, block_size


def device_memory(device: torch.device) -> int:
    """Bytes of memory the cache may take: a CUDA device's free memory (the weights are there already), or this
    machine's RAM in all (a coarse bound: the weights are in it too)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
