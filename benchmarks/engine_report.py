"""benchmarks/results/engine/results.json -> results.md (tables, targets), mla_vs_mha.png, and the Engine section of
benchmarks/README.md (between its engine-benchmarks markers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .report import _table

README_BEGIN, README_END = "<!-- engine-benchmarks:begin -->", "<!-- engine-benchmarks:end -->"


def targets(res: dict) -> list[list]:
    rows = []
    tp = res.get("throughput")
    if tp:
        r16 = next((r for r in tp["rows"] if r["concurrency"] == 16), None)
        if r16:
            rows.append(["output tokens/s at 16 concurrent >= 4x at 1", f"{r16['vs_1']:.1f}x", r16["vs_1"] >= 4])
    ov = res.get("overhead")
    if ov:
        rows.append(["batch-1 decode ms/token, engine <= 1.1x dsv2.generate", f"{ov['ratio']:.3f}x",
                     ov["ratio"] <= 1.1])
    pg = res.get("paged")
    if pg:
        rows.append([f"decode step at batch {pg['batch']}, ragged contexts: paged engine <= 1.2x contiguous",
                     f"{pg['ratio']:.3f}x", pg["ratio"] <= 1.2])
    px = res.get("prefix")
    if px:
        rows.append([f"TTFT of a repeated {px['prompt_len']}-token prompt <= 0.1x its first", f"{px['ratio']:.3f}x",
                     px["ratio"] <= 0.1])
    mm = res.get("mla_vs_mha")
    if mm:
        top = max((r for r in mm["rows"] if r["attention"] == "mla" and "vs_mha" in r), default=None,
                  key=lambda r: r["budget_mib"])
        if top:
            v = top["vs_mha"]
            rows.append([f"MLA vs MHA at {top['budget_mib']} MiB: concurrent sequences >= 4x", f"{v['capacity']:.1f}x",
                         v["capacity"] >= 4])
            rows.append([f"MLA vs MHA at {top['budget_mib']} MiB: decode tokens/s >= 2x",
                         f"{v['decode_tok_per_s']:.1f}x", v["decode_tok_per_s"] >= 2])
    pe = res.get("peers")
    for dname, by in (pe or {}).get("results", {}).items():
        share = _bandwidth_share(pe, by.get("dsv2", {})).get(256)
        if share is not None:
            rows.append([f"batch-1 decode at context 256, {dname}: bytes/time >= 85% of read bandwidth",
                         f"{100 * share:.0f}%", share >= 0.85])
    for dname, by in (pe or {}).get("results", {}).items():
        ours = by.get("dsv2")
        others = {p: v for p, v in by.items() if p != "dsv2" and "error" not in v}
        if not ours or not others:
            continue
        for label, get, lower in _peer_rows(pe):
            theirs = {p: get(v) for p, v in others.items() if get(v) is not None}
            if get(ours) is None or not theirs:
                continue
            best = min(theirs.values()) if lower else max(theirs.values())
            ratio = best / get(ours) if lower else get(ours) / best
            rows.append([f"ahead of every peer: {label}, {dname}", f"{ratio:.2f}x", ratio > 1])
    return rows


def _peer_rows(pe: dict) -> list[tuple]:
    """(label, getter, lower is better) per figure of the peers table."""
    out = [(f"decode ms/token, batch 1, context {c}", lambda v, c=c: v["decode_ms"].get(str(c),
                                                                                     v["decode_ms"].get(c)), True)
           for c in pe["contexts"]]
    out.append((f"decode ms/step, batch {pe['batch']}, context 2048", lambda v: v["batched_ms"], True))
    out.append(("prefill tokens/s, 2048 tokens", lambda v: v["prefill_tok_s"], False))
    return out


def _bandwidth_share(pe: dict, ours: dict) -> dict[int, float]:
    """Per context: the bytes a batch-1 step reads (active weights + the context's cache) / its time, as a share of
    the read bandwidth measured in the same run."""
    if "read_GBps" not in pe or "bytes_per_token" not in ours:
        return {}
    return {int(c): nbytes / (ours["decode_ms"].get(c, ours["decode_ms"].get(str(c))) * 1e-3) / 1e9 / pe["read_GBps"]
            for c, nbytes in ours["bytes_per_token"].items()}


def _stamp(sec: dict) -> str:
    s = sec.get("stamp", {})
    return f"*{s.get('date', '?')}, 1-min load {s.get('load_start', '?')} -> {s.get('load_end', '?')}.*"


def markdown(res: dict) -> str:
    s = res["stamp"]
    parts = ["# dsv2 engine benchmarks", "",
             f"Machine: {s['cpu']} · {s['cores']} cores ({s['isa']}) · torch.set_num_threads({s['threads']}) · "
             f"torch {s['torch']} · dsv2 {s['dsv2']} · dtype {res['dtype']}", "",
             "Commands: " + "; ".join(f"`{c}`" for c in res.get("commands", [])), ""]
    if "model" in res:
        parts += [f"Model (1-4): the decode benchmark's, {res['model']['description']}; "
                  f"{res['model']['params'] / 1e6:.0f}M parameters, random weights.", ""]
    tg = targets(res)
    if tg:
        parts += ["## Targets", "", _table(["target", "measured", "met"],
                                           [[a, b, "yes" if m else "**no**"] for a, b, m in tg]), ""]
    tp = res.get("throughput")
    if tp:
        parts += [f"## Output tokens/s against concurrent requests ({tp['prompt_len']}-token prompts, "
                  f"{tp['max_tokens']} greedy tokens each, all submitted at once)", "", _stamp(tp), "",
                  _table(["requests", "tokens/s (whole run)", "vs 1", "tokens/s (decode phase)", "vs 1", "wall s"],
                         [[r["concurrency"], r["tok_per_s"], f"{r['vs_1']:.1f}x", r["decode_tok_per_s"],
                           f"{r.get('decode_vs_1', 0):.1f}x", r["wall_s"]] for r in tp["rows"]]), "",
                  "Decode phase: from when every request has its first token to the end.", ""]
    ov = res.get("overhead")
    if ov:
        parts += [f"## Batch-1 decode: engine vs dsv2.generate ({ov['prompt_len']}-token prompt, "
                  f"{ov['max_tokens']} tokens, ms/token from the 1st to the last)", "", _stamp(ov), "",
                  _table(["engine", "dsv2.generate", "ratio", "same tokens"],
                         [[ov["ms_per_token"]["engine"], ov["ms_per_token"]["dsv2.generate"], f"{ov['ratio']:.3f}x",
                           str(ov["same_tokens"])]]), ""]
    pg = res.get("paged")
    if pg:
        parts += [f"## Decode step at batch {pg['batch']}, contexts {pg['contexts'][0]}..{pg['contexts'][-1]}: "
                  "paged vs contiguous", "", _stamp(pg), "",
                  _table(list(pg["ms_per_step"]) + ["ratio"], [list(pg["ms_per_step"].values())
                                                               + [f"{pg['ratio']:.3f}x"]]), "",
                  f"engine.step includes scheduling, the ragged batch's metadata, the forward over the paged cache "
                  f"(the CPU kernel reads the blocks through the block tables) and sampling; the contiguous peer is "
                  f"the model's forward over a left-padded KVCache of {pg['padded_width']} slots per sequence "
                  "holding the same rows, and an argmax.", ""]
    px = res.get("prefix")
    if px:
        parts += [f"## Prefix caching: time to first token of a {px['prompt_len']}-token prompt", "", _stamp(px), "",
                  _table(["first time ms", "again ms", "tokens from the cache", "ratio"],
                         [[px["first_ms"], px["again_ms"], px["cached_tokens"], f"{px['ratio']:.3f}x"]]), "",
                  f"Blocks of {px['block_size']} tokens: the last token is always computed (its logits give the "
                  "first sample), so the last partial block is recomputed.", ""]
    mm = res.get("mla_vs_mha")
    if mm:
        bpt = mm["bytes_per_token"]
        rows = [[r["budget_mib"], r["attention"], r["capacity"], r.get("peak_running", "-"),
                 r.get("preemptions", "-"), r.get("decode_tok_per_s"),
                 f"{r['vs_mha']['capacity']:.1f}x / {r['vs_mha']['decode_tok_per_s']:.1f}x" if "vs_mha" in r else "-"]
                for r in sorted(mm["rows"], key=lambda r: (r["budget_mib"], r["attention"]))]
        parts += ["## MLA vs the MHA baseline under one cache budget", "", _stamp(mm), "",
                  f"Same dims but the attention (V2-Lite's 16 heads of 128 + 64 RoPE dims, kv_lora_rank 512): cache "
                  f"bytes per token MLA {bpt['mla']:,}, MHA {bpt['mha']:,} ({bpt['mha'] / bpt['mla']:.1f}x). "
                  f"Sequences of {mm['prompt_len']} prompt + {mm['max_tokens']} greedy tokens; as many submitted as "
                  "the budget holds.", "",
                  _table(["budget MiB", "attention", "max concurrent", "peak running", "preemptions",
                          "decode tokens/s", "MLA / MHA (sequences / tokens/s)"], rows), "",
                  "![MLA vs MHA](mla_vs_mha.png)", ""]
    pe = res.get("peers")
    if pe:
        s = pe["stamp"]
        parts += ["## Peers on the same weights: dsv2's engine, llama.cpp, vLLM's CPU build", "",
                  f"*{s['date']}, {s['cpu']}, {s['threads']} threads, 1-min load {s['load_start']} before.*", ""]
        for dname, by in pe["results"].items():
            peers = list(by)
            rows = []
            for label, get, lower in _peer_rows(pe):
                rows.append([label + (" (lower is better)" if lower else "")]
                            + [get(by[p]) if "error" not in by[p] else "failed" for p in peers])
            parts += [f"### {dname}", "", _table(["figure"] + peers, rows), ""]
            share = _bandwidth_share(pe, by.get("dsv2", {}))
            if share:
                parts += ["dsv2 batch-1 decode, bytes read per token (active weights + cache) / time, against the "
                          f"read bandwidth measured in this run ({pe['read_GBps']:.1f} GB/s, a sum over 1 GiB on all "
                          "threads): " + ", ".join(f"context {c}: {100 * v:.0f}%" for c, v in share.items()), ""]
        for p, why in pe.get("notes", {}).items():
            parts += [f"- {p} skipped: {why}"]
        failed = {f"{p} ({d})": v["error"] for d, by in pe["results"].items() for p, v in by.items() if "error" in v}
        for p, why in failed.items():
            parts += [f"- {p} failed: {why}"]
        parts += ["", f"Decode: {pe['new_tokens']} greedy tokens after the prompt; ms per token from the 1st to the "
                  f"last (llama.cpp: llama-bench's text generation at that depth; batch {pe['batch']}: "
                  "llama-batched-bench's generation time per step). Prefill: 2048 tokens to the first token "
                  "(llama.cpp: llama-bench -p 2048). Best of each peer's rounds, the rounds alternating peers.", ""]
    return "\n".join(parts)


def plot(res: dict, out: Path) -> None:
    mm = res.get("mla_vs_mha")
    if not mm:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for kind in ("mla", "mha"):
        rows = sorted((r for r in mm["rows"] if r["attention"] == kind), key=lambda r: r["budget_mib"])
        ax.plot([r["budget_mib"] for r in rows], [r.get("decode_tok_per_s") or 0 for r in rows], marker="o",
                label=f"{kind.upper()} ({mm['bytes_per_token'][kind]:,} B/token)")
        for r in rows:
            ax.annotate(str(r["capacity"]), (r["budget_mib"], r.get("decode_tok_per_s") or 0), fontsize=7,
                        textcoords="offset points", xytext=(3, 4))
    ax.set(xscale="log", xlabel="cache budget (MiB)", ylabel="decode tokens/s",
           title=f"generation throughput at the budget's limit ({res['dtype']})")
    ax.set_xticks(mm["budgets_mib"], [str(b) for b in mm["budgets_mib"]])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mla_vs_mha.png", dpi=110)
    plt.close(fig)


def write(res: dict, out: Path, readme: Path | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out)
    md = markdown(res)
    (out / "results.md").write_text(md)
    print(md)
    if readme is not None and readme.exists():
        text = readme.read_text()
        rel = out.relative_to(readme.parent) if out.is_relative_to(readme.parent) else out
        # one level down: the section's own heading is `## Engine`
        body = (md.split("\n", 1)[1].strip().replace("](", f"]({rel}/")
                .replace("\n### ", "\n#### ").replace("\n## ", "\n### "))
        block = f"{README_BEGIN}\n{body}\n{README_END}"
        if README_BEGIN not in text:
            raise SystemExit(f"{readme} has no {README_BEGIN} marker: add one where the engine's figures go")
        text = re.sub(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
        readme.write_text(text)
    return out / "results.md"
