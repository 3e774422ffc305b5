"""Training and fine-tuning with DeepSeek-V2's recipe, the whole loop in one place.

    data -> forward (autocast) -> LM loss + balance losses -> backward (accumulate) -> clip -> AdamW step
         -> log -> eval -> checkpoint

Recipe (DeepSeek-V2 Sec. 3.2.1 and 2.2.3-2.2.4, see ../shared/reference/PAPER.md): AdamW (0.9, 0.95), weight
decay 0.1 on matrices only, linear warm-up then the LR multiplied by 0.316 at 60% and 90% of the run (cosine as
an option), gradient clipping 1.0; expert-, device- and communication-level balance losses per sequence; device-
level token dropping with capacity factor 1.0 during training, with ~10% of sequences never dropped.

Determinism: the batch of step k is a pure function of (seed, k) (data.py), the protected sequences of step k are
drawn from a generator seeded with (seed, k), the LR is a pure function of k. A checkpoint therefore only needs
model, optimizer, step and RNG states to continue exactly as a straight run (tests/test_train.py proves it).

Checkpoints are directories RUN_DIR/checkpoints/step_XXXXXXX written to a temporary name and renamed, so a crash
never leaves a half checkpoint; each holds the model in the Hugging Face layout (config.json + safetensors,
loadable by dsv2.from_pretrained and `dsv2 generate`), tokenizer.json, optimizer.safetensors and
trainer_state.json. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import data as data_mod
from .checkpoint import checkpoint_files, from_pretrained, load_weights, save_pretrained
from .config import ModelConfig, get_config
from .losses import balance_losses, choose_protected, device_token_drop
from .model import DeepseekV2
from .moe import MoE
from .parallel import Parallel, init_parallel
from .router import Routing


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    """Every knob of a run; a YAML/TOML file and CLI flags fill it (flags win)."""

    preset: str = "tiny"
    """Model preset or config.json path (ignored with init_from, which brings its own config)."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig field overrides, e.g. {"num_hidden_layers": 2}."""
    data: list[str] = field(default_factory=lambda: [data_mod.STDLIB_SOURCE])
    """Corpus sources: files, folders, globs, .jsonl, .parquet, or "stdlib" (the built-in corpus)."""
    max_bytes: int | None = None
    """Take at most this many bytes of text from the corpus (None: all)."""
    tokenizer: str | None = None
    """An existing tokenizer.json (or a directory holding one); None trains a byte-level BPE."""
    val_fraction: float = 0.01
    out: str = "runs/tiny"
    """RUN_DIR: metrics.jsonl, checkpoints/, data/, plots/."""
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
    device: str = "auto"
    expert_parallel: int = 1
    """Ranks the routed experts are sharded over (torchrun); see parallel.py."""
    progress: bool = True

    def __post_init__(self) -> None:
        self.decay_at, self.betas = tuple(self.decay_at), tuple(self.betas)
        if isinstance(self.data, str):
            self.data = [self.data]
        checks = [
            (self.max_steps > 0, "max_steps must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.seq_len > 1, "seq_len must be > 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule in ("step", "cosine"), f"schedule must be step or cosine, got {self.schedule!r}"),
            (self.dtype in ("auto", "fp32", "bf16"), f"dtype must be auto, fp32 or bf16, got {self.dtype!r}"),
            (self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be > 0 or null"),
            (0 <= self.protect_fraction <= 1, "protect_fraction must be in [0, 1]"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.expert_parallel >= 1, "expert_parallel must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | os.PathLike | None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML or TOML file (keys = field names), then non-None overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        text = p.read_text()
        if p.suffix == ".toml":
            values = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"{p}: training config must be .yaml, .yml or .toml")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{p}: unknown training config keys {unknown}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------------------
# schedule and optimizer
def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then V2's step decay (or cosine). A pure function of the step: nothing to checkpoint."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "cosine":
        progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
        floor = tc.lr * tc.min_lr_ratio
        return floor + (tc.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * tc.decay_factor ** sum(step >= frac * tc.max_steps for frac in tc.decay_at)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (and stacked expert matrices) only, never on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, eps=1e-8)


def autocast_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    if tc.dtype == "fp32":
        return None
    if tc.dtype == "bf16" or device.type == "cuda":
        return torch.bfloat16
    # CPUs without native bf16 matmul (AVX2-only) run bf16 several times SLOWER than fp32
    native = getattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch._C._cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else None


# ------------------------------------------------------------------------------------------------------------
# token dropping and per-step MoE statistics
class DeviceTokenDrop:
    """MoE.token_drop policy: device-level capacity per group, protected sequences chosen per micro-batch."""

    def __init__(self, config: ModelConfig, capacity_factor: float):
        self.config, self.capacity_factor = config, capacity_factor
        self.protect: torch.Tensor | None = None
        self.dropped = 0
        self.assignments = 0

    def __call__(self, routing: Routing, batch_size: int) -> torch.Tensor:
        E, K = routing.scores_TE.shape[-1], routing.experts_TK.shape[-1]
        keep, stats = device_token_drop(routing.scores_TE.detach().view(batch_size, -1, E),
                                        routing.experts_TK.view(batch_size, -1, K), self.config.n_group,
                                        self.capacity_factor, protect=self.protect)
        self.dropped += int(stats.n_dropped)
        self.assignments += int(stats.n_assignments)
        return keep.view(-1, K)


class MoEStats:
    """Accumulates, over a step's micro-batches, balance losses and expert loads per MoE layer."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0
        self.counts: list[torch.Tensor] = []

    def add(self, losses: list[dict[str, torch.Tensor]], routings: list[Routing]) -> None:
        for key in ("expert_balance", "device_balance", "comm_balance"):
            mean = sum(float(d[key].detach()) for d in losses) / max(1, len(losses))
            self.sums[key] = self.sums.get(key, 0.0) + mean
        self.n += 1
        counts = [torch.bincount(r.experts_TK.flatten(), minlength=r.scores_TE.shape[-1]).cpu() for r in routings]
        self.counts = counts if not self.counts else [a + b for a, b in zip(self.counts, counts, strict=True)]

    def all_reduce(self, par: Parallel) -> None:
        """Over all ranks: balance losses averaged (ranks hold equal shares of the batch), loads summed."""
        keys = sorted(self.sums)
        self.sums = dict(zip(keys, par.mean([self.sums[k] for k in keys]), strict=True))
        self.counts = [par.sum(c) for c in self.counts]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v / max(1, self.n) for k, v in self.sums.items()}
        if self.counts:
            out["expert_load_max_mean"] = [round(float(c.max() / c.float().mean()), 4) for c in self.counts]
            out["expert_load"] = [[round(float(x), 5) for x in c.float() / c.sum()] for c in self.counts]
        return out


# ------------------------------------------------------------------------------------------------------------
# checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten the optimizer state into named tensors (safetensors) plus JSON for the rest: no pickle."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model: DeepseekV2, opt: torch.optim.Optimizer, tc: TrainConfig,
                    tokenizer_path: Path | None, keep_last: int, par: Parallel | None = None) -> Path:
    """Under expert parallelism every rank calls this (the experts and their moments are gathered from the
    ranks holding them) and rank 0 writes the same files as one process would."""
    par = par or Parallel()
    params = par.full_parameters(model)
    tensors, opt_meta = _optimizer_tensors(opt)
    tensors = par.full_optimizer_tensors(opt, tensors)
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    if par.is_main:
        _write_checkpoint(root, final, step, model, params, tensors, opt_meta, tc, tokenizer_path, keep_last)
    par.barrier()
    return final


def _write_checkpoint(root: Path, final: Path, step: int, model: DeepseekV2, params: dict[str, torch.Tensor],
                      tensors: dict[str, torch.Tensor], opt_meta: dict[str, Any], tc: TrainConfig,
                      tokenizer_path: Path | None, keep_last: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, params=params)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "train_config": tc.to_dict(), "optimizer": opt_meta, "time": time.time()}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


# ------------------------------------------------------------------------------------------------------------
def _device(tc: TrainConfig) -> torch.device:
    if tc.device != "auto":
        return torch.device(tc.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_data(tc: TrainConfig, run_dir: Path, vocab_size: int) -> tuple[data_mod.TokenDataset, Path]:
    """Tokenizer (given, from init_from, or trained on the corpus) and the cached token files."""
    tok_src = tc.tokenizer
    if tok_src is None and tc.init_from and (Path(tc.init_from) / "tokenizer.json").exists():
        tok_src = str(Path(tc.init_from) / "tokenizer.json")
    tok_dir = run_dir / "tokenizer"
    if tok_src is not None:
        tokenizer = data_mod.load_tokenizer(tok_src)
    elif (tok_dir / "tokenizer.json").exists():
        tokenizer = data_mod.load_tokenizer(tok_dir / "tokenizer.json")
    else:
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {', '.join(tc.data)}", flush=True)
        docs = data_mod.iter_documents(tc.data, max_bytes=tc.max_bytes)
        tokenizer = data_mod.train_tokenizer(docs, vocab_size, show_progress=tc.progress)
    tok_path = data_mod.save_tokenizer(tokenizer, tok_dir)
    if tokenizer.get_vocab_size() > vocab_size:
        raise TrainingError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {vocab_size}")
    ds = data_mod.build_token_dataset(tc.data, tokenizer, run_dir / "data", val_fraction=tc.val_fraction,
                                      seed=tc.seed, max_bytes=tc.max_bytes, show_progress=tc.progress)
    return ds, tok_path


def build_model(tc: TrainConfig, device: torch.device) -> DeepseekV2:
    if tc.init_from:
        model = from_pretrained(tc.init_from, dtype=torch.float32, device=device)
        if tc.model:
            raise TrainingError("model overrides cannot change a checkpoint given with init_from")
        return model.train()
    torch.manual_seed(tc.seed)
    model = DeepseekV2(get_config(tc.preset, **tc.model))
    return model.to(device)


@torch.no_grad()
def evaluate(model: DeepseekV2, ds: data_mod.TokenDataset, tc: TrainConfig, device: torch.device,
             amp: torch.dtype | None) -> float:
    """Mean next-token loss over fixed validation windows (no token dropping: the model is in eval mode)."""
    model.eval()
    total, n = 0.0, 0
    micro = tc.micro_batch_size or tc.batch_size
    for x, y in ds.val_batches(micro, tc.seq_len, max_batches=tc.eval_batches):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x.to(device), targets=y.to(device))
        total += float(loss) * y.numel()
        n += y.numel()
    model.train()
    return total / max(1, n)


def train(tc: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with the final validation loss and checkpoint path."""
    device = _device(tc)
    par = init_parallel(tc.expert_parallel, device)  # torchrun: process groups and the (dp, ep) mesh
    run_dir = Path(tc.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    amp = autocast_dtype(tc, device)

    start_step, ckpt = 0, None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise TrainingError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start_step = state["step"]

    model = build_model(tc, device)
    ds, tok_path = par.in_turn(lambda: prepare_data(tc, run_dir, model.config.vocab_size))
    if ckpt is not None:
        load_weights(model, checkpoint_files(ckpt))  # the whole model, before par.wrap shards the experts
    dropper = DeviceTokenDrop(model.config, tc.capacity_factor) if tc.capacity_factor else None
    for m in model.modules():
        if isinstance(m, MoE):
            m.token_drop = dropper
    net = par.wrap(model)  # what the training forward calls: DDP over experts sharded by parallel.py, or model
    opt = build_optimizer(model, tc)
    if ckpt is not None:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng.cpu"))
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors.pop("rng.cuda"))
        tensors.pop("rng.cuda", None)
        _load_optimizer(opt, par.local_optimizer_tensors(opt, tensors), state["optimizer"])
        if par.is_main:
            print(f"resumed from {ckpt} at step {start_step}", flush=True)
    if par.is_main:
        (run_dir / "train_config.json").write_text(json.dumps(tc.to_dict(), indent=1))

    local = tc.batch_size // par.world  # this rank's rows of the global batch
    micro = tc.micro_batch_size or local
    if tc.batch_size % (micro * par.world):
        raise TrainingError(f"batch_size {tc.batch_size} is not a multiple of micro_batch_size {micro}"
                            + (f" x {par.world} processes" if par.world > 1 else ""))
    accum = local // micro
    rows = slice(par.rank * local, (par.rank + 1) * local)

    metrics_path = run_dir / "metrics.jsonl"
    if par.is_main:
        _truncate_metrics(metrics_path, start_step)
    metrics = (metrics_path if par.is_main else Path(os.devnull)).open("a")  # rank 0 logs global values
    model.train()
    bad_in_a_row, last_val, last_ckpt = 0, None, ckpt
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (tc.progress and par.is_main), desc="train",
               unit="step")
    for step in range(start_step, tc.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        x_all, y_all = ds.batch_for_step(step, tc.batch_size, tc.seq_len, seed=tc.seed, rank=par.rank,
                                         world=par.world)
        protect_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        protect_all = choose_protected(tc.batch_size, tc.protect_fraction, generator=protect_gen)[rows]
        par.comm.reset()
        stats, lm_sum, aux_sum = MoEStats(), 0.0, 0.0
        if dropper:
            dropper.dropped = dropper.assignments = 0
        for i in range(accum):
            x = x_all[i * micro:(i + 1) * micro].to(device)
            y = y_all[i * micro:(i + 1) * micro].to(device)
            if dropper:
                dropper.protect = protect_all[i * micro:(i + 1) * micro].to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                lm, routings = net(x, targets=y, return_routing=True)  # fused with the LM head (lm_loss.py)
            layer_losses = [balance_losses(r.scores_TE.view(micro, tc.seq_len, -1),
                                           r.experts_TK.view(micro, tc.seq_len, -1), model.config)
                            for r in routings]
            aux = sum((d["total"] for d in layer_losses), torch.zeros((), device=device))
            ((lm + aux) / accum).backward()
            lm_sum += float(lm.detach()) / accum
            aux_sum += float(aux.detach()) / accum
            stats.add(layer_losses, routings)

        lm_sum, aux_sum = par.mean([lm_sum, aux_sum])
        stats.all_reduce(par)
        n_dropped, n_assigned = par.sum(torch.tensor([dropper.dropped, dropper.assignments] if dropper else [0, 0],
                                                     dtype=torch.float64)).tolist()
        grad_norm = par.clip_grad_norm_(model, tc.grad_clip)
        record: dict[str, Any] = {"step": step + 1}
        if not (math.isfinite(lm_sum) and math.isfinite(aux_sum) and torch.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            bad_in_a_row += 1
            record.update(skipped=True, loss=lm_sum if math.isfinite(lm_sum) else None)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            tqdm.write(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row > tc.max_bad_steps:
                raise TrainingError(f"{bad_in_a_row} non-finite steps in a row; stopping. Last good checkpoint: "
                                    f"{last_ckpt or 'none'}")
            continue
        bad_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        record.update(loss=lm_sum, aux_loss=aux_sum, lr=lr, grad_norm=float(grad_norm),
                      tokens_per_s=tc.batch_size * tc.seq_len / dt,
                      dropped_fraction=n_dropped / max(1, n_assigned), **par.comm_metrics(),
                      moe_layers=[i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)],
                      **stats.summary())
        done = step + 1
        if done % tc.eval_every == 0 or done == tc.max_steps:
            last_val = evaluate(model, ds, tc, device, amp)
            record["val_loss"] = last_val
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if done % tc.save_every == 0 or done == tc.max_steps:
            last_ckpt = save_checkpoint(run_dir, done, model, opt, tc, tok_path, tc.keep_last, par)
        bar.update(1)
        bar.set_postfix(loss=f"{lm_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
    bar.close()
    metrics.close()
    par.close()
    return {"val_loss": last_val, "checkpoint": str(last_ckpt) if last_ckpt else None, "steps": tc.max_steps,
            "unigram_entropy": data_mod.unigram_entropy(ds.val), "tokenizer": str(tok_path), "rank": par.rank}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines after the checkpoint's step (they will be produced again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a crash
    path.write_text("".join(line + "\n" for line in keep))
