"""Starting a run: its device, model, data and batch split, and the checks a resumed run must pass (the pieces
trainer.train calls before its loop)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..chat_template import ChatTemplate
from ..checkpoint import from_pretrained
from ..checkpoint.reader import WeightReader
from ..config import ModelConfig
from ..cpu import optimize
from ..distributed.fsdp import materialize, seeded_init
from ..distributed.parallel import Parallel
from ..files import atomic_write
from ..model import DeepseekV2
from ..presets import get_config
from . import data as data_mod
from .config import TrainConfig, TrainingError, refuse_changes
from .finetune import lora_model
from .run_dir import SOURCES_FILE, RunDir
from .schedule import autocast_dtype
from .state import ResumePoint


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = RunDir(run_dir).checkpoints()
    return ckpts[-1] if ckpts else None


def device_for(tc: TrainConfig) -> torch.device:
    if tc.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(tc.device)
    except RuntimeError as e:
        raise TrainingError(f"--device {tc.device!r}: {e}") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise TrainingError(f"--device {tc.device}: no such CUDA device here ({torch.cuda.device_count()} visible; "
                            f"this torch {'has' if torch.backends.cuda.is_built() else 'has no'} CUDA support)")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {tc.device}: dsv2 trains on cpu or cuda")
    return device


def data_fingerprint(tc: TrainConfig) -> dict[str, Any]:
    """The data a run reads: a hash of (path, size, mtime) of every source file, and their number."""
    files = data_mod.sources_fingerprint(tc.data)
    return {"sources_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(), "files": len(files)}


def prepare_data(tc: TrainConfig, run: RunDir, vocab_size: int,
                 tokenizer: Path | None = None) -> tuple[data_mod.TokenDataset, Path]:
    """Tokenizer and cached token files. The tokenizer is, in this order: `tokenizer` (a resumed run's own),
    tc.tokenizer, init_from's, the one this run already trained (reused only for the data it was trained on: other
    ranks of a run reuse rank 0's), or one trained now on the corpus."""
    given = tokenizer or tc.tokenizer or (Path(tc.init_from) / data_mod.TOKENIZER_FILE if tc.init_from and (
        Path(tc.init_from) / data_mod.TOKENIZER_FILE).exists() else None)
    if data_mod.is_instruction_data(tc.data):
        return instruction_data(tc, run, vocab_size, given)
    record = run.tokenizer_dir / SOURCES_FILE
    trained_on = {"sources": data_mod.sources_fingerprint(tc.data), "max_bytes": tc.max_bytes,
                  "vocab_size": vocab_size}
    if given is not None:
        tok = data_mod.load_tokenizer(given)
        tok_path = data_mod.save_tokenizer(tok, run.tokenizer_dir)
        record.unlink(missing_ok=True)  # this copy was not trained here: no data record vouches for it
    elif (run.tokenizer_dir / data_mod.TOKENIZER_FILE).exists():
        try:
            same = json.loads(record.read_text(encoding="utf-8")) == json.loads(json.dumps(trained_on))
        except (OSError, ValueError):
            same = False
        if not same:
            raise TrainingError(f"{run.tokenizer_dir / data_mod.TOKENIZER_FILE} was trained on other data than "
                                f"this run's ({', '.join(tc.data)}, max_bytes {tc.max_bytes}) or has no record of "
                                "it; use another --out, or --overwrite to replace the run")
        tok_path = run.tokenizer_dir / data_mod.TOKENIZER_FILE
        tok = data_mod.load_tokenizer(tok_path)
    else:
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {', '.join(tc.data)}", flush=True)
        docs = data_mod.iter_documents(tc.data, max_bytes=tc.max_bytes)
        tok = data_mod.train_tokenizer(docs, vocab_size, show_progress=tc.progress)
        tok_path = data_mod.save_tokenizer(tok, run.tokenizer_dir)
        atomic_write(record, json.dumps(trained_on))
    if tok.get_vocab_size() > vocab_size:
        raise TrainingError(f"tokenizer has {tok.get_vocab_size()} tokens but the model only {vocab_size}")
    ds = data_mod.build_token_dataset(tc.data, tok, run.data_dir, val_fraction=tc.val_fraction, seed=tc.seed,
                                      max_bytes=tc.max_bytes, show_progress=tc.progress)
    docs = ds.meta["n_documents"]
    for split, tokens in (("train", ds.train), ("val", ds.val)):
        if len(tokens) < tc.seq_len + 1:  # before any step, not at the first evaluation
            raise TrainingError(f"the {split} split has {len(tokens)} tokens ({docs[split]} of {sum(docs.values())} "
                                f"documents, val_fraction {tc.val_fraction}), fewer than one window of seq_len + 1 "
                                f"= {tc.seq_len + 1}; add text, lower --seq-len, or change val_fraction")
    return ds, tok_path


def instruction_data(tc: TrainConfig, run: RunDir, vocab_size: int, given: Path | None
                     ) -> tuple[data_mod.InstructionDataset, Path]:
    """Chat or prompt/completion records (data/instructions.py), rendered with init_from's chat template."""
    if given is None:
        raise TrainingError("instruction data is tokenized with the model's own tokenizer: give --init-from a "
                            "checkpoint with tokenizer.json (or --tokenizer)")
    tok = data_mod.load_tokenizer(given)
    tok_path = data_mod.save_tokenizer(tok, run.tokenizer_dir)
    (run.tokenizer_dir / SOURCES_FILE).unlink(missing_ok=True)
    template = ChatTemplate.from_checkpoint(Path(tc.init_from)) if tc.init_from else None
    bos, eos = data_mod.special_token_ids(tok)
    renderer = data_mod.Renderer(tok, template, bos, eos)
    ds = data_mod.InstructionDataset.build(tc.data, renderer, tc.val_fraction, tc.seed,
                                           pad_id=eos if eos is not None else 0, seq_len=tc.seq_len)
    if max(max(e.ids) for e in ds.train_examples + ds.val_examples) >= vocab_size:
        raise TrainingError(f"the tokenizer's ids reach past the model's vocabulary of {vocab_size}")
    print(f"instruction data: {len(ds.train_examples)} train / {len(ds.val_examples)} val examples, loss on the "
          f"answer tokens only ({len(ds.train)} in train), one padded row of seq_len {tc.seq_len} per example"
          + (f"; {ds.dropped} records left out: their answer starts past seq_len" if ds.dropped else ""), flush=True)
    return ds, tok_path


def build_model(tc: TrainConfig, device: torch.device, meta: bool = False) -> DeepseekV2:
    """The model to train (fp32 master weights; a LoRA run: init_from frozen, with adapters) with the CPU fast
    paths on (dsv2.cpu.optimize: on the CPU, SDPA's flash kernel for MLA, fp32 GEMMs where bf16 is emulated; they
    step aside under autograd where they must)."""
    if tc.init_from and tc.model:
        raise TrainingError("model overrides cannot change a checkpoint given with init_from")
    if meta and not tc.lora:  # sharded before it is given memory: initial_weights fills each rank's shards
        config = _meta_config(tc)
        if config is not None:
            with torch.device("meta"):
                return optimize(DeepseekV2(config))
    if tc.init_from:
        if tc.lora:  # the base frozen (a quantized one too: its integer rows are never trained)
            return lora_model(tc, device, autocast_dtype(tc, device))
        if "quantization_config" in ModelConfig.from_json(Path(tc.init_from) / "config.json").extra:
            raise TrainingError(f"{tc.init_from} is quantized (its weights are integers, not parameters): train from "
                                "its float original")
        return from_pretrained(tc.init_from, dtype=torch.float32, device=device).train()
    config = get_config(tc.preset, **tc.model)  # a fresh model: drawn as a sharded run draws it (initial_weights)
    with torch.device("meta"):
        model = DeepseekV2(config)
    materialize(model, device, initial_weights(tc, config))
    return optimize(model)


def _meta_config(tc: TrainConfig) -> ModelConfig | None:
    """The config a model built on the meta device gets, or None where the plain build must run: a checkpoint that
    from_pretrained should judge (no config.json: its error), a quantized one, tied embeddings (to_empty would
    untie them)."""
    if tc.init_from:
        if not (Path(tc.init_from) / "config.json").is_file():
            return None
        config = ModelConfig.from_json(Path(tc.init_from) / "config.json")
    else:
        config = get_config(tc.preset, **tc.model)
    return None if config.tie_word_embeddings or "quantization_config" in config.extra else config


def initial_weights(tc: TrainConfig, config: ModelConfig):
    """For a model built on the meta device: each whole parameter, from init_from's files or drawn as a
    one-process run with the run's seed draws it (fsdp.materialize keeps a rank's shard of each)."""
    if tc.init_from:
        return WeightReader(tc.init_from).full
    return seeded_init(tc.seed, config.initializer_range)


def batch_split(tc: TrainConfig, par: Parallel) -> tuple[int, int]:
    """(micro-batch, accumulation steps) of this rank."""
    if tc.batch_size % par.world:
        raise TrainingError(f"batch_size {tc.batch_size} cannot be split over {par.world} processes")
    local = tc.batch_size // par.world
    micro = tc.micro_batch_size or local
    if local % micro:
        raise TrainingError(f"batch_size {tc.batch_size} is not a multiple of micro_batch_size {micro}"
                            + (f" x {par.world} processes" if par.world > 1 else ""))
    return micro, local // micro


def check_resume(point: ResumePoint, tc: TrainConfig, run: RunDir, fingerprint: dict[str, Any], say) -> None:
    """The resumed run is the stored one: same settings but for RESUMABLE ones, same data."""
    refuse_changes(point.settings, tc, run.path)
    stored = point.state.get("data")
    if stored is not None and stored != fingerprint:
        raise TrainingError(f"the data of {run.path} changed since {point.path.name} was saved ({stored.get('files')} "
                            f"source files then, {fingerprint['files']} now; or a file was moved, or changed size "
                            "or modification time): a resumed run must read the data it started with; restore "
                            f"it, or start a new run from these weights with --init-from {point.path}")
    if point.settings.max_steps != tc.max_steps and point.step < tc.max_steps:
        say(f"max_steps {point.settings.max_steps} -> {tc.max_steps}: the LR schedule of the remaining steps "
            "follows the new length")
