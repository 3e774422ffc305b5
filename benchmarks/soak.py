"""A soak of `dsv2 serve` under hostile clients: `python -m benchmarks.soak [--duration 60] [--update-readme]`.

It starts `dsv2 serve` on 127.0.0.1 on a small random model (the tiny preset, a byte-level BPE tokenizer and a chat
template), then runs `--normal` well-behaved streaming clients (token-id prompts, greedy, ignore_eos, one request
after another) for `--duration` seconds alone, and again with hostile clients mixed in, from a process of their
own (so that their client-side work never delays the normal clients' clocks), all bounded in number, each HTTP
one sending its next request 0.5 s after an answer (a stall of the old server took seconds a request):

    stop flood     3,500 stop strings of 1 KB (a 3.5 MB body); and 4 of 256 characters, 300 tokens, streamed
    big prompts    3.9 MB texts to /v1/completions, chat and /tokenize; texts just under the prompt-size bound
    logprobs       n=128, logprobs=20, max_tokens=500; a chat with top_logprobs=20 and 200 tokens, not streamed
    slowloris      20 connections sending their headers a byte a second (reconnecting when dropped)
    short bodies   4 connections whose Content-Length is larger than the body they send

It reports the normal clients' TPOT (per request: (latency - TTFT) / (tokens - 1)) and TTFT, alone and with the
hostile clients, the slowest /health answer (polled every 100 ms), and what the hostile clients got; the target is
a p99 TPOT with hostile clients at most 1.5x the p99 alone. Results: benchmarks/results/soak/ (and, with
--update-readme, the soak section of benchmarks/README.md). About 2 x duration + 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

from . import common

ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
TARGET = 1.5
PACE_S = 0.5
"""Seconds each hostile HTTP client waits between its requests (each is one connection: 8 in all)."""
MAX_MODEL_LEN = 1024
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
WORDS = ("the model serves tokens while hostile clients probe its limits; naïve café résumé 日本語 emoji 🙂 "
         "def f(x): return x * 2 # comment").split()


def make_checkpoint(path: Path) -> Path:
    """The tiny preset (4 layers, width 128, 16 experts) with a 1,024-token byte-level BPE tokenizer."""
    import dsv2
    from dsv2.presets import get_config
    from dsv2.training.data.tokenizer import save_tokenizer, train_tokenizer

    if (path / "config.json").exists() and (path / "tokenizer_config.json").exists():
        return path
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(400)]
    tok = train_tokenizer(texts, vocab_size=1024, min_frequency=2)
    cfg = get_config("tiny", vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id("<|bos|>"),
                     eos_token_id=tok.token_to_id("<|eos|>"))
    torch.manual_seed(0)
    dsv2.save_pretrained(dsv2.DeepseekV2(cfg).eval(), path)
    save_tokenizer(tok, path)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": TEMPLATE}))
    return path


def prompt_bound(ckpt: Path) -> int:
    """The server's prompt-size bound (bytes) for this checkpoint: its TokenTable's."""
    from dsv2.serve.tokens import TokenTable
    from dsv2.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    return TokenTable(tok, tok.get_vocab_size()).max_prompt_bytes(MAX_MODEL_LEN)


# -- the normal clients -------------------------------------------------------------------------------------------
async def normal_client(client: httpx.AsyncClient, url: str, vocab: int, seed: int, deadline: float, out: list
                        ) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        body = {"model": "soak", "prompt": [rng.randrange(3, vocab) for _ in range(64)], "max_tokens": 64,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start, first, tokens = time.perf_counter(), None, 0
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    out.append({"error": f"{r.status_code} {(await r.aread())[:200]!r}"})
                    await asyncio.sleep(1.0)
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif first is None and chunk["choices"][0]["text"]:
                        first = time.perf_counter()
        except httpx.HTTPError as e:
            out.append({"error": type(e).__name__})
            await asyncio.sleep(1.0)
            continue
        end = time.perf_counter()
        if first is not None and tokens > 1:
            out.append({"ttft": first - start, "tpot": (end - first) / (tokens - 1)})


async def health_probe(url: str, deadline: float, out: list) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            ok = (await client.get(url + "/health")).status_code == 200
            out.append(time.perf_counter() - t if ok else float("inf"))
            await asyncio.sleep(0.1)


async def normal_phase(url: str, vocab: int, clients: int, duration: float) -> dict:
    deadline = time.monotonic() + duration
    results: list = []
    health: list = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(health_probe(url, deadline, health),
                             *(normal_client(client, url, vocab, 1000 + i, deadline, results)
                               for i in range(clients)))
    ok = [r for r in results if "tpot" in r]

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"mean": 1e3 * statistics.fmean(xs), "p50": 1e3 * statistics.median(xs),
                "p99": 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], "max": 1e3 * xs[-1]}

    return {"requests": len(ok), "errors": dict(Counter(str(r["error"]) for r in results if "error" in r)),
            "tpot_ms": stats([r["tpot"] for r in ok]), "ttft_ms": stats([r["ttft"] for r in ok]),
            "health_max_ms": 1e3 * max(health)}


# -- the hostile clients (a process of their own) -----------------------------------------------------------------
async def _http_loop(name: str, client: httpx.AsyncClient, url: str, path: str, body: bytes, deadline: float,
                     got: dict, stream: bool = False) -> None:
    headers = {"content-type": "application/json"}
    while time.monotonic() < deadline:
        try:
            if stream:
                async with client.stream("POST", url + path, content=body, headers=headers) as r:
                    async for _ in r.aiter_bytes():
                        pass
            else:
                r = await client.post(url + path, content=body, headers=headers)
            got[name][str(r.status_code)] += 1
        except httpx.HTTPError as e:
            got[name][type(e).__name__] += 1
        await asyncio.sleep(PACE_S)


async def _slow_connection(name: str, port: int, first: bytes, drip: bytes, deadline: float, got: dict) -> None:
    """Connect, send `first`, then `drip` a byte a second until the server closes; again until the deadline."""
    while time.monotonic() < deadline:
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        answer, i = b"", 0
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=1.0)
                if not data:
                    break
                answer += data
            except TimeoutError:
                if drip:
                    writer.write(drip[i % len(drip):i % len(drip) + 1])
                    i += 1
            except OSError:
                break
        writer.close()
        if answer:
            got[name][f"{answer[9:12].decode()} after {time.monotonic() - start:.0f} s"] += 1
        elif time.monotonic() < deadline:
            got[name][f"closed after {time.monotonic() - start:.0f} s"] += 1
        else:
            got[name]["open when the phase ended"] += 1


def _bodies(bound: int) -> dict[str, tuple[str, bytes, bool]]:
    big = "naïve café 日本語 " * 170_000  # 3.9 MB
    near = ("naïve café 日本語 " * (bound // 23 + 1))[: bound // 2]  # under the bound in bytes, far over in tokens
    chat = [{"role": "user", "content": "hello"}]

    def j(body: dict) -> bytes:
        return json.dumps({"model": "soak", **body}, ensure_ascii=False).encode()

    return {
        "stop flood (3,500 x 1 KB)": ("/v1/completions", j({"prompt": "hi", "max_tokens": 300,
                                                            "stop": ["x" * 1000] * 3500}), False),
        "stop 4 x 256 chars, 300 tokens": ("/v1/completions", j({"prompt": "hi", "max_tokens": 300,
                                                                "stop": ["é" * 256] * 4, "stream": True,
                                                                "ignore_eos": True}), True),
        "3.9 MB prompt, completions": ("/v1/completions", j({"prompt": big}), False),
        "3.9 MB prompt, chat": ("/v1/chat/completions", j({"messages": [{"role": "user", "content": big}]}), False),
        "3.9 MB prompt, tokenize": ("/tokenize", j({"prompt": big}), False),
        "prompt under the byte bound": ("/v1/completions", j({"prompt": near}), False),
        "n=128 logprobs=20 max_tokens=500": ("/v1/completions", j({"prompt": "hi", "n": 128, "logprobs": 20,
                                                                   "max_tokens": 500}), False),
        "chat top_logprobs=20, 200 tokens": ("/v1/chat/completions", j({"messages": chat, "logprobs": True,
                                                                        "top_logprobs": 20, "max_tokens": 200,
                                                                        "ignore_eos": True}), False),
    }


async def _hostile(url: str, port: int, bound: int, deadline: float) -> dict:
    got: dict = {}
    tasks = []
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        for name, (path, body, stream) in _bodies(bound).items():
            got[name] = Counter()
            tasks.append(_http_loop(name, client, url, path, body, deadline, got, stream))
        slow = b"POST /v1/completions HTTP/1.1\r\n"
        got["slowloris (20 connections)"] = Counter()
        tasks += [_slow_connection("slowloris (20 connections)", port, slow, b"Host: 127.0.0.1\r\nX-A: b\r\n",
                                   deadline, got) for _ in range(20)]
        short = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"prompt\": ")
        got["short body (4 connections)"] = Counter()
        tasks += [_slow_connection("short body (4 connections)", port, short, b"", deadline, got) for _ in range(4)]
        await asyncio.gather(*tasks)
    return {k: dict(v) for k, v in got.items()}


def hostile_process(url: str, port: int, bound: int, duration: float, results) -> None:
    results.put(asyncio.run(_hostile(url, port, bound, time.monotonic() + duration)))


# -- the run ------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv2", "serve", "--model", str(ckpt), "--port", str(port), "--served-model-name",
           "soak", "--max-model-len", str(MAX_MODEL_LEN), "--num-blocks", "512", "--block-size", "16",
           "--max-num-seqs", "16", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dsv2 serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("dsv2 serve did not start")


def markdown(res: dict) -> str:
    a, h = res["alone"], res["hostile"]
    lines = [f"Soak ({res['stamp']['cpu']}, {res['stamp']['cores']} cores, {res['stamp']['date']}; the tiny preset, "
             f"{res['settings']['normal']} normal streaming clients, 64-token prompts, 64 greedy tokens each, "
             f"{res['settings']['duration']:.0f} s a phase)", "", "`" + res["command"] + "`", "",
             "| normal clients | requests | TPOT mean / p50 / p99 (ms) | TTFT p50 / p99 (ms) | slowest /health (ms) "
             "| errors |", "|---|---|---|---|---|---|"]
    for name, m in (("alone", a), ("with hostile clients", h)):
        t, f = m["tpot_ms"], m["ttft_ms"]
        lines.append(f"| {name} | {m['requests']} | {t['mean']:.1f} / {t['p50']:.1f} / {t['p99']:.1f} | "
                     f"{f['p50']:.0f} / {f['p99']:.0f} | {m['health_max_ms']:.0f} | {m['errors'] or 0} |")
    ratio = res["p99_tpot_ratio"]
    lines += ["", f"p99 TPOT with hostile clients / alone: **{ratio:.2f}x** (target <= {TARGET}x: "
              f"{'met' if ratio <= TARGET else 'missed'})", "", "| hostile client | what it got (count) |",
              "|---|---|"]
    for name, got in res["hostile_outcomes"].items():
        lines.append(f"| {name} | {', '.join(f'{k}: {v}' for k, v in sorted(got.items())) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds a phase")
    ap.add_argument("--normal", type=int, default=4, help="normal streaming clients")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "soak")
    ap.add_argument("--update-readme", action="store_true", help="replace the soak section of benchmarks/README.md")
    args = ap.parse_args(argv)
    work = ROOT / "results" / "tmp" / "soak"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work / "tiny")
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(ckpt, port, work / "server.log")
    try:
        asyncio.run(normal_phase(url, vocab, args.normal, 5.0))  # warm-up
        alone = asyncio.run(normal_phase(url, vocab, args.normal, args.duration))
        print(f"alone: {alone}", flush=True)
        outcomes = mp.get_context("spawn").Queue()
        hostile = mp.get_context("spawn").Process(target=hostile_process, args=(
            url, port, prompt_bound(ckpt), args.duration + 4, outcomes))
        hostile.start()
        time.sleep(2.0)  # the hostile clients under way
        mixed = asyncio.run(normal_phase(url, vocab, args.normal, args.duration))
        got = outcomes.get(timeout=args.duration + 120)
        hostile.join(30)
        print(f"with hostile clients: {mixed}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    res = {"command": common.command_line("benchmarks.soak", argv), "stamp": common.stamp(os.cpu_count() or 1),
           "settings": {"duration": args.duration, "normal": args.normal, "max_model_len": MAX_MODEL_LEN},
           "alone": alone, "hostile": mixed, "hostile_outcomes": got,
           "p99_tpot_ratio": mixed["tpot_ms"]["p99"] / alone["tpot_ms"]["p99"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    if args.update_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN not in text:
            raise SystemExit(f"{readme} has no {BEGIN} marker")
        head, rest = text.split(BEGIN, 1)
        readme.write_text(head + BEGIN + "\n" + md + "\n" + END + rest.split(END, 1)[1])
    return 0 if res["p99_tpot_ratio"] <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
