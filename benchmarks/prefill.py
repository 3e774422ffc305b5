"""Prefill throughput at 2K context: the first forward of generation, writing the cache, last-position logits only
(transformers' generate() asks for logits_to_keep=1 there too)."""

from __future__ import annotations

import functools

import torch

from .common import DTYPES, free_memory, hf_available, load_dsv2, load_hf, measure_peers, set_hf_experts

PEERS = ("dsv2", "hf eager", "hf grouped_mm")


@torch.inference_mode()
def run(path, *, context: int = 2048, batch: int = 1, dtypes=("fp32", "bf16"), peers=None,
        max_time: float = 30.0, log=print) -> dict:
    peers = list(peers or (PEERS if hf_available() else PEERS[:1]))
    out = {"context": context, "batch": batch, "rows": []}
    for dname in dtypes:
        dtype = DTYPES[dname]
        model = load_dsv2(path, dtype)
        hf = load_hf(path, dtype) if any(p.startswith("hf") for p in peers) else None
        ids = torch.randint(2, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(1))
        row = {"dtype": dname, "tokens_per_s": {}, "n": {}}
        fns, setup = {}, {}
        for peer in peers:
            if peer == "dsv2":
                def fn(model=model, ids=ids):
                    model(ids, cache=model.new_cache(batch, context),
                          logits_at=torch.arange(batch) * context + context - 1)
            else:
                def fn(hf=hf, ids=ids):
                    hf(input_ids=ids, use_cache=True, logits_to_keep=1)
                setup[peer] = functools.partial(set_hf_experts, hf, peer.split(" ", 1)[1])
            fns[peer] = fn
        for peer, t in measure_peers(fns, setup=setup, warmup=1, min_iters=2, max_iters=5, min_time=3.0,
                                     max_time=max_time).items():
            row["tokens_per_s"][peer], row["n"][peer] = batch * context / t.min_s, t.n
        free_memory()
        out["rows"].append(row)
        log(f"  prefill {dname} {context} tokens: " + ", ".join(
            f"{p} {v:.0f} tok/s (n={row['n'][p]})" for p, v in row["tokens_per_s"].items()))
        del model, hf
        free_memory()
    return out
