"""Training and fine-tuning with DeepSeek-V2's recipe, the whole loop in one place.

    data -> forward (autocast) -> LM loss + balance losses -> backward (accumulate) -> clip -> AdamW step
         -> log -> eval -> checkpoint

Recipe (DeepSeek-V2 Sec. 3.2.1 and 2.2.3-2.2.4): AdamW (0.9, 0.95), weight decay 0.1 on matrices only, linear
warm-up then the LR multiplied by 0.316 at 60% and 90% of the run (cosine as an option), gradient clipping 1.0;
expert-, device- and communication-level balance losses per sequence; device-level token dropping with capacity
factor 1.0 during training, with ~10% of sequences never dropped.

Determinism: the batch of step k is a pure function of (seed, k) (data.py), the protected sequences of step k are
drawn from a generator seeded with (seed, k), the LR is a pure function of k, and MKL's GEMMs are bitwise
reproducible across processes (reproducibility.py). A checkpoint therefore only needs model, optimizer, step and
RNG states to continue exactly as a straight run (train_state.py; tests/test_train.py proves it).

The run directory's rules (a new run never overwrites one, one trainer per directory, a resumed run keeps its
settings and data) are run_dir.py's; SIGINT/SIGTERM stop the loop at a step boundary with a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint import from_pretrained
from ..cpu import optimize
from ..distributed.parallel import Parallel, init_parallel
from ..files import atomic_write
from ..model import DeepseekV2
from ..model.moe import MoE
from ..presets import get_config
from ..reproducibility import MKL_CBWR, mkl_reproducible
from . import data as data_mod
from .balance import MoEStats, balance_losses
from .config import TrainConfig, TrainingError, absolute_paths, refuse_changes
from .run_dir import RunDir
from .schedule import autocast_dtype, build_optimizer, lr_at
from .state import ResumePoint, load_resume_point, save_checkpoint
from .token_drop import PROTECT_SEED_STRIDE, DeviceTokenDrop, choose_protected

__all__ = ["evaluate", "latest_checkpoint", "prepare_data", "train", "train_step"]


# ------------------------------------------------------------------------------------------------------------
# the pieces train() calls
def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = RunDir(run_dir).checkpoints()
    return ckpts[-1] if ckpts else None


def _device(tc: TrainConfig) -> torch.device:
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
    record = run.tokenizer_dir / "sources.json"
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


def build_model(tc: TrainConfig, device: torch.device) -> DeepseekV2:
    """The model to train (fp32 master weights) with the CPU fast paths on (dsv2.cpu.optimize: on the CPU, SDPA's
    flash kernel for MLA, fp32 GEMMs where bf16 is emulated; they step aside under autograd where they must)."""
    if tc.init_from:
        if tc.model:
            raise TrainingError("model overrides cannot change a checkpoint given with init_from")
        return from_pretrained(tc.init_from, dtype=torch.float32, device=device).train()
    torch.manual_seed(tc.seed)
    return optimize(DeepseekV2(get_config(tc.preset, **tc.model)).to(device))


def _batch_split(tc: TrainConfig, par: Parallel) -> tuple[int, int]:
    """(micro-batch, accumulation steps) of this rank."""
    if tc.batch_size % par.world:
        raise TrainingError(f"batch_size {tc.batch_size} cannot be split over {par.world} processes")
    local = tc.batch_size // par.world
    micro = tc.micro_batch_size or local
    if local % micro:
        raise TrainingError(f"batch_size {tc.batch_size} is not a multiple of micro_batch_size {micro}"
                            + (f" x {par.world} processes" if par.world > 1 else ""))
    return micro, local // micro


def _check_resume(point: ResumePoint, tc: TrainConfig, run: RunDir, fingerprint: dict[str, Any], say) -> None:
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


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM while training: finish the step, write a checkpoint, stop. A second signal
    stops at once (KeyboardInterrupt): the checkpoints written so far stay whole (train_state.py)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                   "(again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def train(tc: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run, resume or (overwrite=True) restart a run; returns a summary: the final validation loss and
    checkpoint, or why it stopped early ("interrupted": the signal's name; "finished_already": True)."""
    tc = absolute_paths(tc)  # the run resumes from any working directory
    device = _device(tc)
    par = init_parallel(tc.expert_parallel, device)  # torchrun: process groups and the (dp, ep) mesh
    run = RunDir(tc.out)
    try:
        with par.together():
            if par.is_main:
                run.open(resume=resume, overwrite=overwrite)  # the lock, and the rules of run_dir.py
        return _train(tc, run, par, device, resume, overwrite)
    finally:
        run.release()
        par.close()


def _train(tc: TrainConfig, run: RunDir, par: Parallel, device: torch.device, resume: bool,
           overwrite: bool) -> dict[str, Any]:
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if par.is_main else (lambda msg: None)
    if mkl_reproducible() is False:
        why = (f"MKL_CBWR={os.environ['MKL_CBWR']} is not a strict mode" if os.environ.get("MKL_CBWR") != MKL_CBWR
               else "MKL ran before dsv2 was imported")
        say(f"warning: {why}, so MKL's GEMMs are not reproducible across processes and a resumed run may differ "
            f"in the last digits; set MKL_CBWR={MKL_CBWR} before the first GEMM to make resume exact")
    amp = autocast_dtype(tc, device)
    micro, accum = _batch_split(tc, par)
    fingerprint = data_fingerprint(tc)

    point = par.in_turn(lambda: load_resume_point(run, device, say, set_aside=par.is_main)) if resume else None
    if point is not None:
        _check_resume(point, tc, run, fingerprint, say)
        if point.step >= tc.max_steps:
            return {"finished_already": True, "steps": point.step, "checkpoint": str(point.path), "rank": par.rank}
    model = point.model if point is not None else build_model(tc, device)
    if tc.seq_len > model.config.max_position_embeddings:
        raise TrainingError(f"seq_len {tc.seq_len} is longer than the model's context (max_position_embeddings="
                            f"{model.config.max_position_embeddings})")
    with par.together():  # every check above passed: only now may --overwrite remove the old run
        if par.is_main:
            if overwrite:
                run.refuse_reading_from([Path(p) for p in (tc.init_from, tc.tokenizer) if p], "--init-from/--tokenizer")
                run.refuse_reading_from(data_mod.resolve_sources(tc.data), "data")
                run.clear()
            run.write_settings(tc)  # before the data: a run stopped while tokenizing is a run (--overwrite, --resume)
    ds, tok_path = par.in_turn(lambda: prepare_data(tc, run, model.config.vocab_size,
                                                    point.tokenizer if point is not None else None))
    dropper = DeviceTokenDrop(model.config, tc.capacity_factor) if tc.capacity_factor else None
    for m in model.modules():
        if isinstance(m, MoE):
            m.token_drop = dropper
    net = par.wrap(model)  # what the training forward calls: DDP over experts sharded by parallel.py, or model
    opt = build_optimizer(model, tc)
    start_step, last_ckpt = 0, None
    if point is not None:
        point.restore(opt, par)
        start_step, last_ckpt = point.step, point.path
        say(f"resumed from {point.path} at step {start_step}")
        del point  # its model is `model`; drop the optimizer tensors it still holds
    with par.together():
        if par.is_main:
            run.truncate_metrics(start_step)
    metrics = (run.metrics_path if par.is_main else Path(os.devnull)).open("a")  # rank 0 logs global values

    model.train()
    bad_in_a_row, last_val, saved_at, stopped = 0, None, start_step, None
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (tc.progress and par.is_main), desc="train",
               unit="step")
    with metrics, bar, GracefulStop() as stop:
        for step in range(start_step, tc.max_steps):
            record = train_step(step, tc, ds, par, net, model, opt, dropper, device, amp, micro, accum)
            done = step + 1
            if record.get("skipped"):
                bad_in_a_row += 1
                tqdm.write(f"step {done}: non-finite loss or gradient, step skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row > tc.max_bad_steps:
                    metrics.write(json.dumps(record) + "\n")
                    raise TrainingError(f"{bad_in_a_row} non-finite steps in a row; stopping. Last good checkpoint: "
                                        f"{last_ckpt or 'none'}")
            else:
                bad_in_a_row = 0
            if done == tc.max_steps or (done % tc.eval_every == 0 and not record.get("skipped")):
                last_val = record["val_loss"] = evaluate(model, ds, tc, device, amp)
            with par.together():  # a full disk on rank 0 stops every rank
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if done == tc.max_steps or (done % tc.save_every == 0 and not record.get("skipped")):
                last_ckpt, saved_at = save_checkpoint(run, done, model, opt, tc, tok_path, fingerprint, par), done
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}" if record.get("loss") is not None else "nan",
                            lr=f"{record['lr']:.2e}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                            **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
            if par.any(stop.signal is not None) and done < tc.max_steps:  # every rank stops after the same step
                if saved_at != done:
                    last_ckpt, saved_at = save_checkpoint(run, done, model, opt, tc, tok_path, fingerprint, par), done
                stopped = signal.Signals(stop.signal).name if stop.signal is not None else "a stop on another rank"
                break
    summary = {"val_loss": last_val, "checkpoint": str(last_ckpt) if last_ckpt else None, "steps": saved_at,
               "tokenizer": str(tok_path), "rank": par.rank, "out": str(run.path)}
    if stopped:
        return {**summary, "interrupted": stopped}
    return {**summary, "unigram_entropy": data_mod.unigram_entropy(ds.val)}


def train_step(step: int, tc: TrainConfig, ds: data_mod.TokenDataset, par: Parallel, net: torch.nn.Module,
               model: DeepseekV2, opt: torch.optim.Optimizer, dropper: DeviceTokenDrop | None,
               device: torch.device, amp: torch.dtype | None, micro: int, accum: int) -> dict[str, Any]:
    """One optimizer step over the global batch of `step` (this rank's rows of it, in micro-batches): the metrics
    record of the step, with skipped=True (and no update) if the loss or the gradient is not finite."""
    t0 = time.perf_counter()
    lr = lr_at(step, tc)
    for group in opt.param_groups:
        group["lr"] = lr
    x_all, y_all = ds.batch_for_step(step, tc.batch_size, tc.seq_len, seed=tc.seed, rank=par.rank, world=par.world)
    local = tc.batch_size // par.world
    protect_gen = torch.Generator().manual_seed(tc.seed * PROTECT_SEED_STRIDE + step)
    protect_all = choose_protected(tc.batch_size, tc.protect_fraction, generator=protect_gen)[
        par.rank * local:(par.rank + 1) * local]
    par.comm.reset()
    stats, lm_sum, aux_sum = MoEStats(), 0.0, 0.0
    if dropper:
        dropper.dropped = dropper.assignments = 0
    for i in range(accum):
        rows = slice(i * micro, (i + 1) * micro)
        x, y = x_all[rows].to(device), y_all[rows].to(device)
        if dropper:
            dropper.protect = protect_all[rows].to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            lm, routings = net(x, targets=y, return_routing=True)  # fused with the LM head (lm_loss.py)
        layer_losses = [balance_losses(r.scores_TE.view(micro, tc.seq_len, -1),
                                       r.experts_TK.view(micro, tc.seq_len, -1), model.config) for r in routings]
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
    if not (math.isfinite(lm_sum) and math.isfinite(aux_sum) and torch.isfinite(grad_norm)):
        opt.zero_grad(set_to_none=True)
        return {"step": step + 1, "skipped": True, "loss": lm_sum if math.isfinite(lm_sum) else None, "lr": lr}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": lm_sum, "aux_loss": aux_sum, "lr": lr, "grad_norm": float(grad_norm),
            "tokens_per_s": tc.batch_size * tc.seq_len / (time.perf_counter() - t0),
            "dropped_fraction": n_dropped / max(1, n_assigned), **par.comm_metrics(),
            "moe_layers": [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)],
            **stats.summary()}
