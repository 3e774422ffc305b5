"""How much quantization changes a trained model, as llama.cpp measures it: `python -m benchmarks.quant_accuracy`.

On held-out text (a training run's validation split, decoded to text), in windows of --ctx tokens whose second half
is scored (as llama-perplexity does), per scored token: the KL divergence of the quantized model's next-token
distribution from the bf16 model's, whether the two agree on the top token, and both perplexities. The same figures
for llama.cpp's Q8_0 / Q4_0 / Q4_K_M of the same weights (its converter's bf16 GGUF, `llama-quantize`,
`llama-perplexity --kl-divergence` against the bf16 GGUF's logits on the same text and context), and a sensitivity
table: int4 applied to one module family at a time (recipe.py's families), the rest in bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

import dsv2
from dsv2.cpu import ops
from dsv2.quant.formats import Scheme
from dsv2.quant.recipe import FAMILIES, INT4_MIX, Recipe, family
from dsv2.tokenizer import load_tokenizer

from . import common
from .peers import LLAMA_BIN, PEERS_TOOLS, ROOT

VARIANTS = {  # name -> recipe (None: the bf16 base)
    "int8 (per channel)": lambda: Recipe.build("int8"),
    "int8 g32": lambda: Recipe.build("int8", 32),
    "int4 g32, all families": lambda: Recipe.build("int4", 32, families={}),
    "int4 g64, all families": lambda: Recipe.build("int4", 64, families={}),
    "int4 g32 (default: dense, kv_a int8)": lambda: Recipe.build("int4", 32),
    "int8 + lm_head int8": lambda: Recipe.build("int8", lm_head=True),
    "int4 default + lm_head int8": lambda: Recipe.build("int4", families={**INT4_MIX, "lm_head": "int8"}),
}
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")


def held_out_text(run: Path, max_tokens: int) -> str:
    """The run's validation tokens, decoded (documents separated by the EOS id become blank lines)."""
    meta = json.loads((run / "data" / "meta.json").read_text())
    val = np.fromfile(run / "data" / "val.bin", dtype=meta["dtype"])[:max_tokens]
    tok = load_tokenizer(run / "data" / "tokenizer.json")
    docs, cur = [], []
    for t in val.tolist():
        if t == meta["eos_id"]:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return "\n\n".join(tok.decode(d) for d in docs if d)


@torch.inference_mode()
def logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of the scored positions (the second half of each window), [windows, ctx/2 - 1, vocab]."""
    half = windows.shape[1] // 2
    out = []
    for w in windows:
        logits = model(w[None], logits_at=torch.arange(half, windows.shape[1] - 1))
        out.append(F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), -1))
    return torch.stack(out)


def compare(base: torch.Tensor, q: torch.Tensor, targets: torch.Tensor) -> dict:
    kld = (base.exp() * (base - q)).sum(-1)
    nll_b, nll_q = (-lp.gather(-1, targets[..., None]).squeeze(-1) for lp in (base, q))
    return {"mean_kld": kld.mean().item(), "kld_p99": torch.quantile(kld.flatten(), 0.99).item(),
            "same_top": (base.argmax(-1) == q.argmax(-1)).float().mean().item(),
            "ppl_base": math.exp(nll_b.mean().item()), "ppl": math.exp(nll_q.mean().item()),
            "tokens": kld.numel()}


def run_dsv2(ckpt: Path, text: str, ctx: int, chunks: int, sensitivity: bool, log) -> dict:
    tok = load_tokenizer(ckpt / "tokenizer.json")
    ids = torch.tensor(tok.encode(text).ids)
    n = min(chunks, len(ids) // ctx)
    windows = ids[: n * ctx].view(n, ctx)
    half = ctx // 2
    targets = windows[:, half + 1:]
    base = logprobs(dsv2.from_pretrained(ckpt, dtype=torch.bfloat16), windows)
    out = {"windows": n, "ctx": ctx, "variants": {}, "sensitivity": {}}
    for name, recipe in VARIANTS.items():
        try:
            model = dsv2.from_pretrained(ckpt, dtype=torch.bfloat16, quantize=recipe())
        except dsv2.CheckpointError as e:
            log(f"  {name}: skipped ({e})")
            continue
        out["variants"][name] = compare(base, logprobs(model, windows), targets)
        out["variants"][name]["file_MB"] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
        log(f"  dsv2 {name}: {out['variants'][name]}")
    out["greedy"] = greedy_agreement(ckpt, windows[:4, :32], 256)
    log(f"  greedy agreement with bf16 over 256 generated tokens: {out['greedy']}")
    if sensitivity:
        int4 = Scheme.parse("int4", 32)
        for fam in FAMILIES:
            model = dsv2.from_pretrained(ckpt, dtype=torch.bfloat16, quantize=Recipe({fam: int4}))
            if not any(p for p in model.state_dict() if p.endswith("_q")):
                continue  # the model has no such modules (dense layers, shared experts)
            out["sensitivity"][fam] = compare(base, logprobs(model, windows), targets)
            out["sensitivity"][fam]["params"] = _family_params(ckpt, fam)
            log(f"  int4 {fam} only: {out['sensitivity'][fam]}")
    return out


@torch.inference_mode()
def greedy_agreement(ckpt: Path, prompts: torch.Tensor, n: int) -> dict:
    """The bf16 model's greedy continuations of a few prompts; per variant, how often its own top token equals the
    bf16 model's next token along them (teacher-forced: after a first difference free-running sequences part ways,
    and a position-wise match would measure that, not the model), and where its free-running greedy text first
    differs."""
    base = dsv2.from_pretrained(ckpt, dtype=torch.bfloat16)
    seqs = dsv2.generate(base, prompts.tolist(), max_new_tokens=n, eos_token_id=[])
    full = torch.tensor([p + s for p, s in zip(prompts.tolist(), seqs, strict=True)])
    P = prompts.shape[1]
    out = {}
    for name in ("int8 (per channel)", "int4 g32 (default: dense, kv_a int8)"):
        model = dsv2.from_pretrained(ckpt, dtype=torch.bfloat16, quantize=VARIANTS[name]())
        top = torch.stack([model(row[None, :-1], logits_at=torch.arange(P - 1, full.shape[1] - 1)).reshape(n, -1)
                           .argmax(-1) for row in full])
        free = dsv2.generate(model, prompts.tolist(), max_new_tokens=n, eos_token_id=[])
        first = [next((i for i, (a, b) in enumerate(zip(f, s, strict=True)) if a != b), n) for f, s in
                 zip(free, seqs, strict=True)]
        out[name] = {"teacher_forced": (top == full[:, P:]).float().mean().item(), "first_difference": first}
    return out


def _family_params(ckpt: Path, fam: str) -> int:
    """Parameters of a family's weights in the checkpoint (from the stored shapes)."""
    total = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.endswith(".weight") and family(k.removesuffix(".weight")) == fam:
                    total += math.prod(h.get_slice(k).get_shape())
    return total


def run_llama(ckpt: Path, text_file: Path, ctx: int, chunks: int, workdir: Path, log) -> dict:
    bf16 = workdir / f"{ckpt.name}-bf16.gguf"
    if not bf16.exists():
        log(f"  converting {ckpt} to {bf16.name}")
        subprocess.run([sys.executable, str(PEERS_TOOLS / "convert_gguf.py"), str(ckpt), "--outtype", "bf16",
                        "--outfile", str(bf16)], check=True, capture_output=True)
    base_logits = workdir / f"{ckpt.name}-base.kld"
    ppl = [str(LLAMA_BIN / "llama-perplexity"), "-f", str(text_file), "-c", str(ctx), "--chunks", str(chunks),
           "-t", "2", "-b", str(ctx)]
    subprocess.run([*ppl, "-m", str(bf16), "--kl-divergence-base", str(base_logits)], check=True,
                   capture_output=True)
    out = {}
    for kind in LLAMA_TYPES:
        q = workdir / f"{ckpt.name}-{kind.lower()}.gguf"
        if not q.exists():
            subprocess.run([str(LLAMA_BIN / "llama-quantize"), str(bf16), str(q), kind], check=True,
                           capture_output=True)
        p = subprocess.run([*ppl, "-m", str(q), "--kl-divergence-base", str(base_logits), "--kl-divergence"],
                           check=True, capture_output=True, text=True)
        out[kind] = _parse_kld(p.stdout + p.stderr)
        out[kind]["file_MB"] = q.stat().st_size / 1e6
        log(f"  llama.cpp {kind}: {out[kind]}")
    return out


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def _parse_kld(text: str) -> dict:
    return {"mean_kld": _num(r"Mean\s+KLD:\s+([-\d.]+)", text),
            "kld_p99": _num(r"99\.0%\s+KLD:\s+([-\d.]+)", text),
            "same_top": (_num(r"Same top p:\s+([-\d.]+)", text) or 0) / 100,
            "ppl": _num(r"Mean PPL\(Q\)\s*:\s+([-\d.]+)", text),
            "ppl_base": _num(r"Mean PPL\(base\)\s*:\s+([-\d.]+)", text)}


def table(res: dict) -> str:
    rows = ["| model | mean KLD | KLD p99 | same top token | PPL (bf16 -> quantized) |", "|---|---|---|---|---|"]
    for who, variants in (("dsv2", res["dsv2"]["variants"]), ("llama.cpp", res.get("llama.cpp", {}))):
        for name, r in variants.items():
            bpw = f" ({r['file_MB']:.1f} MB)" if r.get("file_MB") else ""
            rows.append(f"| {who} {name}{bpw} | {r['mean_kld']:.5f} | {r['kld_p99']:.4f} | {100 * r['same_top']:.2f}% "
                        f"| {r['ppl_base']:.3f} -> {r['ppl']:.3f} |")
    for name, g in res["dsv2"].get("greedy", {}).items():
        rows.append(f"\ndsv2 {name}: its top token is the bf16 model's next token at {100 * g['teacher_forced']:.1f}% "
                    f"of 256 greedy bf16 tokens after each of {len(g['first_difference'])} prompts (free-running, "
                    f"the texts first differ at tokens {g['first_difference']}).")
    sens = res["dsv2"]["sensitivity"]
    if sens:
        rows += ["", "| int4 g32 on this family only | params | mean KLD | same top token |", "|---|---|---|---|"]
        for fam, r in sorted(sens.items(), key=lambda kv: -kv[1]["mean_kld"]):
            rows.append(f"| {fam} | {r['params'] / 1e6:.2f}M | {r['mean_kld']:.5f} | {100 * r['same_top']:.2f}% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quant_accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a training run folder (its newest checkpoint and its "
                    "validation split are used)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quant")
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    args = ap.parse_args(argv)
    log = common.logger()

    ckpt = sorted((args.run / "checkpoints").glob("step_*"))[-1]
    args.workdir.mkdir(parents=True, exist_ok=True)
    text_file = args.workdir / f"{args.run.name}-heldout.txt"
    text_file.write_text(held_out_text(args.run, args.ctx * args.chunks * 2))
    torch.set_num_threads(2)
    res = {"stamp": common.stamp(2), "cpu": ops.cpu_name(), "checkpoint": str(ckpt),
           "command": common.command_line("benchmarks.quant_accuracy", argv),
           "dsv2": run_dsv2(ckpt, text_file.read_text(), args.ctx, args.chunks, not args.no_sensitivity, log)}
    if not args.no_llama and (LLAMA_BIN / "llama-perplexity").exists():
        res["llama.cpp"] = run_llama(ckpt, text_file, args.ctx, args.chunks, args.workdir, log)
    common.write_results(args.out, "accuracy", res, table(res), f"; {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
