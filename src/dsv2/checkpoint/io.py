"""Checkpoint files in the official Hugging Face layout, both directions (safetensors only, nothing unpickled).

A checkpoint directory holds config.json and generation_config.json plus model.safetensors, or shards named in
model.safetensors.index.json (and tokenizer.json with tokenizer_config.json, where its writer has a tokenizer:
dsv2.tokenizer.copy_tokenizer). The names are mapped by hf_names.py; this file handles the files: sharding,
atomic writes, and checks that name the file or tensor at fault.

Loading builds the model on the meta device and copies tensor by tensor from memory-mapped files into the
allocated parameters, so peak memory is one model plus one tensor, never two models. A quantized model (dsv2.quant)
loads the same way: a float tensor is quantized as it is read (so the float model never exists), a stored
compressed-tensors one (`.weight_packed` + `.weight_scale` + `.weight_shape`) is converted exactly; saving writes
the quantized rows back in that layout.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..config import ModelConfig
from ..cpu import optimize
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write, write_safetensors
from ..model import DeepseekV2
from ..quant import formats as qf
from ..quant.convert import quantize_model, recipe_of
from ..quant.recipe import Recipe
from ..tokenizer import copy_tokenizer
from .hf_names import official_names, official_tensors, slot

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 << 30
GENERATION_CONFIG_FILE = "generation_config.json"
_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


# ---------------------------------------------------------------------------------------------------------------
# save
def save_pretrained(model: DeepseekV2, path: str | os.PathLike, max_shard_bytes: int | None = None,
                    params: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + model.safetensors (or shards + index above max_shard_bytes), written atomically per file.

    params: the tensors to write instead of the model's own (the experts gathered from expert-parallel ranks)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = total = 0
    for name, t in _tensors_to_save(model, params):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
        total += nbytes
    for stale in path.glob("model*.safetensors*"):  # never mix shards of an older save with this one
        stale.unlink()
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(files, shards, strict=True):
        tensors = {name: t.contiguous().cpu() for name, t in shard}
        write_safetensors(path / fname, tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(path / INDEX_FILE, json.dumps(index, indent=2))
    write_config(path, model.config, next(model.parameters()).dtype)


def write_config(path: Path, config: ModelConfig, dtype: torch.dtype) -> None:
    """config.json, with the weights' torch_dtype, and generation_config.json: what generation stops at, as
    transformers' GenerationConfig and vLLM read it."""
    cfg = config.to_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(path / "config.json", json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    atomic_write(path / GENERATION_CONFIG_FILE, json.dumps(gen, indent=2) + "\n")


def copy_tokenizer_of(src: str | os.PathLike, dst: str | os.PathLike, config: ModelConfig) -> None:
    """tokenizer.copy_tokenizer with the model's context and special tokens (what a written checkpoint carries)."""
    copy_tokenizer(src, dst, config.max_position_embeddings, config.bos_token_id, *config.eos_token_ids[:1])


def check_finite(t: torch.Tensor, key: str, fname: str, hint: str = "") -> None:
    """CheckpointError for a stored tensor holding NaN or infinity (a diverged run's weights)."""
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"tensor {key!r} in {fname} holds NaN or infinite values (a diverged run?){hint}")


class ShardWriter:
    """A checkpoint's safetensors written a tensor at a time (dsv2 quantize, dsv2 export): shards of at most `limit`
    bytes, each written atomically under a temporary name, named (and indexed) once their number is known."""

    def __init__(self, dst: Path, limit: int):
        self.dst, self.limit = dst, limit
        dst.mkdir(parents=True, exist_ok=True)
        for stale in dst.glob("model*.safetensors*"):  # never mix the shards of an older output with these
            stale.unlink()
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.written: list[tuple[Path, list[str]]] = []

    def put(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.shard and self.size + nbytes > self.limit:
            self._flush()
        self.shard[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        if self.shard:
            tmp = self.dst / f".shard-{len(self.written):05d}.safetensors"
            write_safetensors(tmp, self.shard, metadata={"format": "pt"})
            self.written.append((tmp, list(self.shard)))
            self.shard, self.size = {}, 0

    def finish(self) -> int:
        self._flush()
        n = len(self.written)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, keys), name in zip(self.written, names, strict=True):
            os.replace(tmp, self.dst / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write(self.dst / INDEX_FILE, json.dumps(index, indent=2))
        return self.total


PACKED_SUFFIXES = ("_packed", "_scale", "_shape")
"""compressed-tensors' pack-quantized parts of a weight `X.weight`: X.weight_packed, X.weight_scale, X.weight_shape."""


def quantized_targets(model: DeepseekV2) -> dict[str, tuple[torch.Tensor, int]]:
    """dsv2 weight name -> (its quantized rows, values per row) for the model's quantized modules (dsv2.quant)."""
    out = {}
    for mname, m in model.named_modules():
        rows = getattr(m, "quantized_rows", None)
        if rows is not None:
            out.update({f"{mname}.{attr}": v for attr, v in rows().items()})
    return out


def _tensors_to_save(model: DeepseekV2, params: dict[str, torch.Tensor] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor): the parameters, and each quantized weight as its three compressed-tensors tensors."""
    yield from official_tensors(dict(model.named_parameters()) if params is None else params)
    targets = quantized_targets(model)
    dtype = next(model.parameters()).dtype
    for official, (name, part, j) in official_names({n: t for n, (t, _) in targets.items()}).items():
        rows, K = slot(targets[name][0].detach(), part, j), targets[name][1]
        bits, _ = qf.block_format(K, rows.shape[-1])
        for part, t in qf.compressed_parts(*qf.from_blocks(rows, K), bits, dtype).items():
            yield f"{official}_{part}", t


# ---------------------------------------------------------------------------------------------------------------
# load
def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or model.safetensors."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard file name")
        names = sorted(set(weight_map.values()))
        for name in names:  # lexically inside the folder (symlinked shards, as in hub caches, are fine)
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise CheckpointError(f"{index} names shard {name!r}, which is outside the checkpoint folder")
        files = [path / f for f in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def _checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The dtype of the first floating-point weight stored (a quantized weight's scales, which may be stored in
    another dtype, only where there is nothing else)."""
    scales = None
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                stored = f.get_slice(key).get_dtype()
                if stored in _FLOAT_DTYPES:
                    if not key.endswith("_scale"):
                        return _FLOAT_DTYPES[stored]
                    scales = scales or _FLOAT_DTYPES[stored]
    if scales is None:
        raise CheckpointError(f"{files[0].parent} holds no floating-point tensors")
    return scales


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, allow_non_finite: bool = False,
                    quantize: str | Recipe | None = None) -> DeepseekV2:
    """Load a checkpoint directory in the official layout, in eval mode with the CPU fast paths on
    (dsv2.cpu.optimize). dtype None keeps the checkpoint's dtype (of the weights kept in float, and of dequantized
    ones). quantize "int8" | "int4" (or a dsv2.quant Recipe) quantizes a float checkpoint while it loads; a quantized
    checkpoint (config.json's quantization_config) loads as it was quantized, with no flag.

    A tensor holding NaN or infinity is an error naming it (a diverged run's weights), unless allow_non_finite."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        config = ModelConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"invalid config: {e}") from None
    try:
        stored = recipe_of(config)
        if quantize is not None and stored is not None:
            raise CheckpointError(f"{path} is already quantized ({stored.describe()}); load it without quantize")
        recipe = stored or (Recipe.build(quantize) if isinstance(quantize, str) else quantize)
        config.extra.pop("quantization_config", None)
        files = checkpoint_files(path)
        dtype = dtype or _checkpoint_dtype(files)
        with torch.device("meta"):
            model = DeepseekV2(config)
        if recipe is not None:
            quantize_model(model, recipe, dtype)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = model.to(dtype).to_empty(device=device or "cpu")
    if config.tie_word_embeddings:  # to_empty gives each module a new Parameter, which unties the two
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, files, allow_non_finite=allow_non_finite)
    return optimize(model.eval())


@torch.no_grad()
def load_weights(model: DeepseekV2, files: list[Path], allow_non_finite: bool = False) -> None:
    """Copy every stored tensor into its parameter slot; error on missing, unexpected, duplicated, misshapen,
    non-float or (unless allow_non_finite) non-finite tensors."""
    params = dict(model.named_parameters())
    quantized = quantized_targets(model)
    params.update({n: t for n, (t, _) in quantized.items()})
    names = official_names(params)
    packed: dict[str, dict[str, torch.Tensor]] = {}  # official weight name -> its compressed-tensors parts so far
    stacked: dict[str, list[str]] = {}  # internal stacked expert tensor -> the official names it covers
    for official, (name, part, _) in names.items():
        if part is not None:
            stacked.setdefault(name, []).append(official)
    seen: set[str] = set()
    stored_in: dict[str, str] = {}  # tensor name -> the file that held it
    unexpected: list[str] = []
    bar = tqdm(total=sum(len(_keys(f)) for f in files), unit="tensor", desc="loading", disable=None, leave=False)
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                bar.update()
                if key in stored_in:
                    raise CheckpointError(f"tensor {key!r} is stored twice, in {stored_in[key]} and {file.name}")
                stored_in[key] = file.name
                base = key[: key.rfind("_")] if key.endswith(PACKED_SUFFIXES) else None
                if base in names and params[names[base][0]].dtype == torch.uint8:
                    parts = packed.setdefault(base, {})
                    parts[key[len(base) + 1:]] = _read(f, key, file)
                    if {"packed", "scale", "shape"} <= parts.keys():
                        name, part, j = names[base]
                        _load_packed(slot(params[name], part, j), packed.pop(base), quantized[name][1], base,
                                     file.name, allow_non_finite)
                        seen.add(base)
                    continue
                if key in names:
                    name, part, j = names[key]
                    dst, covered = slot(params[name], part, j), [key]
                elif key in stacked:  # the stacked expert form
                    dst, covered = params[key], stacked[key]
                elif key == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue  # tied: the embedding already holds it
                else:
                    unexpected.append(key)
                    continue
                info = f.get_slice(key)
                shape = tuple(info.get_shape())
                q_name = names[key][0] if key in names else key
                K = quantized[q_name][1] if q_name in quantized else None
                expected = tuple(dst.shape) if K is None else (*dst.shape[:-1], K)
                if shape != expected:
                    raise CheckpointError(f"tensor {key!r} in {file.name} has shape {shape}, the config "
                                          f"expects {expected}")
                if info.get_dtype() not in _FLOAT_DTYPES:
                    raise CheckpointError(f"tensor {key!r} in {file.name} is {info.get_dtype()}; a model weight "
                                          f"must be floating-point ({', '.join(_FLOAT_DTYPES)})")
                src = _read(f, key, file)
                if not allow_non_finite:
                    check_finite(src, key, file.name, "; pass allow_non_finite=True to load it anyway")
                if K is None:
                    dst.copy_(src)
                else:  # quantized as it is read: the float tensor is released before the next one
                    bits, g = qf.block_format(K, dst.shape[-1])
                    scheme = qf.Scheme(bits, 0 if g == K else g)
                    dst.copy_(qf.quantize_blocks(src, scheme, key))
                del src
                seen.update(covered)
    bar.close()
    for base in packed:
        missing = sorted({"packed", "scale", "shape"} - packed[base].keys())
        raise CheckpointError(f"quantized weight {base!r} lacks {', '.join(f'{base}_{m}' for m in missing)}")
    problems = []
    for label, items in (("missing", [n for n in names if n not in seen]), ("unexpected", unexpected)):
        if items:
            more = " ..." if len(items) > 8 else ""
            problems.append(f"{label} tensors ({len(items)}): {', '.join(items[:8])}{more}")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))


def _keys(file: Path) -> list[str]:
    with _open(file) as f:
        return list(f.keys())


_STORED_DTYPES = {**_FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                  "U8": torch.uint8, "BOOL": torch.bool}


def _read(f, key: str, file: Path, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One stored tensor, read with plain reads into fresh memory rather than through the file's memory map (safe_open
    `f` names it): pages read through the map count in the process's RSS until the file closes, so a 4 GB shard
    would sit on top of a model loaded tensor by tensor. rows (lo, hi): its rows lo .. hi-1 along dim 0 alone, the
    only bytes read (a sharded run's rank, checkpoint/reader.py)."""
    try:
        header, base = _header(str(file), file.stat().st_mtime_ns)
        info = header[key]
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        if rows is not None:  # within the tensor (the caller checks)
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end, shape[0] = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes, rows[1] - rows[0]
        buf = bytearray(end - begin)
        with open(file, "rb") as fh:
            fh.seek(base + begin)
            if fh.readinto(buf) != len(buf):
                raise OSError("the file ends inside the tensor")
        dtype = _STORED_DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)
    except (KeyError, ValueError, OSError, RuntimeError) as e:
        try:  # an unusual dtype or layout: safetensors' own reader
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]
        except (SafetensorError, OSError, RuntimeError):
            raise CheckpointError(f"cannot read tensor {key!r} from {file} (truncated or corrupt?): {e}") from None


@functools.lru_cache(maxsize=4)
def _header(file: str, mtime_ns: int) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets) and where its data starts."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n)), 8 + n


def _load_packed(dst: torch.Tensor, parts: dict[str, torch.Tensor], K: int, base: str, fname: str,
                 allow_non_finite: bool) -> None:
    """Stored compressed-tensors parts of one weight -> its blocked rows (exact: same integers, same scales)."""
    bits, g = qf.block_format(K, dst.shape[-1])
    R = dst.shape[-2]
    packed, scale, shape = parts["packed"], parts["scale"], parts["shape"]
    where = f"quantized weight {base!r} in {fname}"
    if shape.tolist() != [R, K]:
        raise CheckpointError(f"{where} has weight_shape {shape.tolist()}, the config expects {[R, K]}")
    if packed.dtype != torch.int32 or tuple(packed.shape) != (R, K * bits // 32):
        raise CheckpointError(f"{where}: weight_packed is {packed.dtype} {tuple(packed.shape)}, the config's int{bits} "
                              f"expects int32 {(R, K * bits // 32)}")
    if not scale.is_floating_point() or tuple(scale.shape) != (R, K // g):
        raise CheckpointError(f"{where}: weight_scale has shape {tuple(scale.shape)}, the config's group size "
                              f"expects {(R, K // g)}")
    if not allow_non_finite and not bool(torch.isfinite(scale).all()):
        raise CheckpointError(f"{where}: weight_scale holds NaN or infinite values")
    held = scale.to(torch.bfloat16)
    if not torch.equal(held.to(scale.dtype), scale):  # another tool's fp32/fp16 scales: dsv2 holds bf16 ones
        warnings.warn(f"{where}: weight_scale rounded to bf16 (dsv2 holds its scales in bf16)", stacklevel=2)
    dst.copy_(qf.to_blocks(qf.unpack_int32(packed, bits, K), held, bits))
