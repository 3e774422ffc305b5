"""A suite's report, from its run directories alone: report.md (tables, verdicts, commands, compute), report.json
(every number) and PNG plots.

What is read: each run's metrics.jsonl (validation losses, expert loads, dropped fractions), its final checkpoint's
config.json (parameters, activated parameters and KV bytes per token, as `dsv2 info` counts them) and the
ablate.json the runner wrote there (wall time, decode ms/token, cross-device traffic).

Verdicts. A claim compares variant a with variant b on one metric, paired by seed: d_s = a_s - b_s, mean d. The
seed-to-seed spread is the residual standard deviation sigma of the metric after removing each variant's mean and
each seed's mean, pooled over the suite's variants whose metric varies at all (a variant that drops nothing has a
dropped fraction of exactly 0 and says nothing about noise): (V - 1)(S - 1) degrees of freedom, so two seeds of
five variants still give a usable estimate. A paired difference of S-seed means then has standard error
sigma * sqrt(2 / S); the band is that times Student's t at 97.5% for those degrees of freedom (a 95% interval).
"lower": reproduced when d < -band, contradicted when d > band, else within the seed-to-seed spread.
"not_higher" (an "about as good" claim): contradicted when d > band, reproduced when d < -band (a is better), and
within the seed-to-seed spread otherwise, which is what the claim expects but does not prove it. One seed gives no
spread, and no verdict.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..cpu.ops import cpu_name, native_bf16
from ..files import atomic_write
from ..tools.info import describe
from ..tools.plot import read_metrics
from ..training.run_dir import RunDir
from ..training.setup import device_for
from .suites import Claim, Suite

LATE = 0.2
"""Load and drop figures are means over the last 20% of steps (after the balance losses have acted)."""
COLUMNS = {  # measured column: (header, format)
    "kv_bytes": ("KV cache bytes/token (bf16)", "{:,.0f}"),
    "decode_ms": ("decode ms/token", "{:.2f}"),
    "off_device_copies": ("off-device copies/token", "{:.3f}"),
    "devices_per_token": ("devices/token", "{:.3f}"),
    "expert_load": ("expert load max/mean", "{:.2f}"),
    "device_load": ("device load max/mean", "{:.3f}"),
    "dropped": ("dropped fraction", "{:.4f}"),
}
METRIC_NAMES = {"val_loss": "validation loss", **{k: v[0] for k, v in COLUMNS.items()}}
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086)
"""Student's t quantile at 0.975 for 1..20 degrees of freedom (beyond: 1.96, within 5%)."""
MEASURES_FILE = "ablate.json"


def read_measures(path: Path) -> dict[str, Any]:
    """What the runner measured in a run directory (or in OUT: the suites' budget and data)."""
    f = path / MEASURES_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


def run_values(path: Path, tc: Any) -> dict[str, Any]:
    """Everything the report shows of one run, read from its directory."""
    m = read_metrics(RunDir(path).metrics_path)
    steps, val = m.series("val_loss")
    ckpt = RunDir(path).checkpoints()[-1]
    cfg = ModelConfig.from_json(ckpt / "config.json")
    info = describe(cfg)
    measures = read_measures(path)
    if not len(val):
        raise ValueError(f"{RunDir(path).metrics_path} holds no validation loss")
    late = [r for r in m.records if r["step"] > (1 - LATE) * m.records[-1]["step"] and not r.get("skipped")]
    out: dict[str, Any] = {
        "val_loss": float(val[-1]), "val_curve": [[int(s), float(v)] for s, v in zip(steps, val, strict=True)],
        "steps": int(m.records[-1]["step"]), "tokens": int(m.records[-1]["step"]) * tc.batch_size * tc.seq_len,
        "parameters": info["parameters"]["total"], "activated": info["activated"]["total"],
        "kv_bytes": info["kv_cache"]["config"]["bf16_bytes_per_token"], "checkpoint": str(ckpt), **measures}
    if cfg.num_routed and late:
        out["expert_load"] = statistics.fmean(statistics.fmean(r["expert_load_max_mean"]) for r in late
                                              if r.get("expert_load_max_mean"))
        out["dropped"] = statistics.fmean(r.get("dropped_fraction", 0.0) for r in late)
        first = late[0]["step"]
        loads = [np.asarray(load, dtype=float) for s, load in zip(m.load_steps, m.loads, strict=True) if s >= first]
        if loads:  # each layer's expert shares summed per device group: max over groups / mean (= 1 / D)
            groups = [ly.reshape(cfg.n_group, -1).sum(1) for load in loads for ly in load]
            out["device_load"] = float(np.mean([g.max() * cfg.n_group for g in groups]))
    return out


def seed_spread(values: dict[str, dict[int, float]]) -> tuple[float, int] | None:
    """(sigma, degrees of freedom): the residual std of a variant x seed table after removing variant and seed
    means, over the variants whose values vary (module docstring); None without two such variants and seeds."""
    varying = [v for v in values.values() if len(set(v.values())) > 1]
    seeds = sorted(set.intersection(*(set(v) for v in varying))) if varying else []
    if len(seeds) < 2 or len(varying) < 2:
        return None
    x = np.array([[v[s] for s in seeds] for v in varying])
    resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    dof = (x.shape[0] - 1) * (x.shape[1] - 1)
    return float(math.sqrt((resid**2).sum() / dof)), dof


def verdict(claim: Claim, values: dict[str, dict[int, float]], spread: tuple[float, int] | None) -> dict[str, Any]:
    a, b = values.get(claim.a, {}), values.get(claim.b, {})
    seeds = sorted(set(a) & set(b))
    d = statistics.fmean(a[s] - b[s] for s in seeds) if seeds else float("nan")
    out = {"claim": claim.text, "source": claim.source, "metric": claim.metric, "a": claim.a, "b": claim.b,
           "relation": claim.relation, "difference": d, "seeds": len(seeds)}
    if spread is None or len(seeds) < 2:
        return {**out, "band": None, "verdict": "no verdict: one seed has no spread to judge by"}
    band = band_of(spread, len(seeds))
    word = "contradicted" if d > band else "reproduced" if d < -band else "within the seed-to-seed spread"
    if word == "within the seed-to-seed spread" and claim.relation == "not_higher":
        word += ", as the claim expects"
    return {**out, "band": band, "dof": spread[1], "verdict": word}


def collect(suite: Suite, runs: list[Any]) -> dict[str, Any]:
    per_run = {(r.variant.name, r.seed): run_values(r.path, r.tc) for r in runs}
    metrics = {"val_loss", *(c.metric for c in suite.claims)}
    table = {m: {v.name: {s: x[m] for (n, s), x in per_run.items() if n == v.name and m in x}
                 for v in suite.variants} for m in metrics}
    claims = []
    for c in suite.claims:
        vals = {n: x for n, x in table[c.metric].items() if x}
        claims.append(verdict(c, vals, seed_spread(vals)))
    return {"runs": per_run, "claims": claims}


def machine(device: torch.device) -> str:
    """What the runs ran on: the GPU when they trained on one, and the CPU (the dtype auto picks on it) always."""
    dtype = "bf16 autocast (native bf16)" if native_bf16() else "fp32 (no native bf16)"
    gpu = f"{torch.cuda.get_device_name(device)} (bf16 autocast); host " if device.type == "cuda" else ""
    return (f"{gpu}{cpu_name()}, {os.cpu_count()} cores; {'' if gpu else dtype + '; '}torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _fmt(v: Any, spec: str) -> str:
    return spec.format(v) if isinstance(v, int | float) and math.isfinite(v) else "-"


def _variant_row(v: Any, xs: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    def mean(key: str) -> float | None:  # over the seeds that measured it (decode ms/token: the first seed's)
        have = [x[key] for x in xs if key in x]
        return statistics.fmean(have) if have else None

    seeds = " / ".join(f"{x['val_loss']:.4f}" for x in xs)
    cols = "".join(f" {_fmt(mean(c), COLUMNS[c][1])} |" for c in columns)
    return (f"| {v.label} (`{v.name}`) | {xs[0]['parameters'] / 1e6:.3f}M | {xs[0]['activated'] / 1e6:.3f}M | "
            f"{mean('val_loss'):.4f} | {seeds} |{cols}")


def markdown(suite: Suite, runs: list[Any], data: dict[str, Any], command: str) -> str:
    per_run, seeds = data["runs"], sorted({r.seed for r in runs})
    tc, columns = runs[0].tc, ("kv_bytes", *suite.columns)
    wall = sum(x.get("wall_s", 0.0) for x in per_run.values())
    lines = [f"# Ablation `{suite.name}`: {suite.title}", "", f"Command: `{command}`", "",
             f"Machine: {machine(device_for(tc))}.", "",
             f"Compute: {len(runs)} runs ({len(suite.variants)} variants x {len(seeds)} seeds), each {tc.max_steps} "
             f"steps of {tc.batch_size} x {tc.seq_len} tokens ({tc.max_steps * tc.batch_size * tc.seq_len:,} tokens); "
             f"{wall / 60:.1f} min of wall time in all (training, evaluation, data preparation, upcycling, "
             "measurements; the shared tokenizer aside).", "",
             "| variant | parameters | activated | validation loss | per seed |"
             + "".join(f" {COLUMNS[c][0]} |" for c in columns), "|---|---:|---:|---:|---:|"
             + "---:|" * len(columns)]
    for v in suite.variants:
        xs = [per_run[(v.name, s)] for s in seeds if (v.name, s) in per_run]
        if xs:
            lines.append(_variant_row(v, xs, columns))
    lines += ["", "| claim | source | metric | a - b (mean over seeds) | band (95%) | verdict |",
              "|---|---|---|---:|---:|---|"]
    for c in data["claims"]:
        band = "-" if c["band"] is None else f"{c['band']:.4f}"
        lines.append(f"| {c['claim']} (`{c['a']}` vs `{c['b']}`) | {c['source']} | {METRIC_NAMES[c['metric']]} | "
                     f"{c['difference']:+.4f} | {band} | **{c['verdict']}** |")
    lines += ["", "Validation loss: the mean next-token loss (nats/token) on the same held-out windows at the last "
              "step; loads and dropped fractions are means over the last 20% of steps. Verdicts: paired by seed, "
              "against a 95% band from the seed-to-seed spread of the whole suite (dsv2/experiments/report.py).", "",
              f"Each run is an ordinary run directory under `{runs[0].path.parent.parent}`; "
              f"`dsv2 train --config {runs[0].config_file.parent}/VARIANT-seedS.yaml` is the same run, "
              "and `--resume` on its `--out` continues it."]
    starts = [r for r in runs if r.variant.start and r.variant.start[0] == "upcycle"]
    if starts:
        r = starts[0]
        lines.append(f"An upcycled start is `dsv2 upcycle BASE_CHECKPOINT --config {r.model_file} "
                     f"{r.init_dir.parent}/{r.variant.name}-seedS`, BASE_CHECKPOINT being the final checkpoint of "
                     f"`{r.variant.start[1]}` of the same seed.")
    return "\n".join(lines) + "\n"


def band_of(spread: tuple[float, int] | None, n_seeds: int) -> float | None:
    """The 95% band of a paired difference of n_seeds-seed means (module docstring)."""
    if spread is None or n_seeds < 2:
        return None
    sigma, dof = spread
    return (T_975[dof - 1] if dof <= len(T_975) else 1.96) * sigma * math.sqrt(2 / n_seeds)


def plots(suite: Suite, runs: list[Any], data: dict[str, Any], out: Path) -> list[Path]:
    """Left: validation loss over training, mean over seeds. Right: each variant's final loss minus the reference
    variant's of the same seed (dots: seeds; bars: mean) against the suite's 95% band: what the verdicts judge."""
    from matplotlib.figure import Figure

    per_run, seeds = data["runs"], sorted({r.seed for r in runs})
    names = [v.name for v in suite.variants if all((v.name, s) in per_run for s in seeds)]
    ref = suite.reference
    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for i, n in enumerate(names):
        curves = [np.asarray(per_run[(n, s)]["val_curve"]) for s in seeds]
        k = min(len(c) for c in curves)
        ax1.plot(curves[0][:k, 0], np.stack([c[:k, 1] for c in curves]).mean(0), "o-", ms=3, color=f"C{i}", label=n)
    ax1.set(xlabel="step", ylabel="validation loss (nats/token)", title=f"validation loss, mean of {len(seeds)} seeds")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    band = band_of(seed_spread({n: {s: per_run[(n, s)]["val_loss"] for s in seeds} for n in names}), len(seeds))
    if band is not None:
        ax2.axhspan(-band, band, color="0.85", label="95% band (seed-to-seed spread)")
    for i, n in enumerate(names):
        d = [per_run[(n, s)]["val_loss"] - per_run[(ref, s)]["val_loss"] for s in seeds]
        ax2.bar(i, statistics.fmean(d), color=f"C{i}", alpha=0.7)
        ax2.plot([i] * len(d), d, "k.", ms=6)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax2.set(ylabel=f"final validation loss - {ref}'s", title=f"paired by seed, against {ref} (dots: seeds)")
    if band is not None:
        ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"dsv2 ablate {suite.name}: {suite.title}", fontsize=10)
    fig.tight_layout()
    path = out / f"{suite.name}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return [path]


def write(suite: Suite, runs: list[Any], out: Path, command: str) -> dict[str, Path]:
    """report.md, report.json and the plot under out (the suite's folder)."""
    data = collect(suite, runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "json": out / "report.json"}
    atomic_write(paths["report"], markdown(suite, runs, data, command))
    serial = {"suite": suite.name, "command": command, "machine": machine(device_for(runs[0].tc)),
              "claims": data["claims"],
              "runs": [{"variant": n, "seed": s, **x} for (n, s), x in data["runs"].items()]}
    atomic_write(paths["json"], json.dumps(serial, indent=1) + "\n")
    paths["plot"] = plots(suite, runs, data, out)[0]
    return paths
