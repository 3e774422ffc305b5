"""Training and fine-tuning with DeepSeek-V2's recipe: `train()` and the loop it runs.

    data -> forward (autocast) -> LM loss + balance losses -> backward (accumulate) -> clip -> AdamW step
         -> log -> eval -> checkpoint

Recipe (DeepSeek-V2 Sec. 3.2.1 and 2.2.3-2.2.4): AdamW (0.9, 0.95), weight decay 0.1 on matrices only, linear
warm-up then the LR multiplied by 0.316 at 60% and 90% of the run (cosine as an option), gradient clipping 1.0;
expert-, device- and communication-level balance losses per sequence; device-level token dropping with capacity
factor 1.0 during training, with ~10% of sequences never dropped.

Determinism: the batch of step k is a pure function of (seed, k) (data/token_files.py), the protected sequences
of step k are drawn from a generator seeded with (seed, k), the LR is a pure function of k, and MKL's GEMMs are
bitwise reproducible across processes (dsv2/reproducibility.py). A checkpoint therefore only needs model,
optimizer, step and RNG states to continue exactly as a straight run (state.py; tests/test_train.py proves it).

The run directory's rules (a new run never overwrites one, one trainer per directory, a resumed run keeps its
settings and data) are run_dir.py's; SIGINT/SIGTERM stop the loop at a step boundary with a checkpoint (stop.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..cpu import optimize
from ..distributed.fsdp import apply_activation_checkpointing, materialize
from ..distributed.parallel import Parallel, init_parallel
from ..model import DeepseekV2
from ..model.moe import TokenDropPolicy
from ..reproducibility import MKL_CBWR, deterministic_algorithms, mkl_reproducible
from . import data as data_mod
from .balance import MoEStats, balance_losses
from .config import TrainConfig, TrainingError, absolute_paths
from .run_dir import RunDir
from .schedule import autocast_dtype, build_optimizer, lr_at
from .setup import batch_split, build_model, check_resume, data_fingerprint, device_for, initial_weights, prepare_data
from .state import load_resume_point, save_checkpoint
from .stop import GracefulStop
from .token_drop import PROTECT_SEED_STRIDE, DeviceTokenDrop, choose_protected

__all__ = ["Session", "evaluate", "train", "train_step"]


def train(tc: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run, resume or (overwrite=True) restart a run; returns a summary: the final validation loss and
    checkpoint, or why it stopped early ("interrupted": the signal's name; "finished_already": True).
    "stop_requested" names a signal that came during the last step, after which the run finished anyway."""
    tc = absolute_paths(tc)  # the run resumes from any working directory
    device = device_for(tc)
    par = init_parallel(tc.expert_parallel, device, tc.fsdp, tc.dp_replicate, tc.dp_shard,  # torchrun: groups
                        tc.cpu_offload)  # and meshes
    run = RunDir(tc.out)
    try:
        with par.together():
            if par.is_main:
                run.open(resume=resume, overwrite=overwrite)  # the lock, and the rules of run_dir.py
        s = Session.start(tc, run, par, device, resume, overwrite)
        if isinstance(s, dict):  # a resumed run that had already finished
            return s
        with s.log, GracefulStop() as stop, deterministic_algorithms(tc.deterministic):
            if tc.init_from and s.start_step == 0:  # fine-tuning: what the run starts from, to compare against
                s.base_val = evaluate(s.model, s.ds, tc, device, s.amp)
            for step in range(s.start_step, tc.max_steps):
                record = train_step(s, step)  # data -> forward -> losses -> backward -> clip -> AdamW step
                done = step + 1
                s.count_bad_steps(record)  # a non-finite step was skipped; too many in a row stop the run
                if done == tc.max_steps or (done % tc.eval_every == 0 and not record.get("skipped")):
                    record["val_loss"] = s.last_val = evaluate(s.model, s.ds, tc, device, s.amp)
                s.log.write(record)
                if done == tc.max_steps or (done % tc.save_every == 0 and not record.get("skipped")):
                    s.save(done)
                if par.any(stop.signal is not None) and done < tc.max_steps:  # all ranks stop after one step
                    s.save(done)
                    return s.summary(interrupted=signal.Signals(stop.signal).name if stop.signal is not None
                                     else "a stop on another rank")
            if stop.signal is not None:  # during the last step: the run is whole, but a caller may stop too
                return {**s.summary(), "stop_requested": signal.Signals(stop.signal).name}
        return s.summary()
    finally:
        run.release()
        par.close()


@dataclass
class Session:
    """A started run: what the loop of train() works with."""

    tc: TrainConfig
    run: RunDir
    par: Parallel
    device: torch.device
    amp: torch.dtype | None
    micro: int
    accum: int
    model: DeepseekV2
    net: torch.nn.Module
    """What the training forward calls: DDP over experts sharded by distributed/, or the model itself."""
    opt: torch.optim.Optimizer
    ds: data_mod.TokenDataset
    tokenizer: Path
    dropper: DeviceTokenDrop | None
    """The trainer's token-dropping policy: train_step sets its protect mask and reads its counters (None: none)."""
    token_drop: TokenDropPolicy | None
    """What the training forward drops with: the dropper, or expert parallelism's wrapping of it."""
    fingerprint: dict[str, Any]
    start_step: int
    log: MetricsLog
    last_ckpt: Path | None = None
    saved_at: int = 0
    last_val: float | None = None
    base_val: float | None = None
    """A fine-tuning run's validation loss before its first step (init_from's own)."""
    bad_in_a_row: int = 0

    @classmethod
    def start(cls, tc: TrainConfig, run: RunDir, par: Parallel, device: torch.device, resume: bool,
              overwrite: bool) -> Session | dict[str, Any]:
        """Check everything that can be checked, then (and only then) replace an --overwrite'n run, prepare the
        data, build or restore model and optimizer. A resumed run that is already finished: its summary."""
        say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if par.is_main else (lambda msg: None)
        _warn_if_irreproducible(say)
        micro, accum = batch_split(tc, par)
        fingerprint = data_fingerprint(tc)
        point = par.in_turn(lambda: load_resume_point(run, device, say, set_aside=par.is_main)) if resume else None
        if point is not None:
            check_resume(point, tc, run, fingerprint, say)
            if point.step >= tc.max_steps:
                return {"finished_already": True, "steps": point.step, "checkpoint": str(point.path),
                        "rank": par.rank}
        model = point.model if point is not None else build_model(tc, device, meta=par.fsdp_mesh is not None)
        meta = any(p.is_meta for p in model.parameters())  # sharded first, then given memory (fsdp.materialize)
        if meta and par.fsdp_mesh is None and par.world > 1:
            raise TrainingError(f"{point.path} is a sharded checkpoint: resume it with --fsdp (on any number of "
                                "ranks), or in one process, or export it (dsv2 export) and --init-from that")
        if tc.seq_len > model.config.max_position_embeddings:
            raise TrainingError(f"seq_len {tc.seq_len} is longer than the model's context (max_position_embeddings="
                                f"{model.config.max_position_embeddings})")
        with par.together():  # every check above passed: only now may --overwrite remove the old run
            if par.is_main:
                if overwrite:
                    run.refuse_reading_from([Path(p) for p in (tc.init_from, tc.tokenizer) if p],
                                            "--init-from/--tokenizer")
                    run.refuse_reading_from(data_mod.resolve_sources(tc.data), "data")
                    run.clear()
                run.write_settings(tc)  # before the data: a run stopped while tokenizing is a run
        ds, tokenizer = par.in_turn(lambda: prepare_data(tc, run, model.config.vocab_size,
                                                         point.tokenizer if point is not None else None))
        dropper = DeviceTokenDrop(model.config, tc.capacity_factor) if tc.capacity_factor else None
        if tc.activation_checkpointing:
            apply_activation_checkpointing(model)
        net = par.wrap(model, autocast_dtype(tc, device))  # FSDP2 gathers weights in the dtype autocast computes in
        if meta:
            fresh = initial_weights(tc, model.config) if point is None else None  # a checkpoint: DCP fills it
            materialize(model, par.shard_device(device), fresh)
            if device.type == "cpu":
                optimize(model)  # the CPU kernels, now that the weights are on the CPU
        token_drop = par.token_drop(dropper, model.config)
        opt = build_optimizer(model, tc)
        start_step, last_ckpt = 0, None
        if point is not None:
            point.restore(opt, par)
            start_step, last_ckpt = point.step, point.path
            say(f"resumed from {point.path} at step {start_step}")
        with par.together():
            if par.is_main:
                run.truncate_metrics(start_step)
        log = MetricsLog(run, par, tc, start_step)
        return cls(tc, run, par, device, autocast_dtype(tc, device), micro, accum, model.train(), net, opt, ds,
                   tokenizer, dropper, token_drop, fingerprint, start_step, log, last_ckpt, saved_at=start_step)

    def count_bad_steps(self, record: dict[str, Any]) -> None:
        if not record.get("skipped"):
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        tqdm.write(f"step {record['step']}: non-finite loss or gradient, step skipped ({self.bad_in_a_row} in a row)")
        if self.bad_in_a_row > self.tc.max_bad_steps:
            self.log.write(record)
            raise TrainingError(f"{self.bad_in_a_row} non-finite steps in a row; stopping. Last good checkpoint: "
                                f"{self.last_ckpt or 'none'}")

    def save(self, step: int) -> None:
        if self.saved_at != step:
            self.last_ckpt = save_checkpoint(self.run, step, self.model, self.opt, self.tc, self.tokenizer,
                                             self.fingerprint, self.par)
            self.saved_at = step

    def summary(self, interrupted: str | None = None) -> dict[str, Any]:
        out = {"val_loss": self.last_val, "base_val_loss": self.base_val,
               "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
               "steps": self.saved_at, "tokenizer": str(self.tokenizer), "rank": self.par.rank,
               "out": str(self.run.path)}
        if interrupted:
            return {**out, "interrupted": interrupted}
        return {**out, "unigram_entropy": data_mod.unigram_entropy(self.ds.val)}


class MetricsLog:
    """metrics.jsonl (rank 0 logs the global values) and the progress bar; a context manager that closes both."""

    def __init__(self, run: RunDir, par: Parallel, tc: TrainConfig, start_step: int):
        self.par = par
        self.val: float | None = None
        self.file = (run.metrics_path if par.is_main else Path(os.devnull)).open("a")
        self.bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (tc.progress and par.is_main),
                        desc="train", unit="step")

    def write(self, record: dict[str, Any]) -> None:
        with self.par.together():  # a full disk on rank 0 stops every rank
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.update(1)
        self.val = record.get("val_loss", self.val)  # the last validation loss stays on the bar
        self.bar.set_postfix(loss=f"{record['loss']:.3f}" if record.get("loss") is not None else "nan",
                             lr=f"{record['lr']:.2e}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                             **({"val": f"{self.val:.3f}"} if self.val is not None else {}))

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
        self.file.close()


def _warn_if_irreproducible(say) -> None:
    if mkl_reproducible() is False:
        why = (f"MKL_CBWR={os.environ['MKL_CBWR']} is not a strict mode" if os.environ.get("MKL_CBWR") != MKL_CBWR
               else "MKL ran before dsv2 was imported")
        say(f"warning: {why}, so MKL's GEMMs are not reproducible across processes and a resumed run may differ "
            f"in the last digits; set MKL_CBWR={MKL_CBWR} before the first GEMM to make resume exact")


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
        counted = int((y != data_mod.IGNORE_INDEX).sum())  # instruction data: the answer tokens only
        total += float(loss) * counted if counted else 0.0
        n += counted
    model.train()
    return total / max(1, n)


def train_step(s: Session, step: int) -> dict[str, Any]:
    """One optimizer step over the global batch of `step` (this rank's rows of it, in micro-batches): the metrics
    record of the step, with skipped=True (and no update) if the loss or the gradient is not finite."""
    tc, par, model, opt, dropper, device, amp, micro = s.tc, s.par, s.model, s.opt, s.dropper, s.device, s.amp, s.micro
    t0 = time.perf_counter()
    lr = lr_at(step, tc)
    for group in opt.param_groups:
        group["lr"] = lr
    x_all, y_all = s.ds.batch_for_step(step, tc.batch_size, tc.seq_len, seed=tc.seed, rank=par.rank, world=par.world)
    local = tc.batch_size // par.world
    protect_gen = torch.Generator().manual_seed(tc.seed * PROTECT_SEED_STRIDE + step)
    protect_all = choose_protected(tc.batch_size, tc.protect_fraction, generator=protect_gen)[
        par.rank * local:(par.rank + 1) * local]
    par.comm.reset()
    stats, lm_sum, aux_sum = MoEStats(), 0.0, 0.0
    if dropper:
        dropper.dropped = dropper.assignments = 0
    for i in range(s.accum):
        rows = slice(i * micro, (i + 1) * micro)
        x, y = x_all[rows].to(device), y_all[rows].to(device)
        if dropper:
            dropper.protect = protect_all[rows].to(device)
        with par.micro_batch(s.net, last=i == s.accum - 1):  # gradients are synced in the last one only
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                lm, routings = s.net(x, targets=y, return_routing=True,  # fused with the LM head (lm_loss.py)
                                     token_drop=s.token_drop)
            layer_losses = [balance_losses(r.scores_TE.view(micro, tc.seq_len, -1),
                                           r.experts_TK.view(micro, tc.seq_len, -1), model.config) for r in routings]
            aux = sum((d["total"] for d in layer_losses), torch.zeros((), device=device))
            ((lm + aux) / s.accum).backward()
        lm_sum += float(lm.detach()) / s.accum
        aux_sum += float(aux.detach()) / s.accum
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
