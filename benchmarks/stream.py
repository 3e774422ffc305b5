"""One stream, three ways: served TPOT against in-process decode: `python -m benchmarks.stream [--update-readme]`.

What a user who serves pays per token over what `dsv2.generate` costs in the same process, and what llama.cpp's
server costs on the same weights. Per dtype, the peers benchmark's checkpoint (benchmarks/peers.prepare) and one
request: a 256-token prompt of token ids, 65 greedy tokens (ignore_eos), asked of
- in-process: `dsv2.generate` on the model loaded here (ms/token from the 1st to the last token, as TPOT counts);
- dsv2 serve: the same request over HTTP, streamed (/v1/completions), TPOT = (latency - TTFT) / (tokens - 1);
- llama-server: the same on llama.cpp's GGUF conversion of the weights (flash attention on), where it is built.
The servers start once and stay idle while the others run; the three take turns within each round, and the
figures are the medians (and bests) over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

import dsv2

from . import common
from .peers import prepare
from .serve import LOGS, free_port, installed, launch, one, wait_ready

ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- stream-benchmarks:begin -->", "<!-- stream-benchmarks:end -->"
PROMPT, NEW = 256, 65


def in_process(model, prompt: list[int]) -> float:
    """ms per token from the first generated token to the last."""
    times = []
    dsv2.generate(model, [prompt], NEW, eos_token_id=[], callback=lambda i, t: times.append(time.perf_counter()))
    return 1e3 * (times[-1] - times[0]) / (len(times) - 1)


def served(url: str, prompt: list[int]) -> float:
    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            return await one(client, url, "bench", prompt, NEW)

    r = asyncio.run(go())
    if not r.ok or r.tokens != NEW:
        raise RuntimeError(f"request failed: {r.error or f'{r.tokens} tokens'}")
    return 1e3 * (r.latency - r.ttft) / (r.tokens - 1)


def run_dtype(ckpt: Path, dname: str, rounds: int, threads: int, log) -> dict:
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, vocab, (PROMPT,), generator=g).tolist()
    model = common.load_dsv2(ckpt, common.DTYPES[dname])
    peers: dict[str, object] = {"in-process": lambda: in_process(model, prompt)}
    procs, notes = [], {}
    for name in ("dsv2", "llama.cpp"):
        why = installed(name)
        if why:
            notes[name] = why
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = launch(name, ckpt, dname, port, PROMPT + NEW + 64, threads, log)
        procs.append(proc)
        wait_ready(proc, url)
        peers["dsv2 serve" if name == "dsv2" else "llama-server"] = lambda url=url: served(url, prompt)
    try:
        samples: dict[str, list[float]] = {k: [] for k in peers}
        for f in peers.values():  # warm-up: first-use costs (kernels, caches) outside the rounds
            f()
        for r in range(rounds):
            for k, f in peers.items():
                samples[k].append(f())
            log(f"  {dname} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.items()))
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"ms_per_token": {k: {"median": statistics.median(v), "best": min(v), "samples": v}
                             for k, v in samples.items()}, "skipped": notes}


def markdown(res: dict) -> str:
    s = res["stamp"]
    lines = [f"Machine: {s['cpu']} · {s['threads']} threads · {s['date']} · command `{res['command']}`", "",
             f"One request, {PROMPT}-token prompt, {NEW} greedy tokens; ms/token (TPOT), median of "
             f"{res['rounds']} interleaved rounds (best in brackets).", "",
             "| dtype | in-process dsv2.generate | dsv2 serve | served / in-process | llama-server | "
             "dsv2 serve / llama-server |", "|---|---|---|---|---|---|"]
    for dname, d in res["dtypes"].items():
        m = d["ms_per_token"]

        def cell(k, m=m):
            return f"{m[k]['median']:.1f} ({m[k]['best']:.1f})" if k in m else "—"

        def ratio(a, b, m=m):
            return f"{m[a]['median'] / m[b]['median']:.2f}x" if a in m and b in m else "—"

        lines.append(f"| {dname} | {cell('in-process')} | {cell('dsv2 serve')} | {ratio('dsv2 serve', 'in-process')}"
                     f" | {cell('llama-server')} | {ratio('dsv2 serve', 'llama-server')} |")
    skipped = {k: v for d in res["dtypes"].values() for k, v in d["skipped"].items()}
    lines += [f"\n{k}: skipped ({v})" for k, v in skipped.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "stream")
    ap.add_argument("--update-readme", action="store_true", help="replace the section in benchmarks/README.md")
    args = ap.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if set(dtypes) - set(common.DTYPES):
        ap.error(f"dtypes must be among {sorted(common.DTYPES)}")
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    LOGS.mkdir(parents=True, exist_ok=True)
    ckpt = prepare(args.workdir)
    res = {"command": common.command_line("benchmarks.stream", argv), "stamp": common.stamp(args.threads),
           "rounds": args.rounds, "dtypes": {d: run_dtype(ckpt, d, args.rounds, args.threads, log) for d in dtypes}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(common.to_jsonable(res), indent=1))
    md = markdown(res)
    (args.out / "results.md").write_text(md + "\n")
    if args.update_readme:
        common.replace_section(ROOT / "README.md", BEGIN, END, md)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
