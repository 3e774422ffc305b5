"""results.json -> results.md (markdown tables, targets) and PNG plots; optionally the Speed section of
benchmarks/README.md (between its benchmarks markers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

README_BEGIN, README_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
PEER_ORDER = ("dsv2 absorbed", "dsv2 naive", "dsv2", "hf eager", "hf grouped_mm", "hf batched_mm")


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _peers(present) -> list[str]:
    return [p for p in PEER_ORDER if p in present]


def _hf_best(d: dict) -> tuple[str | None, float | None, bool]:
    """(peer, value, lower_is_better) of transformers' best entry in a {peer: value} dict."""
    hf = {k: v for k, v in d.items() if k.startswith("hf")}
    if not hf:
        return None, None, True
    k = min(hf, key=hf.get)
    return k, hf[k], True


def targets(res: dict) -> list[dict]:
    out = []
    dec = res.get("decode")
    if dec:
        cells = {(c["dtype"], c["context"], c["batch"]): c for c in dec["cells"]}
        for (dname, ctx, b), c in sorted(cells.items()):
            if ctx == 2048 and "dsv2 absorbed" in c["ms"]:
                peer, ms, _ = _hf_best(c["ms"])
                if peer:
                    r = ms / c["ms"]["dsv2 absorbed"]
                    out.append(dict(target="decode at 2K >= 5x transformers' best", case=f"{dname}, batch {b}",
                                    value=f"{r:.1f}x (best: {peer})", met=r >= 5))
        for dname, b in sorted({(d, b) for d, _, b in cells}):
            lo, hi = cells.get((dname, 512, b)), cells.get((dname, 8192, b))
            if lo and hi and "dsv2 absorbed" in lo["ms"]:
                r = hi["ms"]["dsv2 absorbed"] / lo["ms"]["dsv2 absorbed"]
                out.append(dict(target="dsv2 decode latency 8K <= 1.5x 512", case=f"{dname}, batch {b}",
                                value=f"{r:.2f}x", met=r <= 1.5))
        for (dname, ctx, b), c in sorted(cells.items()):
            if b == 1 and "bandwidth_fraction" in c and "dsv2 absorbed" in c["bandwidth_fraction"]:
                f = c["bandwidth_fraction"]["dsv2 absorbed"]
                out.append(dict(target="batch-1 decode >= 50% of the bandwidth bound", case=f"{dname}, ctx {ctx}",
                                value=f"{100 * f:.0f}%", met=f >= 0.5))
    pre = res.get("prefill")
    if pre:
        for row in pre["rows"]:
            peer, _, _ = _hf_best({k: -v for k, v in row["tokens_per_s"].items()})
            if peer:
                r = row["tokens_per_s"]["dsv2"] / row["tokens_per_s"][peer]
                out.append(dict(target="prefill (2K) >= 1.5x", case=row["dtype"], value=f"{r:.2f}x (best: {peer})",
                                met=r >= 1.5))
    tr = res.get("train")
    if tr:
        for row in tr["rows"]:
            if "ratio" in row:
                out.append(dict(target="training fwd+bwd >= 1.5x", case=f"{row['preset']}, {tr['dtype']}",
                                value=f"{row['ratio']:.2f}x (best: {row['hf_best']})", met=row["ratio"] >= 1.5))
    return out


def _section_stamp(sec: dict) -> str:
    s, m = sec.get("stamp", {}), sec.get("machine", {})
    bw = m.get("bandwidth", {}).get("read_GBps")
    peaks = ", ".join(f"{k} {v['GFLOPs']:.0f}" for k, v in m.get("matmul_peak", {}).items())
    return (f"*Measured {s.get('date', '?')}, 1-min load average {s.get('load_start', '?')} before the run, "
            f"{s.get('load_end', '?')} at its end (including its own {s.get('threads', '?')} threads); machine "
            f"limits in that run: read bandwidth {bw or 0:.1f} GB/s, dense matmul peak {peaks} GFLOP/s. "
            f"Figures are the best of n repeats (medians in results.json).*")


def markdown(res: dict) -> str:
    s = res["stamp"]
    commands = res.get("commands") or [res.get("command", "python -m benchmarks")]
    parts = ["# dsv2 benchmarks", "",
             f"Machine: {s['cpu']} · {s['cores']} cores ({s['isa']}) · torch.set_num_threads({s['threads']}) · "
             f"torch {s['torch']} · transformers {s['transformers']} · dsv2 {s['dsv2']}", "",
             "Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands), ""]
    if "model" in res:
        parts += [f"Decode/prefill/MoE model (one checkpoint written by dsv2's save_pretrained, loaded by "
                  f"dsv2.from_pretrained and transformers' from_pretrained): V2-Lite's shape scaled down: "
                  f"{res['model']['description']}; {res['model']['params'] / 1e6:.0f}M parameters.", ""]
    native = next((sec["machine"] for sec in (res.get(k) for k in ("decode", "moe", "prefill", "train"))
                   if sec and "native_dtype" in sec.get("machine", {})), None)
    if native:
        parts += [f"**Native dtype on this CPU: {native['native_dtype']}** ({native['native_note']}). Both "
                  "dtypes are measured; fp32 is this machine's fast one.", ""]
    tg = targets(res)
    if tg:
        parts += ["## Targets (each ratio from one run that measured both peers on the same weights)", "",
                  _table(["target", "case", "measured", "met"],
                         [[t["target"], t["case"], t["value"], "yes" if t["met"] else "**no**"] for t in tg]), ""]
    dec = res.get("decode")
    if dec:
        peers = _peers(dec["peers"])
        rows = []
        for c in dec["cells"]:
            peer, ms, _ = _hf_best(c["ms"])
            ratio = ms / c["ms"]["dsv2 absorbed"] if peer and "dsv2 absorbed" in c["ms"] else None
            rows.append([c["dtype"], c["context"], c["batch"]] + [c["ms"].get(p) for p in peers]
                        + [f"{ratio:.1f}x" if ratio else "-", c.get("load", "-")])
        parts += ["## 1. Decode: ms per step (one new token per sequence)", "", _section_stamp(dec), "",
                  _table(["dtype", "context", "batch"] + peers + ["best hf / dsv2 absorbed", "load"], rows), "",
                  "![decode latency](decode.png)", "",
                  "load: 1-min load average when the cell started (the run's own threads included). "
                  "Cells whose first step took over 8 s are a single sample. dsv2 absorbed = MLA weight absorption "
                  "over the preallocated latent cache, by the fused decode step where it applies (as dsv2.generate "
                  "decodes: batch <= 16); dsv2 naive = the same model re-expanding the latent each "
                  "step (what transformers does).", ""]
        if "equivalence" in dec:
            e = dec["equivalence"]
            parts += [f"Same-cache check (fp32, context {e['context']}): transformers' own prefill writes the "
                      f"latents dsv2 wrote (max abs diff {e['cache_max_abs_diff_vs_hf_prefill']:.1e}); next-token "
                      f"logits vs transformers: absorbed {e['logits_absorbed_vs_hf']:.1e}, naive "
                      f"{e['logits_naive_vs_hf']:.1e} (logits up to {e['logits_scale']:.1f}).", ""]
    pre = res.get("prefill")
    if pre:
        peers = _peers({p for r in pre["rows"] for p in r["tokens_per_s"]})
        parts += [f"## 2. Prefill: tokens/s at {pre['context']} tokens, batch {pre['batch']}", "",
                  _section_stamp(pre), "",
                  _table(["dtype"] + peers + ["dsv2 / best hf"],
                         [[r["dtype"]] + [r["tokens_per_s"].get(p) for p in peers]
                          + [f"{r['tokens_per_s']['dsv2'] / max(v for k, v in r['tokens_per_s'].items() if k != 'dsv2'):.2f}x"  # noqa: E501
                             if len(r["tokens_per_s"]) > 1 else "-"] for r in pre["rows"]]), ""]
    tr = res.get("train")
    if tr:
        peers = _peers({p for r in tr["rows"] for p in r["tokens_per_s"]})
        parts += [f"## 3. Training forward+backward: tokens/s ({tr['dtype']}, cross-entropy, no optimizer step)", "",
                  _section_stamp(tr), "",
                  _table(["preset", "batch x seq"] + peers + ["dsv2 / best hf"],
                         [[r["preset"], f"{r['batch']}x{r['seq_len']}"] + [r["tokens_per_s"].get(p) for p in peers]
                          + [f"{r['ratio']:.2f}x" if "ratio" in r else "-"] for r in tr["rows"]]), ""]
        skipped = [f"{r['preset']}: {k} ({v})" for r in tr["rows"] for k, v in r["skipped"].items()]
        if skipped:
            parts += ["Skipped: " + "; ".join(skipped) + ".", ""]
    moe = res.get("moe")
    if moe:
        peers = _peers({p for r in moe["rows"] for p in r["GFLOPs"]})
        parts += ["## 4. MoE layer: achieved GFLOP/s (useful FLOPs) vs measured dense matmul peak, same dtype", "",
                  _section_stamp(moe), "",
                  _table(["dtype", "tokens"] + peers + ["peak", "dsv2 % of peak"],
                         [[r["dtype"], r["tokens"]] + [r["GFLOPs"].get(p) for p in peers]
                          + [r["peak_GFLOPs"], f"{100 * r['fraction_of_peak'].get('dsv2', 0):.0f}%"]
                          for r in moe["rows"]]), "",
                  "peak: F.linear on large shapes in that dtype. Where bf16 GEMMs are emulated (no AVX512-BF16/AMX), "
                  "dsv2 computes many-row bf16 GEMMs in fp32 on the same bf16 values (dsv2.cpu.modules.gemm_dtype), "
                  "so its bf16 figure can exceed the bf16 peak.", ""]
    if dec and any("bound_ms" in c for c in dec["cells"]):
        peers = _peers(dec["peers"])
        rows = [[c["dtype"], c["context"], f"{c['bytes_per_step_batch1'] / 1e6:.0f}", c["bound_ms"],
                 c["read_GBps"]] + [f"{100 * c['bandwidth_fraction'][p]:.0f}%" for p in peers]
                for c in dec["cells"] if "bound_ms" in c]
        parts += ["## 5. Batch-1 decode vs the memory-bandwidth bound", "",
                  "bytes/step = active weights (all but the routed experts, K of E of those, one embedding row) + "
                  "the latent cache read; bound = the time a plain sum takes to read as many bytes from memory "
                  "(cold, all threads), timed round-robin with the peers in the same cell; % = bound / measured "
                  "time (the physical limit is 100%).", "",
                  _table(["dtype", "context", "MB/step", "bound ms", "read GB/s"] + peers, rows), ""]
    if dec and dec.get("kv_bytes_per_token"):
        kv = dec["kv_bytes_per_token"]
        rows = []
        for dname, d in kv.items():
            if dname == "mha_baseline":
                continue
            for k, v in d.items():
                rows.append([dname, k, v])
            if dname in kv.get("mha_baseline", {}):
                rows.append([dname, "MHA baseline (dsv2 attention_type=mha)", kv["mha_baseline"][dname]])
        parts += ["## 6. KV cache bytes per token (all layers), from the live caches", "",
                  _table(["dtype", "cache", "bytes/token"], rows), ""]
    parts += ["Plots: " + ", ".join(f"[{p}]({p})" for p in res.get("plots", [])), ""]
    return "\n".join(parts)


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    dec = res.get("decode")
    if dec and dec["cells"]:
        keys = sorted({(c["dtype"], c["batch"]) for c in dec["cells"]})
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
        for ax, (dname, b) in zip(axes[0], keys, strict=True):
            cells = sorted((c for c in dec["cells"] if c["dtype"] == dname and c["batch"] == b),
                           key=lambda c: c["context"])
            for p in _peers(dec["peers"]):
                xs = [c["context"] for c in cells if p in c["ms"]]
                ax.plot(xs, [c["ms"][p] for c in cells if p in c["ms"]], marker="o", label=p)
            ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
                   title=f"{dname}, batch {b}")
            ax.set_xticks([c["context"] for c in cells], [str(c["context"]) for c in cells])
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "decode.png", dpi=110)
        plt.close(fig)
        made.append("decode.png")
    tg = targets(res)
    if tg:
        fig, ax = plt.subplots(figsize=(8, 0.32 * len(tg) + 1.2))
        labels, vals, colors = [], [], []
        for t in tg:
            v = float(re.match(r"[\d.]+", t["value"]).group())
            if "%" in t["value"]:
                v = v / 50  # as a multiple of the 50% target
            elif "<=" in t["target"]:
                v = 1.5 / v  # as a multiple of the allowance: > 1 is met
            elif ">= 5x" in t["target"]:
                v = v / 5
            else:
                v = v / 1.5
            labels.append(f"{t['target']} [{t['case']}]")
            vals.append(v)
            colors.append("tab:green" if t["met"] else "tab:red")
        ax.barh(range(len(vals)), vals, color=colors)
        ax.axvline(1.0, color="k", lw=1)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("measured / target (>= 1 means met)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "targets.png", dpi=110)
        plt.close(fig)
        made.append("targets.png")
    if dec and dec.get("kv_bytes_per_token"):
        kv = dec["kv_bytes_per_token"]
        names, vals = [], []
        for dname, d in kv.items():
            if dname == "mha_baseline":
                continue
            for k, v in d.items():
                names.append(f"{k}\n{dname}")
                vals.append(v)
            if dname in kv.get("mha_baseline", {}):
                names.append(f"MHA baseline\n{dname}")
                vals.append(kv["mha_baseline"][dname])
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 3.5))
        ax.bar(range(len(vals)), [v / 1024 for v in vals])
        ax.set_xticks(range(len(vals)), names, fontsize=7)
        ax.set_ylabel("KiB per token (all layers)")
        fig.tight_layout()
        fig.savefig(out / "kv_cache.png", dpi=110)
        plt.close(fig)
        made.append("kv_cache.png")
    return made


def write(res: dict, out: Path, readme: Path | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = plots(res, out)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (out / "results.md").write_text(md)
    if readme is not None and readme.exists():
        text = readme.read_text()
        rel = out.relative_to(readme.parent) if out.is_relative_to(readme.parent) else out
        body = md.split("\n", 1)[1].strip().replace("](", f"]({rel}/").replace("\n## ", "\n### ")
        block = f"{README_BEGIN}\n{body}\n{README_END}"
        if README_BEGIN in text:
            text = re.sub(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n## Benchmarks\n\n" + block + "\n"
        readme.write_text(text)
    return out / "results.md"
