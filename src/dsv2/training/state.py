"""A training checkpoint: RUN_DIR/checkpoints/step_NNNNNNN/, all a run needs to go on exactly as if never stopped.

    config.json, model.safetensors   the model in the Hugging Face layout (dsv2.checkpoint): loadable by
                                     dsv2.from_pretrained, `dsv2 generate` and transformers
    tokenizer.json                   the run's tokenizer (a resumed run uses this one)
    optimizer.safetensors            the AdamW state as state.{parameter index}.{key}, and the RNG states rng.*
    trainer_state.json               step, the run's settings, optimizer param groups and scalars, and a
                                     fingerprint of the data (a resumed run must read the same data)

Nothing is pickled. A checkpoint is written under a temporary name and renamed when complete, so a crash, a
Ctrl-C or a full disk leaves the earlier ones as they were. On resume the newest checkpoint whose files all read
back is used; a damaged one is named in a warning and set aside (run_dir.RunDir.set_aside), never deleted.

The batch of step k, its protected sequences and its LR are pure functions of (seed, k) (data/token_files.py,
trainer.py), so model, optimizer and RNG states are all the state there is.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..checkpoint import CheckpointError, from_pretrained, save_pretrained
from ..checkpoint.io import copy_tokenizer_of
from ..config import ModelConfig
from ..cpu import optimize
from ..distributed.parallel import Parallel
from ..errors import AdapterError
from ..files import atomic_write, fsync_path, write_safetensors
from ..lora import put_adapter, read_adapter
from ..lora.peft import CONFIG_FILE
from ..model import DeepseekV2
from ..tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer
from .config import TrainConfig, TrainingError, known_settings
from .finetune import is_lora_checkpoint, lora_model, save_lora
from .run_dir import STATE_FILE, RunDir
from .schedule import autocast_dtype
from .sharded import RNG_FILE, ShardError, check_shards, restore_sharded, save_sharded

OPTIMIZER_FILE = "optimizer.safetensors"


def _tensor_name(idx: int, key: str) -> str:
    return f"state.{idx}.{key}"


def optimizer_tensors(opt: torch.optim.Optimizer, par: Parallel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state as named tensors (optimizer.safetensors), experts' moments gathered from the ranks that
    hold them (a collective), plus JSON for the rest: no pickle."""
    sd = opt.state_dict()
    params = [p for group in opt.param_groups for p in group["params"]]
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[_tensor_name(idx, key)] = par.full_tensor(params[idx], value.detach().contiguous()).cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                   par: Parallel) -> None:
    """The inverse of optimizer_tensors: this rank's part of each tensor."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = par.local_tensor(params[int(idx)], t, name)
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run: RunDir, step: int, model: DeepseekV2, opt: torch.optim.Optimizer, tc: TrainConfig,
                    tokenizer_path: Path | None, data: dict[str, Any], par: Parallel | None = None) -> Path:
    """Under expert parallelism every rank calls this (the experts and their moments are gathered from the
    ranks holding them) and rank 0 writes the same files as one process would."""
    par = par or Parallel()
    state = {"step": step, "train_config": tc.to_dict(), "data": data}
    if par.fsdp_mesh is not None and not tc.lora:  # every rank writes its shards (sharded.py)
        return save_sharded(run, step, model, opt, state, tokenizer_path, tc.keep_last, par)
    params = par.full_parameters(model, trainable_only=tc.lora)
    tensors, opt_meta = optimizer_tensors(opt, par)
    final = run.checkpoint_path(step)
    with par.together():  # a full disk on rank 0 stops every rank
        if par.is_main:
            state = {**state, "optimizer": opt_meta, "time": time.time()}
            save = ((lambda d: save_lora(model, d, tc, params)) if tc.lora else
                    (lambda d: save_pretrained(model, d, params=params)))
            _write(run, final, model, save, tensors, state, tokenizer_path, tc.keep_last)
    return final


def _write(run: RunDir, final: Path, model: DeepseekV2, save: Callable[[Path], None],
           tensors: dict[str, torch.Tensor], state: dict[str, Any], tokenizer_path: Path | None,
           keep_last: int) -> None:
    """save(folder) writes the weights: the model (save_pretrained), or a LoRA run's adapters."""
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = run.checkpoints_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        if tokenizer_path is not None:
            copy_tokenizer_of(tokenizer_path, tmp, model.config)
        tensors = {**tensors, "rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        write_safetensors(tmp / OPTIMIZER_FILE, tensors)
        atomic_write(tmp / STATE_FILE, json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        fsync_path(run.checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a second Ctrl-C: the older checkpoints stay
        raise
    for old in run.checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class ResumePoint:
    """A checkpoint read back whole: where a resumed run starts."""

    path: Path
    step: int
    settings: TrainConfig
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    """Optimizer state and RNG states (optimizer.safetensors)."""
    model: DeepseekV2
    tokenizer: Path | None
    sharded: bool = False
    """A distributed checkpoint (sharded.py): the model's weights too are restored by restore()."""

    def restore(self, opt: torch.optim.Optimizer, par: Parallel) -> None:
        """RNG states and this rank's part of the optimizer state (of a sharded checkpoint, of the model too: after
        the model is wrapped, so that each rank reads only its shards)."""
        tensors = dict(self.tensors)
        torch.set_rng_state(tensors.pop("rng.cpu"))
        cuda = tensors.pop("rng.cuda", None)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
        if self.sharded:
            try:
                restore_sharded(self.path, self.model, opt)
            except (ShardError, KeyError, ValueError, RuntimeError) as e:
                raise TrainingError(f"{self.path} does not fit this run's model and optimizer ({e})") from None
            return
        try:
            load_optimizer(opt, tensors, self.state["optimizer"], par)
        except (KeyError, ValueError, RuntimeError) as e:
            raise TrainingError(f"{self.path / OPTIMIZER_FILE} does not fit this run's optimizer ({e})") from None


class Damaged(Exception):
    """A checkpoint file that is missing, truncated or not in its format (set aside, the one before is tried)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Damaged(f"{path.name} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Damaged(f"{path.name} is not valid JSON ({e})") from None


def _read(ckpt: Path, device: torch.device) -> ResumePoint:
    """Every file of a checkpoint: Damaged naming the one that does not read back; a TrainingError (nothing set
    aside) for a checkpoint that reads back but this dsv2 cannot use, or a file it may not read (permissions)."""
    state = _read_json(ckpt / STATE_FILE)
    sharded = isinstance(state, dict) and state.get("sharded") is True
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("train_config"),
                                                                                         dict)
            and (sharded or isinstance(state.get("optimizer"), dict))):
        raise Damaged(f"{STATE_FILE} lacks step, train_config or optimizer")
    try:
        settings = TrainConfig.from_dict(known_settings(state["train_config"]), str(ckpt / STATE_FILE))
    except ValueError as e:
        raise TrainingError(f"cannot resume from {ckpt}: {e}") from None
    if sharded:
        return _read_sharded(ckpt, state, settings, device)
    try:
        tensors = load_file(str(ckpt / OPTIMIZER_FILE))
    except FileNotFoundError:
        raise Damaged(f"{OPTIMIZER_FILE} is missing") from None
    except SafetensorError as e:
        raise Damaged(f"{OPTIMIZER_FILE}: {e}") from None
    if "rng.cpu" not in tensors:
        raise Damaged(f"{OPTIMIZER_FILE} has no rng.cpu tensor")
    tokenizer = ckpt / TOKENIZER_FILE if (ckpt / TOKENIZER_FILE).exists() else None
    if tokenizer is not None:
        try:
            load_tokenizer(tokenizer)
        except TokenizerError as e:
            raise Damaged(str(e)) from None
    lora = is_lora_checkpoint(ckpt)
    _read_json(ckpt / (CONFIG_FILE if lora else "config.json"))  # unreadable JSON is damage (a config this dsv2
    if lora:  # refuses is not, below); a LoRA run's base is init_from's: if that cannot be read, the checkpoint
        return ResumePoint(ckpt, state["step"], settings, state, tensors,  # is not what is damaged
                           _lora_model(ckpt, settings, device), tokenizer)
    try:
        model = from_pretrained(ckpt, dtype=torch.float32, device=device).train()
    except CheckpointError as e:
        if str(e).startswith("invalid config"):
            raise TrainingError(f"cannot resume from {ckpt}: {e}") from None
        raise Damaged(str(e)) from None
    return ResumePoint(ckpt, state["step"], settings, state, tensors, model, tokenizer)


def _read_sharded(ckpt: Path, state: dict[str, Any], settings: TrainConfig, device: torch.device) -> ResumePoint:
    """A distributed checkpoint's model built from its config (its weights come in restore(), shard by shard)."""
    problem = check_shards(ckpt)
    if problem is not None:
        raise Damaged(problem)
    try:
        tensors = load_file(str(ckpt / RNG_FILE))
    except (FileNotFoundError, SafetensorError) as e:
        raise Damaged(f"{RNG_FILE}: {e}") from None
    try:
        config = ModelConfig.from_json(ckpt / "config.json")
    except (OSError, ValueError) as e:
        raise Damaged(f"config.json: {e}") from None
    with torch.device("meta"):  # given memory once sharded; restore() reads each rank's shards into it
        model = optimize(DeepseekV2(config)).train()
    tokenizer = ckpt / TOKENIZER_FILE if (ckpt / TOKENIZER_FILE).exists() else None
    return ResumePoint(ckpt, state["step"], settings, state, tensors, model, tokenizer, sharded=True)


def _lora_model(ckpt: Path, settings: TrainConfig, device: torch.device) -> DeepseekV2:
    """A LoRA run's model: its base (init_from: TrainingError where it cannot be read) with the checkpoint's
    adapters (Damaged where they do not read back or do not fit)."""
    try:
        model = lora_model(settings, device, autocast_dtype(settings, device))
    except (CheckpointError, OSError) as e:
        raise TrainingError(f"cannot resume from {ckpt}: its base model {settings.init_from} does not load ({e})"
                            ) from None
    try:
        put_adapter(model, read_adapter(ckpt), 0, str(ckpt))
    except AdapterError as e:
        raise Damaged(str(e)) from None
    return model


def load_resume_point(run: RunDir, device: torch.device, warn: Callable[[str], None],
                      set_aside: bool = True) -> ResumePoint:
    """The newest checkpoint of the run that reads back whole. Damaged newer ones are named in a warning and,
    with set_aside (the rank that owns the directory), moved out of the checkpoint list. A file that exists but
    cannot be read (permissions, an I/O error) stops the resume with nothing moved."""
    problems = []
    for ckpt in reversed(run.checkpoints()):
        try:
            return _read(ckpt, device)
        except Damaged as e:
            problems.append(f"{ckpt.name}: {e}")
            moved = f"; set aside as {run.set_aside(ckpt).name}" if set_aside else ""
            warn(f"warning: checkpoint {ckpt.name} is damaged ({e}){moved}; trying the one before")
        except OSError as e:
            raise TrainingError(f"cannot read checkpoint {ckpt}: {e.strerror or e}: {e.filename or ''}") from None
    if not problems:
        raise TrainingError(f"--resume: {run.path} has no checkpoint")
    raise TrainingError(f"--resume: no checkpoint of {run.path} reads back whole ({'; '.join(problems)}); they are "
                        f"kept under {run.checkpoints_dir} as damaged-*; start a new run with another --out")
