"""The engine's benchmarks (dsv2.Engine): `python -m benchmarks.engine [--quick] [--only ...] [--update-readme]`.

1. throughput: output tokens/s of N requests submitted together (N = 1, 4, 16, 64), short prompts, greedy, on
   the decode benchmark's V2-Lite-shaped model; the whole run and its decode phase (after every request's first
   token) are reported.
2. overhead: batch-1 decode ms/token served by the engine vs dsv2.generate (the contiguous-cache reference), same
   prompt, timed from the 1st to the last streamed token, interleaved.
3. paged: a decode step of 16 sequences with ragged contexts (256..4K, really prefilled through the engine):
   engine.step() (scheduling, the paged batch, the forward, sampling) vs the model's forward over a contiguous,
   left-padded KVCache holding the same rows, plus the argmax, interleaved.
4. prefix: time to first token of a 2K-token prompt the first time and when it is asked again (the prefix cache
   holds its full blocks).
5. mla_vs_mha: the paper's claim (Sec. 3.2.3: a smaller cache lets more sequences decode together): under one cache
   budget, MLA against the MHA baseline of the same other dims (V2-Lite's 16 heads; the cache ratio is
   2 n_h d_h / (d_c + d_R)): the most sequences of 512 tokens the budget holds, and decode tokens/s with that
   many running, over a sweep of budgets (plot).
Each ratio comes from one run with its peers interleaved; figures are best-of-rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import dsv2
from dsv2 import Engine, SamplingParams
from dsv2.inference.engine.paged import PagedCache

from . import common
from .common import DTYPES, free_memory, load_dsv2

ROOT = Path(__file__).resolve().parent
SUITES = ("throughput", "overhead", "paged", "prefix", "mla_vs_mha")
MIB = 1 << 20


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def drive(engine: Engine, prompts, params) -> dict:
    """Submit all, step to the end: wall time, output tokens, and the decode phase (from when every request has
    its first token) on its own; the most sequences running at once and the preemptions."""
    start_pre = engine.stats["preemptions"]
    base = f"b{time.perf_counter_ns()}-"
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{base}{i}", p, params)
    started, tokens, decode_t0, decode_tokens, peak = set(), 0, None, 0, 0
    while engine.has_unfinished():
        outs = engine.step()
        peak = max(peak, len(engine.scheduler.running))
        n = sum(len(c.new_token_ids) for o in outs for c in o.outputs)
        tokens += n
        if decode_t0 is not None:
            decode_tokens += n
        started.update(o.request_id for o in outs)
        if decode_t0 is None and len(started) == len(prompts):
            decode_t0 = time.perf_counter()
    wall = time.perf_counter() - t0
    decode_s = time.perf_counter() - decode_t0 if decode_t0 is not None else 0.0
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall,
            "decode_tok_per_s": decode_tokens / decode_s if decode_s > 0 and decode_tokens else None,
            "peak_running": peak, "preemptions": engine.stats["preemptions"] - start_pre}


# ---------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def throughput(model, *, concurrency=(1, 4, 16, 64), prompt_len=64, max_tokens=128, rounds=2, log=print) -> dict:
    engine = Engine(model, max_num_seqs=max(concurrency), prefix_caching=False,
                    cache_memory=max(concurrency) * (prompt_len + max_tokens + 64) * _per_token(model))
    drive(engine, _prompts(2, prompt_len, model.config.vocab_size, 99), _greedy(4))  # warm-up
    best: dict[int, dict] = {}
    for r in range(rounds):
        for n in concurrency:
            res = drive(engine, _prompts(n, prompt_len, model.config.vocab_size, 1000 * r + n), _greedy(max_tokens))
            if n not in best or res["tok_per_s"] > best[n]["tok_per_s"]:
                best[n] = res
            log(f"  throughput N={n:3d} round {r}: {res['tok_per_s']:.0f} tok/s "
                f"(decode phase {res['decode_tok_per_s'] or 0:.0f}), {res['wall_s']:.1f} s")
    rows = [{"concurrency": n, **best[n]} for n in concurrency]
    one = best[concurrency[0]]
    for row in rows:
        row["vs_1"] = row["tok_per_s"] / one["tok_per_s"]
        if row["decode_tok_per_s"] and one["decode_tok_per_s"]:
            row["decode_vs_1"] = row["decode_tok_per_s"] / one["decode_tok_per_s"]
    return {"prompt_len": prompt_len, "max_tokens": max_tokens, "rows": rows}


def _per_token(model) -> int:
    return PagedCache.bytes_per_token(model, model.model.embed_tokens.weight.dtype)


@torch.inference_mode()
def overhead(model, *, prompt_len=256, max_tokens=64, rounds=5, log=print) -> dict:
    """ms/token of the decode (1st to last token) of one request: engine vs dsv2.generate, alternating."""
    engine = Engine(model, max_num_seqs=1, prefix_caching=False,
                    cache_memory=2 * (prompt_len + max_tokens + 64) * _per_token(model))
    prompt = _prompts(1, prompt_len, model.config.vocab_size, 5)[0]

    def by_engine() -> tuple[float, list[int]]:
        stamps, toks = [], []
        engine.add_request("overhead", prompt, _greedy(max_tokens))
        while engine.has_unfinished():
            for o in engine.step():
                stamps.append(time.perf_counter())
                toks += o.outputs[0].new_token_ids
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1), toks

    def by_generate() -> tuple[float, list[int]]:
        stamps = []
        toks = dsv2.generate(model, [prompt], max_tokens, eos_token_id=[],
                             callback=lambda i, t: stamps.append(time.perf_counter()))[0]
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1), toks

    peers = {"engine": by_engine, "dsv2.generate": by_generate}
    samples: dict[str, list[float]] = {k: [] for k in peers}
    outputs = {}
    for _ in range(rounds + 1):  # the first round warms up
        for k, fn in peers.items():
            s, outputs[k] = fn()
            samples[k].append(s)
    ms = {k: 1e3 * min(v[1:]) for k, v in samples.items()}
    res = {"prompt_len": prompt_len, "max_tokens": max_tokens, "ms_per_token": ms,
           "ratio": ms["engine"] / ms["dsv2.generate"], "same_tokens": outputs["engine"] == outputs["dsv2.generate"]}
    log(f"  overhead: engine {ms['engine']:.2f} ms/token, dsv2.generate {ms['dsv2.generate']:.2f}: "
        f"{res['ratio']:.3f}x; same tokens: {res['same_tokens']}")
    return res


@torch.inference_mode()
def paged(model, *, batch=16, shortest=256, longest=4096, steps=24, log=print) -> dict:
    """engine.step() at batch 16 over ragged contexts vs a contiguous padded cache with the same rows."""
    ctxs = torch.linspace(shortest, longest, batch).round().long().tolist()
    per_token = _per_token(model)
    engine = Engine(model, max_num_seqs=batch, prefix_caching=False,
                    cache_memory=(sum(ctxs) + batch * (2 * steps + 64 + 64)) * per_token)
    prompts = [p[:n] for p, n in zip(_prompts(batch, longest, model.config.vocab_size, 7), ctxs, strict=True)]
    log(f"  paged: prefilling {sum(ctxs)} tokens through the engine ({batch} sequences, {shortest}..{longest})")
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, _greedy(2 * steps + 4))
    while any(s.num_computed < s.num_tokens - 1 or not s.output_ids
              for r in engine._requests.values() for s in r.seqs):
        engine.step()
    seqs = [r.seqs[0] for r in engine._requests.values()]
    # the contiguous peer: a left-padded KVCache with each sequence's rows, read out of the engine's blocks
    dtype = engine.cache.storage.dtype
    width = max(s.num_computed for s in seqs)
    kv = model.new_cache(batch, width + steps + 2, dtype=dtype)
    bs, rows = engine.cache.block_size, engine.cache.storage.flatten(1, 2)  # [L, slots, X]
    for b, s in enumerate(seqs):
        n = s.num_computed
        slots = torch.tensor([s.blocks[p // bs] * bs + p % bs for p in range(n)])
        kv.storage[:, b, width - n:width] = rows[:, slots]
        kv.valid[b, width - n:width] = True
    kv.length, kv.padded = width, True
    last = torch.tensor([[s.token_ids[-1]] for s in seqs])

    def contiguous():
        nonlocal last
        logits = model(last, cache=kv)[:, -1]
        last = logits.argmax(-1, keepdim=True)

    fns = {"engine.step (paged)": engine.step, "model + contiguous cache": contiguous}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    ms = {k: 1e3 * min(v[2:]) for k, v in samples.items()}
    ratio = ms["engine.step (paged)"] / ms["model + contiguous cache"]
    log("  paged: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()) + f": {ratio:.3f}x")
    for r in list(engine._requests):
        engine.abort(r)
    return {"batch": batch, "contexts": ctxs, "ms_per_step": ms, "ratio": ratio, "padded_width": width}


@torch.inference_mode()
def prefix(model, *, prompt_len=2048, rounds=3, log=print) -> dict:
    engine = Engine(model, max_num_seqs=4, cache_memory=4 * (prompt_len + 256) * _per_token(model))

    def ttft(prompt, name) -> tuple[float, int]:
        t0 = time.perf_counter()
        engine.add_request(name, prompt, _greedy(1))
        while True:
            for o in engine.step():
                if o.outputs[0].new_token_ids:
                    dt = time.perf_counter() - t0
                    while engine.has_unfinished():
                        engine.step()
                    return dt, o.num_cached_tokens
    ttft(_prompts(1, 64, model.config.vocab_size, 1)[0], "warm-up")
    first, again, cached = [], [], 0
    for r in range(rounds):
        prompt = _prompts(1, prompt_len, model.config.vocab_size, 100 + r)[0]
        first.append(ttft(prompt, f"first-{r}")[0])
        t, cached = ttft(prompt, f"again-{r}")
        again.append(t)
    res = {"prompt_len": prompt_len, "first_ms": 1e3 * min(first), "again_ms": 1e3 * min(again),
           "cached_tokens": cached, "block_size": engine.cache.block_size}
    res["ratio"] = res["again_ms"] / res["first_ms"]
    log(f"  prefix: TTFT first {res['first_ms']:.0f} ms, again {res['again_ms']:.1f} ms ({cached} tokens cached): "
        f"{res['ratio']:.3f}x")
    return res


@torch.inference_mode()
def mla_vs_mha(dtype: torch.dtype, *, budgets_mib=(16, 32, 64, 128), prompt_len=256, max_tokens=256,
               log=print) -> dict:
    """Per budget: blocks for the budget, as many requests as fit without preemption, decode-phase tokens/s."""
    out: dict = {"budgets_mib": list(budgets_mib), "prompt_len": prompt_len, "max_tokens": max_tokens, "rows": []}
    seq_tokens = prompt_len + max_tokens
    for kind in ("mla", "mha"):
        cfg = common.bench_config().replace(attention_type=kind, num_attention_heads=16, num_key_value_heads=16)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = dsv2.DeepseekV2(cfg)
        model = model.to_empty(device="cpu")
        model.init_weights()
        model = model.to(dtype).eval()
        per_token = _per_token(model)
        out.setdefault("bytes_per_token", {})[kind] = per_token
        out.setdefault("params", {})[kind] = model.num_parameters()
        drive(Engine(model, cache_memory=8 * MIB), _prompts(1, 16, cfg.vocab_size, 0), _greedy(4))  # warm-up
        for mib in budgets_mib:
            engine = Engine(model, cache_memory=mib * MIB, max_num_seqs=256, prefix_caching=False)
            bs = engine.cache.block_size
            capacity = engine.pool.num_blocks // -(-seq_tokens // bs)
            row = {"attention": kind, "budget_mib": mib, "capacity": capacity, "bytes_per_token": per_token}
            if capacity:
                res = drive(engine, _prompts(capacity, prompt_len, cfg.vocab_size, mib), _greedy(max_tokens))
                row.update(res)
                log(f"  {kind} {mib:4d} MiB: {capacity} sequences (peak running {res['peak_running']}, "
                    f"{res['preemptions']} preemptions), decode {res['decode_tok_per_s'] or 0:.0f} tok/s")
            else:
                log(f"  {kind} {mib:4d} MiB: not one sequence of {seq_tokens} tokens fits")
            out["rows"].append(row)
            del engine
            free_memory()
        del model
        free_memory()
    by = {(r["attention"], r["budget_mib"]): r for r in out["rows"]}
    for mib in budgets_mib:
        a, b = by[("mla", mib)], by[("mha", mib)]
        if b["capacity"] and b.get("decode_tok_per_s") and a.get("decode_tok_per_s"):
            a["vs_mha"] = {"capacity": a["capacity"] / b["capacity"],
                           "decode_tok_per_s": a["decode_tok_per_s"] / b["decode_tok_per_s"]}
    return out


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from . import engine_report

    ap = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes, results/engine-quick")
    ap.add_argument("--only", default=",".join(SUITES), help=f"comma list of {','.join(SUITES)}")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/engine)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--merge", action="store_true", help="keep the other suites' results already in OUT")
    ap.add_argument("--update-readme", action="store_true", help="replace the Engine section of benchmarks/README.md")
    ap.add_argument("--render", action="store_true", help="only rewrite the report from OUT/results.json")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    if set(only) - set(SUITES):
        ap.error(f"unknown suites {sorted(set(only) - set(SUITES))}; choose from {SUITES}")
    out = args.out or ROOT / "results" / ("engine-quick" if args.quick else "engine")
    readme = ROOT / "README.md" if args.update_readme else None
    if args.render:
        engine_report.write(json.loads((out / "results.json").read_text()), out, readme)
        return 0
    import os

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    res: dict = json.loads((out / "results.json").read_text()) if args.merge and (out / "results.json").exists() \
        else {}
    command = common.command_line("benchmarks.engine", argv)
    res["commands"] = [c for c in res.get("commands", []) if c != command] + [command]
    res["stamp"] = common.stamp(threads)
    res["dtype"] = args.dtype
    dtype = DTYPES[args.dtype]
    log(f"stamp: {res['stamp']}")
    q = args.quick
    model = None
    if set(only) & {"throughput", "overhead", "paged", "prefix"}:
        cfg = common.bench_config()
        path = common.checkpoint(args.workdir, "bench", cfg)
        model = load_dsv2(path, dtype)
        res["model"] = {"description": common.describe_config(cfg), "params": model.num_parameters()}
    for name in only:
        log(f"{name}")
        stamp = {"date": common.stamp(threads)["date"], "load_start": round(common.loadavg(), 2)}
        if name == "throughput":
            sec = throughput(model, concurrency=(1, 4) if q else (1, 4, 16, 64), max_tokens=16 if q else 128,
                             rounds=1 if q else 2, log=log)
        elif name == "overhead":
            sec = overhead(model, max_tokens=16 if q else 64, rounds=2 if q else 5, log=log)
        elif name == "paged":
            sec = paged(model, batch=4 if q else 16, longest=512 if q else 4096, steps=6 if q else 24, log=log)
        elif name == "prefix":
            sec = prefix(model, prompt_len=256 if q else 2048, rounds=1 if q else 3, log=log)
        else:
            sec = mla_vs_mha(dtype, budgets_mib=(4, 8) if q else (16, 32, 64, 128), prompt_len=64 if q else 256,
                             max_tokens=16 if q else 256, log=log)
        stamp["load_end"] = round(common.loadavg(), 2)
        sec["stamp"] = stamp
        res[name] = sec
        free_memory()
    engine_report.write(common.to_jsonable(res), out, readme)
    log(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
