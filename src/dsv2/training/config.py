"""The settings of a training run: every knob in one dataclass, filled from a YAML/TOML file and CLI flags.

A run keeps its settings (run_dir.py writes them with the run and into each checkpoint), and `--resume` continues
with them. Only the settings in RESUMABLE may change on resume: they decide how long the run goes and how it
reports and saves, not what it computes. Every other one (model, data, tokenizer, batch, schedule, seed, dtype,
dropping) would make the resumed steps differ from a straight run, so a change is refused, naming each setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..field_types import check_field_types
from ..lora.attach import parse_targets
from ..presets import PRESETS
from .data import STDLIB_SOURCE

PRESET_NAMES = frozenset(PRESETS)

LAUNCH = frozenset({"device", "expert_parallel", "progress", "deterministic", "fsdp", "dp_replicate", "dp_shard",
                    "cpu_offload", "activation_checkpointing"})
"""Settings of the launch, not of the run: a resumed run takes them from its own flags (or the defaults), never
from the stored settings (a run saved on 4 expert-parallel ranks resumes on 2, or in one process)."""
RESUMABLE = LAUNCH | {"out", "max_steps", "save_every", "eval_every", "eval_batches", "keep_last", "max_bad_steps"}
"""Settings a resumed run may change. The LR schedule is a function of max_steps, so a new max_steps moves the
decay points of the remaining steps (the trainer says so when it happens)."""


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass
class TrainConfig:
    """Every knob of a run; a YAML/TOML file and CLI flags fill it (flags win)."""

    preset: str = "tiny"
    """Model preset or config.json path (ignored with init_from, which brings its own config)."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig field overrides, e.g. {"num_hidden_layers": 2}."""
    data: list[str] = field(default_factory=lambda: [STDLIB_SOURCE])
    """Corpus sources: files, folders, globs, .jsonl, .parquet, or "stdlib" (the built-in corpus)."""
    max_bytes: int | None = None
    """Take at most this many bytes of text from the corpus (None: all)."""
    tokenizer: str | None = None
    """An existing tokenizer.json (or a directory holding one); None trains a byte-level BPE."""
    val_fraction: float = 0.01
    out: str = "runs/tiny"
    """RUN_DIR: metrics.jsonl, checkpoints/, data/, plots/ (run_dir.py)."""
    max_steps: int = 500
    batch_size: int = 16
    """Global batch in sequences: the same on 1 or N processes."""
    micro_batch_size: int | None = None
    """Sequences per process per forward; batch_size / (world * micro_batch_size) steps are accumulated."""
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 50
    schedule: str = "step"
    """step (V2: x decay_factor at each of decay_at) | cosine (to min_lr_ratio * lr)."""
    decay_at: tuple[float, ...] = (0.6, 0.9)
    decay_factor: float = 0.316
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA and on CPUs with native bf16 matmul, else fp32) | fp32 | bf16."""
    capacity_factor: float | None = 1.0
    """Device-level token dropping capacity (training only); None disables dropping."""
    protect_fraction: float = 0.1
    """Fraction of sequences whose tokens are never dropped."""
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 250
    keep_last: int = 2
    seed: int = 0
    max_bad_steps: int = 3
    """Consecutive non-finite steps tolerated (each is skipped) before the run stops."""
    init_from: str | None = None
    """Fine-tune: a checkpoint directory in the Hugging Face layout (dsv2.from_pretrained)."""
    lora: bool = False
    """Fine-tune low-rank adapters on init_from's frozen weights (dsv2/lora/) instead of every weight."""
    lora_r: int = 16
    lora_alpha: float | None = None
    """The adapters' scale is lora_alpha / lora_r; None: 2 * lora_r."""
    lora_targets: str = "attention"
    """Groups (attention, dense, shared, experts, all-linear) or module names, comma-separated."""
    lora_dropout: float = 0.05
    device: str = "auto"
    expert_parallel: int = 1
    """Ranks the routed experts are sharded over (torchrun); see dsv2/distributed/."""
    fsdp: bool = False
    """Shard weights, gradients and optimizer state over the ranks (FSDP2, torchrun): dsv2/distributed/fsdp.py."""
    dp_replicate: int = 1
    """With fsdp: groups of world / dp_replicate ranks each shard the model, replicated across groups (HSDP)."""
    dp_shard: int | None = None
    """With fsdp: the ranks of such a group (None: world / dp_replicate); dp_shard x dp_replicate must be the world."""
    cpu_offload: bool = False
    """With fsdp: each rank's shards, their gradients and AdamW's state in host memory, the optimizer step on the
    CPU; a layer's weights go to the accelerator for its forward and backward (FSDP2's CPUOffloadPolicy)."""
    activation_checkpointing: bool = False
    """Recompute each layer's attention and experts in the backward instead of keeping their activations."""
    progress: bool = True
    deterministic: bool = False
    """torch's deterministic algorithms during the run (dsv2/reproducibility.py): what makes CUDA runs repeat
    bitwise; CPU runs repeat without it."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        check_field_types(self, ConfigError)
        self.decay_at, self.betas = tuple(self.decay_at), tuple(self.betas)
        checks = [
            (self.max_steps > 0, "max_steps must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.micro_batch_size is None or self.micro_batch_size > 0, "micro_batch_size must be > 0"),
            (self.seq_len > 1, "seq_len must be > 1"),
            (bool(self.data), "data needs at least one source"),
            (bool(self.out.strip()), "out (the run directory) must not be empty"),
            (0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            (self.max_bytes is None or self.max_bytes > 0, "max_bytes must be > 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule in ("step", "cosine"), f"schedule must be step or cosine, got {self.schedule!r}"),
            (all(0 <= f <= 1 for f in self.decay_at), "decay_at must be fractions of max_steps in [0, 1]"),
            (self.decay_factor > 0, "decay_factor must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), "betas must be in [0, 1)"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
            (self.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto, fp32 or bf16, got {self.dtype!r}"),
            (self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be > 0 or null"),
            (0 <= self.protect_fraction <= 1, "protect_fraction must be in [0, 1]"),
            (self.eval_every >= 1, "eval_every must be >= 1 (steps between validation losses)"),
            (self.eval_batches >= 1, "eval_batches must be >= 1"),
            (self.save_every >= 1, "save_every must be >= 1 (steps between checkpoints)"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.max_bad_steps >= 0, "max_bad_steps must be >= 0"),
            (self.expert_parallel >= 1, "expert_parallel must be >= 1"),
            (self.dp_replicate >= 1, "dp_replicate must be >= 1"),
            (self.dp_replicate == 1 or self.fsdp, "dp_replicate applies with fsdp (HSDP)"),
            (self.dp_shard is None or self.dp_shard >= 1, "dp_shard must be >= 1"),
            (self.dp_shard is None or self.fsdp, "dp_shard applies with fsdp"),
            (not self.cpu_offload or self.fsdp, "cpu_offload applies with fsdp: it moves FSDP's shards to the host"),
            (not self.lora or self.init_from is not None, "--lora adapts a trained model: give it with --init-from"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.lora:
            parse_targets(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "training config") -> TrainConfig:
        """A TrainConfig from a dict of field names (a config file's, or a run's stored settings)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source} must be a mapping of setting names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown training config keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def train_settings(path: str | os.PathLike | None, **flags: Any) -> dict[str, Any]:
    """The settings a user gave: a YAML or TOML file's (keys = field names), then the flags that are not None."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.suffix not in (".toml", ".yaml", ".yml"):
            raise ConfigError(f"{p}: training config must be .yaml, .yml or .toml")
        try:
            text = p.read_text(encoding="utf-8")
            values = tomllib.loads(text) if p.suffix == ".toml" else _yaml_load(text)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {p}: {e}") from None
        except Exception as e:  # noqa: BLE001 - yaml.YAMLError, tomllib.TOMLDecodeError: a one-line message
            raise ConfigError(f"{p} is not valid {p.suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
        TrainConfig.from_dict(values, str(p))  # every key known and every value valid, before flags change them
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def _yaml_load(text: str) -> Any:
    """yaml.safe_load, reading floats as YAML 1.2 does: PyYAML (YAML 1.1) takes `lr: 1e-3` for a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return yaml.load(text, Loader=Loader) or {}


def load_train_config(path: str | os.PathLike | None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML or TOML file (keys = field names), then non-None overrides."""
    return TrainConfig.from_dict(train_settings(path, **overrides))


def _absolute(path: str) -> str:
    return path if path == STDLIB_SOURCE else os.path.abspath(os.path.expanduser(path))


def absolute_paths(tc: TrainConfig) -> TrainConfig:
    """tc with its data sources, tokenizer, init_from and a preset given as a file made absolute, so a run's stored
    settings mean the same files from any working directory (and `corpus/` and `./corpus` are one setting)."""
    preset = _absolute(tc.preset) if os.path.exists(tc.preset) and tc.preset not in PRESET_NAMES else tc.preset
    return dataclasses.replace(tc, data=[_absolute(d) for d in tc.data], preset=preset,
                               tokenizer=tc.tokenizer and _absolute(tc.tokenizer),
                               init_from=tc.init_from and _absolute(tc.init_from))


def changed_settings(old: TrainConfig, new: TrainConfig) -> list[str]:
    """'name old -> new' for each setting outside RESUMABLE that differs (paths compared as absolute paths)."""
    a, b = absolute_paths(old), absolute_paths(new)
    return [f"{f.name} {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}" for f in dataclasses.fields(old)
            if f.name not in RESUMABLE and getattr(a, f.name) != getattr(b, f.name)]


def refuse_changes(old: TrainConfig, new: TrainConfig, run: str | os.PathLike) -> None:
    """TrainingError listing every setting `new` would change in the run that `old` describes."""
    changes = changed_settings(old, new)
    if changes:
        raise TrainingError(
            f"--resume continues {run} with its own settings, and these would change it: {'; '.join(changes)}. "
            f"Leave them out to resume, or start a new run with another --out (--init-from a checkpoint to start "
            f"from its weights); only {', '.join(sorted(RESUMABLE - {'out', 'progress'}))} may change on resume")


def known_settings(stored: Any) -> Any:
    """A stored settings dict without the keys this version does not know (written by another dsv2 version)."""
    if not isinstance(stored, dict):
        return stored
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in stored.items() if k in known}


def resumed_config(stored: dict[str, Any], given: dict[str, Any], run: str | os.PathLike) -> TrainConfig:
    """The run's stored settings with the given ones applied, refusing any that would change the run."""
    old = TrainConfig.from_dict(known_settings(stored), f"the stored settings of {run}")
    kept = {k: v for k, v in old.to_dict().items() if k not in LAUNCH}
    new = TrainConfig.from_dict({**kept, **given})
    refuse_changes(old, new, run)
    return new
