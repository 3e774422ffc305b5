"""Training throughput (issue 3, section 7): forward + backward tokens/s of the tiny and small presets, dsv2 vs
transformers' DeepseekV2ForCausalLM with its fastest experts implementation, same checkpoint, batch and dtype.

Both compute the next-token cross-entropy over the same B x T tokens and backpropagate: dsv2 as its trainer does
(inputs ids[:, :T], targets ids[:, 1:], `model(x, targets=y)`: the loss fused with the LM head, lm_loss.py),
transformers from `labels` (it shifts internally, so it scores T - 1 positions per row); no optimizer step
(identical for both). dsv2's balance losses are not added: transformers has
no equivalent.
transformers' batched_mm experts gather one weight copy per token-expert pair; where that copy would exceed
`batched_mm_limit` bytes it is skipped and the reason recorded.
"""

from __future__ import annotations

import functools

import torch

from dsv2.presets import get_config

from .common import DTYPES, checkpoint, free_memory, hf_available, load_dsv2, load_hf, measure_peers, set_hf_experts

SHAPES = {"tiny": (16, 256), "small": (4, 512)}  # (batch, sequence length)
HF_EXPERTS = ("eager", "grouped_mm", "batched_mm")


def run(workdir, *, presets=("tiny", "small"), dtype: str = "fp32", max_time: float = 30.0,
        batched_mm_limit: float = 1.5e9, log=print) -> dict:
    out = {"dtype": dtype, "rows": []}
    dt = DTYPES[dtype]
    for preset in presets:
        cfg = get_config(preset)
        path = checkpoint(workdir, f"train-{preset}", cfg)
        B, T = SHAPES[preset]
        ids = torch.randint(2, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(2))
        x, y = ids[:, :T], ids[:, 1:]
        row = {"preset": preset, "batch": B, "seq_len": T, "tokens_per_s": {}, "skipped": {}}
        model = load_dsv2(path, dt).train()

        def ours(model=model, x=x, y=y):
            model(x, targets=y).backward()
            model.zero_grad(set_to_none=True)
        fns, setup = {"dsv2": ours}, {}
        hf = load_hf(path, dt).train() if hf_available() else None
        for experts in HF_EXPERTS if hf is not None else ():
            if experts == "batched_mm":
                pair_bytes = (3 * cfg.hidden_size * cfg.moe_intermediate_size) * torch.finfo(dt).bits // 8
                need = B * T * cfg.num_experts_per_tok * pair_bytes
                if need > batched_mm_limit:
                    row["skipped"][f"hf {experts}"] = f"gathers {need / 1e9:.1f} GB of expert weights per layer"
                    continue

            def theirs(hf=hf, x=x):
                hf(input_ids=x, labels=x).loss.backward()
                hf.zero_grad(set_to_none=True)
            fns[f"hf {experts}"] = theirs
            setup[f"hf {experts}"] = functools.partial(set_hf_experts, hf, experts)
        for peer, t in measure_peers(fns, setup=setup, warmup=1, min_iters=3, max_iters=10, min_time=3.0,
                                     max_time=max_time).items():
            row["tokens_per_s"][peer] = B * T / t.min_s
        del model, hf, fns, setup
        free_memory()
        if len(row["tokens_per_s"]) > 1:
            best = max((k for k in row["tokens_per_s"] if k.startswith("hf")), key=row["tokens_per_s"].get)
            row["hf_best"] = best
            row["ratio"] = row["tokens_per_s"]["dsv2"] / row["tokens_per_s"][best]
        log(f"  train {preset} {B}x{T} {dtype}: " + ", ".join(f"{k} {v:.0f} tok/s"
                                                             for k, v in row["tokens_per_s"].items())
            + (f"; dsv2 / {row['hf_best']} = {row['ratio']:.2f}x" if "ratio" in row else ""))
        out["rows"].append(row)
    return out
