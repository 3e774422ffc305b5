"""What LoRA costs and saves: `python -m benchmarks.lora`.

1. Fine-tuning the peers benchmark's model (V2-Lite-shaped, 4 layers, 220M parameters): full fine-tuning against
   LoRA on attention, and on attention + every routed expert, each a `dsv2 train --init-from` subprocess of the
   same steps on the same data: the process's peak RSS (wait4's ru_maxrss) and tokens/s (median of the steps after
   the first two).
2. Serving: the engine (in-process, bf16) decoding the same requests base-only and spread over 4 adapters + the
   base model (rank 16, attention + experts), at the same concurrency, rounds interleaved: generated tokens/s.
3. A LoRA run that learns: the main job's checkpoint (`dsv2 train`, runs/tiny) fine-tuned on a synthetic instruction
   set (half chats, half prompt/completion: after five Python keywords, answer the keyword that follows the last one
   in keyword.kwlist): the held-out answer tokens' loss before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import dsv2
from dsv2 import Engine, SamplingParams
from dsv2.cpu import ops
from dsv2.lora import add_lora, lora_parameters, save_adapter

from . import common
from .peers import ROOT, prepare

VARIANTS = {"full fine-tuning": [], "LoRA r16 attention": ["--lora", "--lora-targets", "attention"],
            "LoRA r16 attention + experts": ["--lora", "--lora-targets", "attention,experts"]}


def _corpus(workdir: Path) -> Path:
    d = workdir / "lora-corpus"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 9, (2000,), generator=g)]
    for i in range(100):
        (d / f"doc{i}.txt").write_text(" ".join(words[int(j)] for j in torch.randint(0, 2000, (3000,), generator=g)))
    return d


def train_cost(ckpt: Path, workdir: Path, steps: int, log) -> dict:
    data, out = _corpus(workdir), {}
    for name, flags in VARIANTS.items():
        run = workdir / f"lora-train-{len(out)}"
        cmd = [sys.executable, "-m", "dsv2", "train", "--init-from", str(ckpt), "--data", str(data), "--out",
               str(run), "--overwrite", "--max-steps", str(steps), "--batch-size", "4", "--seq-len", "256",
               "--warmup-steps", "1", "--eval-every", str(steps), "--save-every", str(10 * steps),
               "--sample-tokens", "0", *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise RuntimeError(f"{name}: {proc.stderr.read()[-2000:]}")
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(r["tokens_per_s"] for r in records[2:])
        out[name] = {"peak_rss_MB": usage.ru_maxrss / 1024, "tokens_per_s": tps}
        log(f"{name}: peak RSS {usage.ru_maxrss / 1024:.0f} MB, {tps:.0f} tokens/s")
    return out


def adapters(ckpt: Path, workdir: Path, n: int) -> dict[str, Path]:
    out = {}
    for i in range(n):
        model = dsv2.from_pretrained(ckpt, dtype=torch.float32)
        add_lora(model, "attention,experts", r=16, seed=i)
        with torch.no_grad():
            for k, p in lora_parameters(model).items():
                if "lora_B" in k:
                    p.normal_(0, 0.01)
        out[f"a{i}"] = workdir / f"lora-adapter-{i}"
        save_adapter(model, out[f"a{i}"], alpha=32.0)
    return out


@torch.inference_mode()
def serve_cost(ckpt: Path, workdir: Path, concurrency: int, tokens: int, rounds: int, log) -> dict:
    paths = adapters(ckpt, workdir, 4)
    engine = Engine.from_pretrained(ckpt, dtype=torch.bfloat16, max_loras=4, max_lora_rank=16,
                                    max_num_seqs=concurrency, prefix_caching=False)
    for name, p in paths.items():
        engine.add_adapter(name, p)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 8000, (128,), generator=g).tolist() for _ in range(concurrency)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    mixes = {"base only": [None] * concurrency,
             "4 adapters + base": [[None, *paths][i % 5] for i in range(concurrency)]}
    best = dict.fromkeys(mixes, 0.0)
    for r in range(rounds + 1):  # the first round warms up
        for name, mix in mixes.items():
            for i, (ids, adapter) in enumerate(zip(prompts, mix, strict=True)):
                engine.add_request(f"{name}-{r}-{i}", engine.admit(ids, params, adapter=adapter))
            t0 = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            tps = concurrency * tokens / (time.perf_counter() - t0)
            if r:
                best[name] = max(best[name], tps)
            log(f"round {r} {name}: {tps:.0f} tokens/s")
    return {"concurrency": concurrency, "new_tokens": tokens, "tokens_per_s": best,
            "ratio": best["4 adapters + base"] / best["base only"]}


def instructions(path: Path, n: int = 2000) -> Path:
    import keyword
    import random

    words, rnd, lines = keyword.kwlist, random.Random(0), []
    for i in range(n):
        ask = [rnd.choice(words) for _ in range(5)]
        answer = words[(words.index(ask[-1]) + 1) % len(words)]
        rec = ({"prompt": " ".join(ask) + " ->", "completion": " " + answer} if i % 2 else
               {"messages": [{"role": "user", "content": " ".join(ask)}, {"role": "assistant", "content": answer}]})
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def learn(base_run: Path, workdir: Path, log) -> dict:
    ckpts = sorted((base_run / "checkpoints").glob("step_*"))
    if not ckpts:
        raise SystemExit(f"{base_run} has no checkpoint: run the main job first (dsv2 train)")
    base = workdir / "lora-demo-base"  # the main job's checkpoint, with a chat template for the chat records
    base.mkdir(parents=True, exist_ok=True)
    for f in ckpts[-1].iterdir():
        if f.name != "tokenizer_config.json":
            (base / f.name).unlink(missing_ok=True)
            os.link(f, base / f.name)
    cfg = json.loads((ckpts[-1] / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    data = instructions(workdir / "lora-demo.jsonl")
    cmd = ["dsv2", "train", "--init-from", str(base), "--lora", "--lora-targets", "all-linear", "--data", str(data),
           "--out", str(workdir / "lora-demo"), "--overwrite", "--max-steps", "300", "--batch-size", "16",
           "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "20", "--eval-every", "100", "--sample-tokens", "0"]
    log(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    lines = [x for x in r.stdout.splitlines() if "validation loss" in x]
    records = [json.loads(x) for x in (workdir / "lora-demo" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return {"command": " ".join(cmd), "printed": lines, "val_loss": val}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "lora")
    ap.add_argument("--base-run", type=Path, default=Path("runs/tiny"), help="the main job's run (part 3)")
    args = ap.parse_args(argv)
    log = common.logger()
    ckpt = prepare(args.workdir)
    res = {"stamp": common.stamp(os.cpu_count() or 2), "cpu": ops.cpu_name(),
           "command": common.command_line("benchmarks.lora", argv),
           "learn": learn(args.base_run, args.workdir, log),
           "train": train_cost(ckpt, args.workdir, args.steps, log),
           "serve": serve_cost(ckpt, args.workdir, args.concurrency, args.tokens, args.rounds, log)}
    t, s = res["train"], res["serve"]
    full = t["full fine-tuning"]
    lines = ["| fine-tuning, batch 4 x 256 tokens | peak RSS | vs full | tokens/s | vs full |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['peak_rss_MB']:.0f} MB | {v['peak_rss_MB'] / full['peak_rss_MB']:.2f}x | "
              f"{v['tokens_per_s']:.0f} | {v['tokens_per_s'] / full['tokens_per_s']:.2f}x |" for k, v in t.items()]
    lines += ["", f"| serving, {s['concurrency']} concurrent requests, {s['new_tokens']} new tokens each | tokens/s |",
              "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in s["tokens_per_s"].items()]
    lines.append(f"\nmixed adapters / base only: {s['ratio']:.2f}x")
    lines += ["", "LoRA on the main job's checkpoint, synthetic instruction set (held-out answer tokens):", "",
              f"    {res['learn']['command']}", "", *(f"    {x}" for x in res["learn"]["printed"])]
    common.write_results(args.out, "lora", res, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
