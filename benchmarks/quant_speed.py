"""Quantized decode and prefill against llama.cpp's formats of the same bits: `python -m benchmarks.quant_speed`.

The peers benchmark's checkpoint (benchmarks/peers.prepare: the V2-Lite-shaped 4-layer model, random weights) runs
in dsv2 as bf16, int8 and int4 (quantized while loading: `from_pretrained(quantize=...)`; "+head": lm_head quantized
to int8 too, as llama.cpp's Q8_0 and Q4_0 files quantize theirs), and in llama.cpp as its converter's bf16 GGUF and
`llama-quantize`'s Q8_0 and Q4_0 of it. Per variant: batch-1 decode ms/token after
prompts of 256 and 2K tokens, prefill tokens/s of a 2K-token prompt. dsv2 is driven through its engine
(benchmarks/protocol.py); llama.cpp through llama-bench (`-fa 1`, the better setting at these depths here; decode
`-n 32 -d CTX`, prefill `-p 2048 -n 0`). The variants run in alternating rounds, each figure the best of its rounds;
ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dsv2 import Engine, SamplingParams
from dsv2.cpu import ops
from dsv2.inference.engine.paged import PagedCache
from dsv2.quant.recipe import INT4_MIX, Recipe

from . import common
from .decode import active_weight_bytes
from .peers import LLAMA_BIN, NEW_TOKENS, ROOT, gguf, prepare
from .protocol import run_cell

DSV2 = {"bf16": lambda: None, "int8": lambda: "int8", "int4": lambda: "int4",
        "int8+head": lambda: Recipe.build("int8", lm_head=True),  # lm_head quantized too, as llama.cpp's files have it
        "int4+head": lambda: Recipe.build("int4", families={**INT4_MIX, "lm_head": "int8"})}
PAIRS = [("bf16", "bf16"), ("int8", "Q8_0"), ("int8+head", "Q8_0"), ("int4", "Q4_0"), ("int4+head", "Q4_0")]


@torch.inference_mode()
def run_dsv2(ckpt: Path, quantize: str | Recipe | None, contexts: list[int], threads: int, seed: int) -> dict:
    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(ckpt, dtype=torch.bfloat16, quantize=quantize, max_num_seqs=1,
                                    prefix_caching=False, num_blocks=(max(contexts) + NEW_TOKENS + 64) // 64 + 2,
                                    block_size=64)
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size

    def add(rid, ids, n):
        engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    def step():
        return [(o.request_id, len(o.outputs[0].token_ids)) for o in engine.step()]

    run_cell(add, step, engine.has_unfinished, [torch.randint(2, vocab, (64,), generator=g).tolist()], 4, "warm")
    out = {"decode_ms": {}, "bytes_per_token": {}}
    weights = active_weight_bytes(engine.model)
    per_token = PagedCache.bytes_per_token(engine.model, engine.cache.storage.dtype)
    for c in contexts:
        cell = run_cell(add, step, engine.has_unfinished, [torch.randint(2, vocab, (c,), generator=g).tolist()],
                        NEW_TOKENS, f"d{c}")
        out["decode_ms"][c] = cell["ms_per_step"]
        out["bytes_per_token"][c] = weights + c * per_token
        if c == 2048:
            out["prefill_tok_s"] = 2048 / cell["ttft_s"]
    return out


def llama_model(ckpt: Path, kind: str, log) -> Path:
    bf16 = gguf(ckpt, "bf16", log)
    if kind == "bf16":
        return bf16
    out = bf16.with_name(f"bench-{kind.lower()}.gguf")
    if not out.exists() or out.stat().st_mtime < bf16.stat().st_mtime:
        log(f"  llama-quantize {bf16.name} -> {out.name}")
        subprocess.run([str(LLAMA_BIN / "llama-quantize"), str(bf16), str(out), kind], check=True,
                       capture_output=True)
    return out


def run_llama(model: Path, contexts: list[int], threads: int, repack: int) -> dict:
    def jsonl(cmd):
        p = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
        return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]

    base = [str(LLAMA_BIN / "llama-bench"), "-m", str(model), "-t", str(threads), "-fa", "1", "--repack", str(repack),
            "-r", "1", "-o", "jsonl"]
    dec = jsonl([*base, "-p", "0", "-n", str(NEW_TOKENS - 1), "-d", ",".join(map(str, contexts))])
    pre = jsonl([*base, "-p", "2048", "-n", "0"])
    return {"decode_ms": {int(r["n_depth"]): 1e3 / r["avg_ts"] for r in dec}, "prefill_tok_s": pre[0]["avg_ts"]}


def best(rounds: list[dict]) -> dict:
    out = {"decode_ms": {c: min(r["decode_ms"][c] for r in rounds) for c in rounds[0]["decode_ms"]},
           "prefill_tok_s": max(r["prefill_tok_s"] for r in rounds), "rounds": len(rounds)}
    if "bytes_per_token" in rounds[0]:
        out["bytes_per_token"] = rounds[0]["bytes_per_token"]
    return out


def table(res: dict) -> str:
    d, ll = res["dsv2"], res["llama.cpp"]
    ctx = res["contexts"]
    lines = ["| dsv2 / llama.cpp | " + " | ".join(f"decode ms @ {c}" for c in ctx) + " | prefill 2K tok/s |",
             "|---|" + "---|" * (len(ctx) + 1)]
    for mine, theirs in PAIRS:
        if mine not in d or theirs not in ll:
            continue
        a, b = d[mine], ll[theirs]
        cells = [f"{a['decode_ms'][c]:.1f} / {b['decode_ms'][c]:.1f} ({b['decode_ms'][c] / a['decode_ms'][c]:.2f}x)"
                 for c in ctx]
        pre = f"{a['prefill_tok_s']:,.0f} / {b['prefill_tok_s']:,.0f}"
        lines.append(f"| {mine} / {theirs} | " + " | ".join(cells) + f" | {pre} |")
    base = d.get("bf16")
    if base:
        rel = [f"{k} {base['prefill_tok_s'] and d[k]['prefill_tok_s'] / base['prefill_tok_s']:.2f}x"
               for k in d if k != "bf16"]
        lines.append(f"\ndsv2 prefill against its own bf16: {', '.join(rel)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quant_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="256,2048")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="bf16,int8,int8+head,int4,int4+head")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repack", type=int, default=0, help="llama-bench --repack (1 asserts for deepseek2 quantized "
                    "weights on some CPUs)")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quant")
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    log = common.logger()

    ckpt = prepare(args.workdir)
    llama = not args.no_llama and (LLAMA_BIN / "llama-bench").exists()
    rounds = {"dsv2": {v: [] for v in variants}, "llama.cpp": {}}
    pairs = dict(PAIRS)
    for r in range(args.rounds):
        for v in variants:
            log(f"round {r} dsv2 {v}")
            rounds["dsv2"][v].append(run_dsv2(ckpt, DSV2[v](), contexts, args.threads, seed=r))
            log(f"  {rounds['dsv2'][v][-1]}")
            if llama and v in ("bf16", "int8", "int4"):  # each llama.cpp file once per round
                kind = pairs[v]
                log(f"round {r} llama.cpp {kind}")
                got = run_llama(llama_model(ckpt, kind, log), contexts, args.threads, args.repack)
                rounds["llama.cpp"].setdefault(kind, []).append(got)
                log(f"  {got}")
    res = {"stamp": common.stamp(args.threads), "cpu": ops.cpu_name(), "contexts": contexts,
           "command": common.command_line("benchmarks.quant_speed", argv),
           "dsv2": {v: best(x) for v, x in rounds["dsv2"].items()},
           "llama.cpp": {k: best(x) for k, x in rounds["llama.cpp"].items()}, "all_rounds": rounds}
    common.write_results(args.out, "speed", res, table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
