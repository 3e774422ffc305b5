"""Training-run plots from RUN_DIR/metrics.jsonl into RUN_DIR/plots/ (PNG, matplotlib Agg, no display needed).

Figures, each written only when its data is present:
- loss.png          training LM loss (raw, light) with an EMA line, validation loss, skipped steps marked;
- balance.png       the unweighted expert / device / communication balance losses (Sec. 2.2.3 of the V2 report;
                    each equals 1 under perfectly uniform routing), the per-layer max/mean expert load, and the
                    fraction of token-expert assignments dropped by the device-level capacity (Sec. 2.2.4);
- expert_load.png   one heatmap per MoE layer over training: x = step, y = expert, colour = the expert's share of
                    the layer's assignments (log scale diverging around the uniform share 1/E: collapse and
                    starved experts stand out);
- lr_throughput.png learning rate, gradient norm (before clipping) and tokens per second, and
                    for expert-parallel runs the all-to-all bytes sent off-rank per step.

The reader is forgiving because the file is written by a process that may crash or be resumed: blank lines are
ignored, an undecodable LAST line (a crash mid-write) is dropped silently and other undecodable lines with a
warning, keys may be missing, values may be null or non-finite (not drawn), and when a step appears twice
(a resumed run re-logging it) the later record wins. A missing or empty file is a ValueError naming the path.
The file is streamed, and expert loads are decimated while reading (once a run is longer, between
MAX_HEATMAP_STEPS and twice that many evenly spaced steps are kept), so a long run with many MoE layers never
holds every step's [layers x experts] table in memory.

Uses matplotlib's object-oriented API (Figure, no pyplot): no global state, no backend switching, safe to call
from a training process. Each PNG is written to a temporary name and renamed, so a viewer never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from ..files import atomic_write
from ..training.run_dir import METRICS_FILE, PLOT_FILES, PLOTS_DIR

MAX_HEATMAP_STEPS = 300
BALANCE_KEYS = (("expert_balance", "expert-level"), ("device_balance", "device-level"),
                ("comm_balance", "communication"))
DPI = 110


# ---------------------------------------------------------------------------------------------------------------
# reading
@dataclass
class RunMetrics:
    records: list[dict[str, Any]]
    """One dict per step, sorted by step, later duplicates winning; expert_load removed (see loads)."""
    load_steps: list[int] = field(default_factory=list)
    """Steps of the kept expert-load samples (sorted, unique)."""
    loads: list[list[Any]] = field(default_factory=list)
    """expert_load of those steps: per MoE layer, per expert, the share of the layer's assignments."""

    def series(self, key: str, include_skipped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the records holding a finite number under `key`."""
        xs, ys = [], []
        for r in self.records:
            if r.get("skipped") and not include_skipped:
                continue
            v = _number(r.get(key))
            if v is not None:
                xs.append(r["step"])
                ys.append(v)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def moe_layer_names(self, n: int) -> list[str]:
        for r in reversed(self.records):
            ids = r.get("moe_layers")
            if isinstance(ids, list) and len(ids) == n:
                return [f"layer {i}" for i in ids]
        return [f"MoE layer #{k}" for k in range(n)]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def read_metrics(path: str | os.PathLike) -> RunMetrics:
    """Parse metrics.jsonl (see the module docstring for what is tolerated)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no metrics file at {path}")
    by_step: dict[int, dict[str, Any]] = {}
    loads: list[tuple[int, list[Any]]] = []
    stride, n_load = 1, 0  # decimation: keep every stride-th expert-load record, doubling stride as needed
    bad_line = 0  # an undecodable line, reported only once a later line shows it was not the last
    with path.open(encoding="utf-8", errors="replace") as f:  # streamed: the file can be far larger than memory
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if bad_line:
                warnings.warn(f"{path}:{bad_line}: not valid JSON, skipped", stacklevel=2)
                bad_line = 0
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad_line = lineno
                continue
            n_load, stride = _add_record(path, lineno, rec, by_step, loads, n_load, stride)
    if not by_step:
        raise ValueError(f"metrics file {path} holds no records (empty or unreadable)")
    kept = dict(loads)  # later duplicates of a step win, as for the records
    load_steps = sorted(kept)
    return RunMetrics([by_step[s] for s in sorted(by_step)], load_steps, [kept[s] for s in load_steps])


def _add_record(path: Path, lineno: int, rec: Any, by_step: dict[int, dict[str, Any]],
                loads: list[tuple[int, list[Any]]], n_load: int, stride: int) -> tuple[int, int]:
    step = rec.get("step") if isinstance(rec, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
        warnings.warn(f"{path}:{lineno}: not a metrics record with an integer step, skipped", stacklevel=3)
        return n_load, stride
    load = rec.pop("expert_load", None)
    if isinstance(load, list) and load:
        if n_load % stride == 0:
            loads.append((step, load))
            if len(loads) > 2 * MAX_HEATMAP_STEPS:
                loads[:] = loads[::2]
                stride *= 2
        n_load += 1
    by_step[step] = rec
    return n_load, stride


# ---------------------------------------------------------------------------------------------------------------
# figures
def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write the figures of run_dir/metrics.jsonl into run_dir/plots/; return the PNG paths written."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / METRICS_FILE)
    out_dir = run_dir / PLOTS_DIR
    written = []
    for name, draw in zip(PLOT_FILES, (_loss_figure, _balance_figure, _expert_load_figure, _lr_figure), strict=True):
        fig = draw(metrics)
        if fig is not None:
            out_dir.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            written.append(_save(fig, out_dir / name))
    return written


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (Adam-style correction: no pull towards 0 at the start)."""
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1 - beta) * v
        out[i] = acc / (1 - beta ** (i + 1))
    return out


def _mark_skipped(ax, metrics: RunMetrics) -> None:
    skipped = [r["step"] for r in metrics.records if r.get("skipped")]
    if skipped:  # x in data, y in axes coordinates: a row of crosses along the bottom, whatever the y scale
        ax.plot(skipped, [0.03] * len(skipped), "x", color="tab:red", ms=6, mew=1.5, clip_on=False,
                transform=blended_transform_factory(ax.transData, ax.transAxes),
                label=f"skipped step (non-finite), {len(skipped)}")


def _line(ax, x: np.ndarray, y: np.ndarray, **kw) -> None:
    """A line, with point markers when the series is short (a single point would otherwise be invisible)."""
    if len(x) < 30:
        kw.setdefault("marker", "o")
        kw.setdefault("ms", 3)
    ax.plot(x, y, **kw)


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres: midpoints inside, half a neighbour gap (or 0.5) beyond the ends."""
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mid = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")


def _loss_figure(m: RunMetrics) -> Figure | None:
    xs, ys = m.series("loss")
    vx, vy = m.series("val_loss")
    if not len(xs) and not len(vx):
        return None
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    if len(xs):
        beta = min(0.98, max(0.0, 1 - 10 / len(xs)))  # ~ a window of n/10 steps, at most ~50
        _line(ax, xs, ys, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        _line(ax, xs, ema(ys, beta), color="tab:blue", lw=2, label=f"train (EMA, beta={beta:.2f})")
    if len(vx):
        ax.plot(vx, vy, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
    _mark_skipped(ax, m)
    both = np.concatenate([ys, vy])
    if both.size and both.min() > 0 and both.max() / both.min() > 10:
        ax.set_yscale("log")  # a loss falling by orders of magnitude: keep the late curve readable
    ax.set(title="Language-model loss", xlabel="step", ylabel="cross-entropy (nats / token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")
    return fig


def _balance_figure(m: RunMetrics) -> Figure | None:
    bal = [(label, *m.series(key)) for key, label in BALANCE_KEYS]
    bal = [b for b in bal if len(b[1])]
    dx, dy = m.series("dropped_fraction")
    lx, lmax = _load_max_mean(m)
    if not bal and not len(dx) and not len(lx):
        return None
    fig = Figure(figsize=(9, 9), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    for label, x, y in bal:
        _line(ax1, x, y, lw=1.2, label=label)
    if not bal:
        _no_data(ax1)
    ax1.axhline(1.0, color="grey", ls="--", lw=1, label="uniform routing (= 1)")
    ax1.set(title="Balance losses (unweighted, mean over MoE layers)", ylabel="loss")
    ax1.legend(loc="upper right", fontsize="small")
    if len(lx):
        for k in range(lmax.shape[1]):
            _line(ax2, lx, lmax[:, k], lw=0.8, alpha=0.6)
        _line(ax2, lx, np.fmax.reduce(lmax, axis=1), color="black", lw=1.5, label="worst layer")  # NaN-tolerant
        ax2.legend(loc="upper right", fontsize="small")
    else:
        _no_data(ax2)
    ax2.axhline(1.0, color="grey", ls="--", lw=1)
    ax2.set(title="Expert load: max / mean count per MoE layer (1 = perfectly balanced)", ylabel="max / mean")
    if len(dx):
        _line(ax3, dx, 100 * dy, color="tab:red", lw=1.2)
    else:
        _no_data(ax3)
    ax3.set(title="Assignments dropped by the device-level capacity", xlabel="step", ylabel="dropped (%)")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    return fig


def _load_max_mean(m: RunMetrics) -> tuple[np.ndarray, np.ndarray]:
    """(steps, [steps, layers]) of expert_load_max_mean, NaN where a layer's value is missing."""
    rows = [(r["step"], r["expert_load_max_mean"]) for r in m.records
            if not r.get("skipped") and isinstance(r.get("expert_load_max_mean"), list) and r["expert_load_max_mean"]]
    if not rows:
        return np.empty(0), np.empty((0, 0))
    n = max(len(v) for _, v in rows)
    table = np.full((len(rows), n), np.nan)
    for i, (_, v) in enumerate(rows):
        for k, x in enumerate(v):
            table[i, k] = v if (v := _number(x)) is not None else np.nan
    return np.asarray([s for s, _ in rows], dtype=float), table


def _expert_load_figure(m: RunMetrics) -> Figure | None:
    if not m.loads:
        return None
    n_layers = max(len(step_load) for step_load in m.loads)
    n_exp = max((len(e) for step_load in m.loads for e in step_load if isinstance(e, list)), default=0)
    if n_exp == 0:
        return None
    cube = np.full((n_layers, n_exp, len(m.loads)), np.nan)  # [layer, expert, step]
    for t, step_load in enumerate(m.loads):
        for k, experts in enumerate(step_load):
            if isinstance(experts, list):
                cube[k, : len(experts), t] = [v if (v := _number(x)) is not None else np.nan for x in experts]
    # Colour = share on a log scale centred on the uniform share 1/E: twice and half the fair share are equally
    # dark (red over, blue under), and an expert that gets nothing saturates blue instead of vanishing.
    uniform = 1.0 / n_exp
    peak = float(np.nanmax(cube)) / uniform if np.isfinite(cube).any() else 1.0
    span = 2.0 ** math.ceil(math.log2(min(16.0, max(2.0, peak))))  # colour range: uniform / span .. uniform * span
    norm = LogNorm(vmin=uniform / span, vmax=uniform * span, clip=True)
    cube = np.clip(cube, uniform / span, None)  # NaN (missing) stays NaN: drawn as background
    ncols = math.ceil(math.sqrt(n_layers))
    nrows = math.ceil(n_layers / ncols)
    fig = Figure(figsize=(1 + 3.6 * ncols, 0.8 + 2.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    names = m.moe_layer_names(n_layers)
    # one column per kept step, centred on it and reaching halfway to its neighbours: irregular (decimated,
    # skipped) steps keep their true positions
    x_edges, y_edges = _edges(np.asarray(m.load_steps, dtype=float)), np.arange(n_exp + 1) - 0.5
    mesh = None
    for k, ax in enumerate(axes):
        if k >= n_layers:
            ax.set_axis_off()
            continue
        ax.set_facecolor("0.75")  # missing values are masked out: grey, never mistaken for the white of 1/E
        mesh = ax.pcolormesh(x_edges, y_edges, cube[k], cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_title(names[k], fontsize="medium")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if k % ncols == 0:
            ax.set_ylabel("expert")
        if k + ncols >= n_layers:  # bottom panel of its column
            ax.set_xlabel("step")
    fig.suptitle(f"Expert load over training: each expert's share of its layer's assignments\n"
                 f"{n_exp} routed experts; white = the uniform share 1/{n_exp}"
                 + ("; grey = not logged" if np.isnan(cube).any() else ""))
    bar = fig.colorbar(mesh, ax=axes.tolist(), shrink=0.9, label="share of assignments (log scale)")
    ratios = 2.0 ** np.arange(-math.log2(span), math.log2(span) + 1)
    bar.set_ticks(uniform * ratios, labels=[f"{uniform * r:.3g} ({r:g}x)" for r in ratios])
    bar.minorticks_off()
    return fig


def _lr_figure(m: RunMetrics) -> Figure | None:
    keys = ["lr", "grad_norm", "tokens_per_s"]
    if len(m.series("comm_bytes")[0]):  # expert-parallel runs: all-to-all traffic per step
        keys.append("comm_bytes")
    panels = [(key, *m.series(key)) for key in keys]
    if not any(len(x) for _, x, _ in panels):
        return None
    fig = Figure(figsize=(9, 2.7 * len(keys)), layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True)
    labels = {"lr": ("Learning rate", "lr"), "grad_norm": ("Gradient norm (before clipping)", "L2 norm"),
              "tokens_per_s": ("Throughput", "tokens / s"),
              "comm_bytes": ("Expert-parallel traffic (sent off-rank, forward + backward)", "bytes / step")}
    for ax, (key, x, y) in zip(axes, panels, strict=True):
        if len(x):
            _line(ax, x, y, lw=1.2)
            if key == "grad_norm" and y.min() > 0 and y.max() / y.min() > 100:
                ax.set_yscale("log")
        else:
            _no_data(ax)
        title, ylabel = labels[key]
        ax.set(title=title, ylabel=ylabel)
        ax.grid(alpha=0.3)
    _mark_skipped(axes[1], m)
    axes[-1].set_xlabel("step")
    return fig
