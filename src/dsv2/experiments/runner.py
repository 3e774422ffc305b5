"""The runs of a suite: one ordinary run directory of dsv2.training per (variant, seed), then the measurements the
suite adds, then the report.

    OUT/ablate.json                    the budget and data every run of OUT uses (a rerun with others is refused)
    OUT/tokenizer/tokenizer.json       one BPE tokenizer for every run (trained once on the same text)
    OUT/SUITE/VARIANT/seedS/           a run directory: `dsv2 train --out ... --resume` continues it
    OUT/SUITE/VARIANT/seedS/ablate.json   what this module measured there (wall time, decode, traffic)
    OUT/SUITE/configs/VARIANT-seedS.yaml  the run's settings: `dsv2 train --config` of it is the same run
    OUT/SUITE/report.md, report.json, *.png   report.py, from the run directories alone

Every variant of a seed trains on the same data, tokenizer, batches and token budget; a seed changes the model's
initialisation, the batch order and the validation split together, and the same seeds serve every variant, so a
suite's comparisons are paired by seed. A rerun of the same command resumes: finished runs are kept, an interrupted
one continues from its last checkpoint, one that stopped before its first checkpoint starts again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import from_pretrained
from ..cpu.ops import native_bf16
from ..files import atomic_write
from ..inference.generate import stream_generate
from ..presets import get_config
from ..tools.routing_sim import checkpoint_scores, simulate
from ..training import data as data_mod
from ..training.config import LAUNCH, TrainConfig, absolute_paths
from ..training.run_dir import RunDir
from ..training.setup import device_for
from ..training.trainer import train
from ..training.upcycle import upcycle_checkpoint
from . import report
from .suites import DEFAULT_BUDGET, FLAG_FIELDS, PRESET, QUICK_BUDGET, SUITES, VAL_FRACTION, Budget, Suite, Variant

DECODE_ROUNDS = 3


class Interrupted(Exception):
    """A run stopped on a signal, with a checkpoint; the same command resumes."""


@dataclass(frozen=True)
class Run:
    suite: str
    variant: Variant
    seed: int
    path: Path
    tc: TrainConfig
    base: Path | None = None
    """The final checkpoint of the base variant this one starts from (Variant.start), if any."""

    @property
    def config_file(self) -> Path:
        return self.path.parent.parent / "configs" / f"{self.variant.name}-seed{self.seed}.yaml"

    @property
    def model_file(self) -> Path:
        """The variant's model config (config.json form), what `dsv2 upcycle --config` takes."""
        return self.config_file.parent / f"{self.variant.name}.model.json"

    @property
    def init_dir(self) -> Path:
        """Where an upcycled start is written: a checkpoint in the Hugging Face layout, not a run directory."""
        return self.path.parent.parent / "init" / f"{self.variant.name}-seed{self.seed}"

    @property
    def finished(self) -> bool:
        run = RunDir(self.path)
        ckpts = run.checkpoints()
        return bool(ckpts) and ckpts[-1] == run.checkpoint_path(self.tc.max_steps)


def plan(suite: Suite, budget: Budget, seeds: int, out: Path, data: list[str], tokenizer: Path,
         device: str = "auto", progress: bool = True) -> list[Run]:
    """The suite's runs, seed by seed, base variants before the variants that start from them."""
    runs = []
    for seed in range(seeds):
        for v in sorted(suite.variants, key=lambda v: v.start is not None):
            path = out / suite.name / v.name / f"seed{seed}"
            base = RunDir(out / suite.name / v.start[1] / f"seed{seed}").checkpoint_path(budget.steps) if v.start \
                else None
            tc = absolute_paths(TrainConfig(
                preset=PRESET, model={} if v.start else dict(v.model), data=list(data), max_bytes=budget.max_bytes,
                tokenizer=str(tokenizer), val_fraction=VAL_FRACTION, out=str(path), max_steps=budget.steps,
                batch_size=budget.batch_size, seq_len=budget.seq_len, warmup_steps=budget.warmup_steps,
                eval_every=budget.eval_every, eval_batches=budget.eval_batches, save_every=budget.save_every,
                keep_last=1, seed=seed, device=device, progress=progress, **v.train))
            run = Run(suite.name, v, seed, path, tc, base)
            if v.start:
                init_from = run.init_dir if v.start[0] == "upcycle" else base
                run = dataclasses.replace(run, tc=dataclasses.replace(tc, init_from=str(init_from)))
            runs.append(run)
    return runs


def run_suite(name: str, out: str | Path, *, quick: bool = False, seeds: int = 2, budget: Budget | None = None,
              data: list[str] | None = None, device: str = "auto", progress: bool = True,
              say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, Path]:
    """Train (or resume) every run of suite `name` under `out`, measure, and write the report; returns its paths."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    budget = budget or (QUICK_BUDGET if quick else DEFAULT_BUDGET)
    suite, shown_out, out = SUITES[name], str(out), Path(os.path.abspath(out))
    data = absolute_paths(TrainConfig(data=data or [data_mod.STDLIB_SOURCE])).data
    tokenizer = prepare(out, budget, data, say)
    runs = plan(suite, budget, seeds, out, data, tokenizer, device, progress)
    started = time.perf_counter()
    for i, r in enumerate(runs, 1):
        if r.finished:
            continue
        say(f"[{suite.name} {i}/{len(runs)}] {r.variant.name}, seed {r.seed}: {r.path}")
        train_run(r)
    measure(suite, runs, budget, say)
    say(f"{suite.name}: {len(runs)} runs ready ({time.perf_counter() - started:.0f} s in this invocation)")
    return report.write(suite, runs, out / suite.name, command(name, quick, seeds, budget, shown_out, data))


def command(name: str, quick: bool, seeds: int, budget: Budget, out: str, data: list[str]) -> str:
    """The `dsv2 ablate` command line that makes this suite's runs (and resumes them)."""
    base = QUICK_BUDGET if quick else DEFAULT_BUDGET
    flags = [x for k in FLAG_FIELDS if getattr(budget, k) != getattr(base, k)
             for x in (f"--{k.replace('_', '-')}", str(getattr(budget, k)))]
    data_flags = ["--data", *data] if data != [data_mod.STDLIB_SOURCE] else []
    return shlex.join(["dsv2", "ablate", name, *(["--quick"] if quick else []), "--seeds", str(seeds), *flags,
                       "--out", out, *data_flags])


def prepare(out: Path, budget: Budget, data: list[str], say: Callable[[str], None]) -> Path:
    """The shared tokenizer, and OUT/ablate.json: the budget and data of OUT's runs (another is refused: its runs
    would resume the stored ones with other settings)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    settings = {"budget": dataclasses.asdict(budget), "data": data, "preset": PRESET}

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        return {**d.get("budget", {}), "data": d.get("data"), "preset": d.get("preset")}

    record = out / report.MEASURES_FILE
    if record.exists():
        stored = flat(json.loads(record.read_text(encoding="utf-8")))
        diff = [f"{k} {stored.get(k)} (here: {v})" for k, v in flat(settings).items() if stored.get(k) != v]
        if diff:
            raise ValueError(f"{out} holds ablations made with {', '.join(diff)}; rerun them with their own "
                             "flags to resume, or use another --out")
    tok_dir = out / "tokenizer"
    tok_file = tok_dir / data_mod.TOKENIZER_FILE
    if not tok_file.exists():
        vocab = get_config(PRESET).vocab_size
        say(f"training the shared BPE tokenizer (vocab {vocab}) on {', '.join(data)}")
        tok = data_mod.train_tokenizer(data_mod.iter_documents(data, max_bytes=budget.max_bytes), vocab)
        data_mod.save_tokenizer(tok, tok_dir)
    atomic_write(record, json.dumps(settings, indent=1) + "\n")
    return tok_file


def train_run(r: Run) -> None:
    """Start, resume or restart one run; a base checkpoint is upcycled first where the variant says so."""
    t0 = time.perf_counter()
    if r.variant.start and r.variant.start[0] == "upcycle" and not r.init_dir.exists():
        tmp = r.init_dir.with_name(r.init_dir.name + ".tmp")
        if tmp.exists():  # an upcycling interrupted midway
            shutil.rmtree(tmp)
        r.model_file.parent.mkdir(parents=True, exist_ok=True)
        get_config(PRESET, **r.variant.model).save(r.model_file)
        upcycle_checkpoint(r.base, r.model_file, tmp, seed=r.seed)
        tmp.rename(r.init_dir)
    stored = {k: v for k, v in json.loads(json.dumps(r.tc.to_dict())).items() if k not in LAUNCH}
    r.config_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(r.config_file, yaml.safe_dump(stored, sort_keys=False))
    run = RunDir(r.path)
    resume, overwrite = bool(run.checkpoints()), run.holds_run() and not run.checkpoints()
    summary = train(r.tc, resume=resume, overwrite=overwrite)
    add_wall_time(r.path, time.perf_counter() - t0)
    stop = summary.get("interrupted") or summary.get("stop_requested")
    if stop:
        where = f"stopped at step {summary['steps']} of {r.tc.max_steps}" if summary.get("interrupted") else \
            "finished as the signal came"
        raise Interrupted(f"{stop}: {r.path} {where}, with a checkpoint")


def add_measures(path: Path, **values: Any) -> None:
    atomic_write(path / report.MEASURES_FILE, json.dumps({**report.read_measures(path), **values}, indent=1) + "\n")


def add_wall_time(path: Path, seconds: float) -> None:
    """The run's wall time, summed over the invocations and measurements that worked on it."""
    add_measures(path, wall_s=report.read_measures(path).get("wall_s", 0.0) + seconds)


def final_checkpoint(r: Run) -> Path:
    return RunDir(r.path).checkpoints()[-1]


def measure(suite: Suite, runs: list[Run], budget: Budget, say: Callable[[str], None]) -> None:
    """What the runs' metrics do not hold: decode ms/token (attention), cross-device traffic (routing); the time
    each took is added to the run's wall time."""
    if "decode_ms" in suite.columns:
        todo = [r for r in runs if r.seed == 0 and "decode_ms" not in report.read_measures(r.path)]
        if todo:
            say(f"measuring decode ms/token at context {budget.decode_context} ({len(todo)} models, "
                f"{DECODE_ROUNDS} interleaved rounds)")
            t0 = time.perf_counter()
            times = decode_ms(todo, budget)
            share = (time.perf_counter() - t0) / len(todo)
            for r, ms in zip(todo, times, strict=True):
                add_measures(r.path, decode_ms=ms, decode_context=budget.decode_context,
                             decode_dtype="bf16" if native_bf16() else "fp32")
                add_wall_time(r.path, share)
    if "off_device_copies" in suite.columns:
        for r in runs:
            if "off_device_copies" not in report.read_measures(r.path):
                say(f"counting the cross-device traffic of {r.path}")
                t0 = time.perf_counter()
                add_measures(r.path, **traffic(r, budget))
                add_wall_time(r.path, time.perf_counter() - t0)


def decode_ms(runs: list[Run], budget: Budget) -> list[float]:
    """Batch-1 greedy decode ms/token after a prompt of decode_context - decode_tokens tokens, each model's median
    over rounds that interleave the models (so a drifting host slows every model alike)."""
    dtype = torch.bfloat16 if native_bf16() else torch.float32
    models = [from_pretrained(final_checkpoint(r), dtype=dtype, device=device_for(r.tc)).eval() for r in runs]
    prompt_len = budget.decode_context - budget.decode_tokens
    prompt = torch.randint(2, models[0].config.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    rounds: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for _ in range(DECODE_ROUNDS):
            for i, model in enumerate(models):
                stamps = []
                for _step in stream_generate(model, [prompt], budget.decode_tokens, eos_token_id=[]):
                    stamps.append(time.perf_counter())  # each step's token is on the host: the step has ended
                steady = stamps[len(stamps) // 4:]  # after the prefill and the first steps' warm-up
                rounds[i].append(1000 * (steady[-1] - steady[0]) / max(1, len(steady) - 1))
    return [statistics.median(t) for t in rounds]


def traffic(r: Run, budget: Budget) -> dict[str, float]:
    """The trained router's choices on text, counted as `dsv2 routing-sim --checkpoint` counts them, at the run's
    own M: off-device copies and devices per token (a token lives on device t mod D)."""
    scores, cfg = checkpoint_scores(final_checkpoint(r), r.tc.data, budget.traffic_tokens, seq_len=r.tc.seq_len)
    row = simulate(scores, cfg.n_group, cfg.num_experts_per_tok)[cfg.topk_group - 1]
    return {"off_device_copies": row["off_device_copies_per_token"], "devices_per_token": row["devices_per_token"],
            "traffic_token_layers": scores.shape[0]}
