"""The released DeepSeek-V2-Lite's shape, served quantized on this machine: `python -m benchmarks.quant_full`.

A full-size V2-Lite-shaped bf16 checkpoint (27 layers, every released dimension, 15.7B parameters, 31 GB; random
weights, written tensor by tensor in 4 GB shards, never a whole model in memory) does not fit in 23 GB of RAM as
bf16. `dsv2 serve --quantize int8|int4` quantizes it while loading (a tensor at a time) and serves it: this
measures the server process's peak RSS after loading and after serving, the load time, and batch-1 decode ms/token
through the OpenAI API (streamed /v1/completions, a 256-token prompt, 64 tokens). bf16 cannot run here, so its
figure is what its active bytes per token would take at the memory bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from tokenizers import AddedToken, Tokenizer

import dsv2
from dsv2.checkpoint.hf_names import official_names, slot
from dsv2.checkpoint.io import INDEX_FILE
from dsv2.cpu import ops
from dsv2.files import atomic_write, write_safetensors

from . import common
from .peers import ROOT, prepare
from .serve import LOGS, free_port, one, wait_ready

SHARD_BYTES = 4 << 30


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """V2-Lite's config with random bf16 weights (N(0, 0.02), norms 1), a tensor at a time, in shards."""
    cfg = dsv2.get_config("deepseek-v2-lite", bos_token_id=0, eos_token_id=1)
    if (path / INDEX_FILE).exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = dsv2.DeepseekV2(cfg)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        name = f"shard-{len(files):05d}.safetensors"
        write_safetensors(path / name, shard, metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard, size = {}, 0

    for official, (name, part, j) in official_names(params).items():
        shape = tuple(slot(params[name], part, j).shape)
        t = torch.ones(shape, dtype=torch.bfloat16) if "norm" in official else \
            torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        if size and size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[official] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    n = len(files)
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(path / name, path / final)
        weight_map.update(dict.fromkeys(keys, final))
    atomic_write(path / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    d = cfg.to_dict()
    d["torch_dtype"] = "bfloat16"
    atomic_write(path / "config.json", json.dumps(d, indent=2))
    # token-id prompts; every id gets a text so the stream carries one piece per token (as benchmarks.peers does)
    tok = Tokenizer.from_file(str(prepare(ROOT / "results" / "tmp") / "tokenizer.json"))
    tok.add_tokens([AddedToken(f"<x{i}>", normalized=False) for i in range(tok.get_vocab_size(), cfg.vocab_size)])
    tok.save(str(path / "tokenizer.json"))
    return path


def rss(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    get = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
           if line.startswith(("VmHWM", "VmRSS"))}
    return {"peak_GB": get["VmHWM"] / 1e9, "now_GB": get["VmRSS"] / 1e9}


def serve_one(ckpt: Path, method: str, log) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    proc = _launch_quantized(ckpt, method, port)
    try:
        wait_ready(proc, url, timeout=3600)
        load_s = time.time() - t0
        loaded = rss(proc.pid)
        log(f"  {method}: ready after {load_s:.0f} s, {loaded}")
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, 100000, (256,), generator=g).tolist() for _ in range(3)]

        async def go():
            async with httpx.AsyncClient(timeout=600) as client:
                out = []
                for p in prompts:
                    out.append(await one(client, url, "bench", p, 64))
                return out

        results = asyncio.run(go())
        ok = [r for r in results if r.ok]
        tpot = [1e3 * (r.latency - r.ttft) / max(r.tokens - 1, 1) for r in ok]
        served = rss(proc.pid)
        log(f"  {method}: TPOT {tpot} ms, {served}")
        return {"load_s": load_s, "rss_after_load": loaded, "rss_after_serving": served,
                "tpot_ms": min(tpot) if tpot else None, "ttft_s": min(r.ttft for r in ok) if ok else None,
                "errors": [r.error for r in results if not r.ok]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a server that does not stop is killed
            proc.kill()


def _launch_quantized(ckpt: Path, method: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv2", "serve", "--model", str(ckpt), "--port", str(port), "--dtype", "bf16",
           "--quantize", method, "--served-model-name", "bench", "--max-model-len", "4096", "--cache-memory", "1GiB",
           "--max-num-seqs", "4", "--log-level", "warning"]
    log_file = open(LOGS / f"dsv2-{method}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_file.name
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quant_full", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="int8,int4")
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quant")
    args = ap.parse_args(argv)
    log = common.logger()

    LOGS.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(args.workdir / "v2-lite-random")
    log(f"checkpoint: {ckpt} ({sum(f.stat().st_size for f in ckpt.glob('*.safetensors')) / 1e9:.1f} GB)")
    res = {"stamp": common.stamp(os.cpu_count() or 2), "cpu": ops.cpu_name(),
           "command": common.command_line("benchmarks.quant_full", argv), "bandwidth": common.memory_bandwidth(),
           "methods": {}}
    cfg = dsv2.get_config("deepseek-v2-lite")
    with torch.device("meta"):
        meta = dsv2.DeepseekV2(cfg)
    from .decode import active_weight_bytes

    res["bf16_active_bytes"] = active_weight_bytes(meta.to(torch.bfloat16))
    res["bf16_bound_ms"] = 1e3 * res["bf16_active_bytes"] / (res["bandwidth"]["read_GBps"] * 1e9)
    for method in args.methods.split(","):
        res["methods"][method] = serve_one(ckpt, method, log)
    lines = ["| V2-Lite shape | load s | peak RSS after load | peak RSS after serving | TPOT ms | bf16 bound / TPOT |",
             "|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        ratio = res["bf16_bound_ms"] / r["tpot_ms"] if r["tpot_ms"] else math.nan
        lines.append(f"| {m} | {r['load_s']:.0f} | {r['rss_after_load']['peak_GB']:.1f} GB | "
                     f"{r['rss_after_serving']['peak_GB']:.1f} GB | {r['tpot_ms']:.1f} | {ratio:.2f}x |")
    lines.append(f"\nbf16 (does not fit): {res['bf16_active_bytes'] / 1e9:.2f} GB read per token = "
                 f"{res['bf16_bound_ms']:.1f} ms at the measured bandwidth.")
    common.write_results(args.out, "full", res, "\n".join(lines),
                         f"; read bandwidth {res['bandwidth']['read_GBps']:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
