"""Decode latency at several contexts and batch sizes, KV-cache bytes per token, and the memory-bandwidth bound.

How context N is reached without N decode steps: dsv2 prefills N_max random tokens once in fp32 (batch 1); its
latent cache (normalised c_KV and roped k_R per layer, the same tensors transformers' DeepseekV2 keeps in its
DynamicCache) is copied into a fresh cache of each peer for every (context, batch, dtype) cell: a dsv2 KVCache
and a transformers DynamicCache, cut to N tokens, cast to the dtype, repeated over the batch. Both peers then decode
over identical cache contents, and the run checks that (a) transformers' own prefill writes the same cache and
(b) the peers' next-token logits agree. Each timed step appends one token per sequence.
"""

from __future__ import annotations

import functools
import itertools
import time

import torch

from dsv2.cpu.decode_step import DecodeStep

from . import common
from .common import DTYPES, free_memory, hf_available, load_dsv2, load_hf, measure_peers, set_hf_experts

DSV2_PEERS = ("dsv2 absorbed", "dsv2 naive")
HF_PEERS = ("hf eager", "hf grouped_mm", "hf batched_mm")
READ_PROBE = "read bound"
"""Batch-1 cells also time a plain sum over as many cold bytes as a decode step must read: the physical limit, taken
in the same rounds as the peers (this host's read bandwidth moves between 20 and 30 GB/s from one minute to the
next, so a figure measured at another time would not bound this cell)."""


@torch.inference_mode()
def prefill_latents(path, n_tokens: int, seed: int = 0, chunk: int = 2048):
    """One fp32 dsv2 prefill of n_tokens random ids: returns (ids, {stream: [L, 1, n_tokens, width]})."""
    model = load_dsv2(path, torch.float32)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (1, n_tokens), generator=g)
    cache = model.new_cache(1, n_tokens)
    for s in range(0, n_tokens, chunk):
        part = ids[:, s:s + chunk]
        model(part, cache=cache, logits_at=torch.tensor([part.shape[1] - 1]))  # generation needs the last one
    lat = {k: v.clone() for k, v in cache.buffers.items()}
    del model, cache
    free_memory()
    return ids, lat


def dsv2_cache(model, lat: dict, ctx: int, batch: int, room: int, dtype: torch.dtype):
    cache = model.new_cache(batch, ctx + room, dtype=dtype)
    for name, buf in cache.buffers.items():
        buf[:, :, :ctx] = lat[name][:, :, :ctx].to(dtype)
    cache.valid[:, :ctx] = True
    cache.length = ctx
    return cache


def hf_cache(hf_model, lat: dict, ctx: int, batch: int, dtype: torch.dtype):
    from transformers import DynamicCache

    c, p = lat["c_kv"], lat["k_pe"]
    L = c.shape[0]
    data = [(c[i, :, None, :ctx].to(dtype).expand(batch, 1, ctx, c.shape[-1]).contiguous(),
             p[i, :, None, :ctx].to(dtype).expand(batch, 1, ctx, p.shape[-1]).contiguous()) for i in range(L)]
    return DynamicCache(ddp_cache_data=data, config=hf_model.config)


def hf_cache_bytes_per_token(cache) -> float:
    total = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                for layer in cache.layers)
    return total / (cache.get_seq_length() * cache.layers[0].keys.shape[0])


def active_weight_bytes(model) -> int:
    """Weights one batch-1 decode step must read: all but the routed experts (K of E per MoE layer) and the
    embedding table (one row)."""
    cfg = model.config
    total = 0
    quantized = ((n, b) for n, b in model.named_buffers() if n.endswith("_q"))  # dsv2.quant's rows
    for name, p in itertools.chain(model.named_parameters(), quantized):
        nb = p.numel() * p.element_size()
        if ".experts." in name:
            nb = nb * cfg.num_experts_per_tok // cfg.num_routed
        elif name == "model.embed_tokens.weight":
            nb = p.shape[1] * p.element_size()
        total += nb
    return total


@torch.inference_mode()
def check_equivalence(path, ids, lat, hf_model) -> dict:
    """fp32: transformers' own prefill writes the same latents as dsv2's; the next-token logits of the three
    paths agree over the shared cache."""
    n = min(512, ids.shape[1])
    out = hf_model(input_ids=ids[:, :n], use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values
    cache_diff = max(max((pkv.layers[i].keys[:, 0] - lat["c_kv"][i, :, :n]).abs().max().item(),
                         (pkv.layers[i].values[:, 0] - lat["k_pe"][i, :, :n]).abs().max().item())
                     for i in range(len(pkv.layers)))
    model = load_dsv2(path, torch.float32)
    tok = ids[:, n:n + 1]
    got = {}
    for absorb in (True, False):
        cache = dsv2_cache(model, lat, n, 1, 1, torch.float32)
        got[absorb] = model(tok, cache=cache, absorb=absorb)[:, -1]
    want = hf_model(input_ids=tok, cache=hf_cache(hf_model, lat, n, 1, torch.float32)).logits[:, -1]
    del model
    return {"context": n, "cache_max_abs_diff_vs_hf_prefill": cache_diff,
            "logits_absorbed_vs_hf": (got[True] - want).abs().max().item(),
            "logits_naive_vs_hf": (got[False] - want).abs().max().item(),
            "logits_scale": want.abs().max().item()}


@torch.inference_mode()  # as in generation (dsv2.generate, transformers' generate): no autograd graph
def run(path, *, contexts=(512, 2048, 8192), batches=(1, 8), dtypes=("fp32", "bf16"), peers=None,
        max_time: float = 12.0, log=print) -> dict:
    peers = list(peers or (DSV2_PEERS + (HF_PEERS if hf_available() else ())))
    use_hf = any(p.startswith("hf") for p in peers)
    log(f"decode: prefilling {max(contexts)} tokens once (fp32, dsv2) for the shared cache contents")
    ids, lat = prefill_latents(path, max(contexts) + 1)
    lat = {k: v[:, :, :max(contexts)] for k, v in lat.items()}
    results: dict = {"cells": [], "kv_bytes_per_token": {}, "peers": peers}
    room = 16
    for dname in dtypes:
        dtype = DTYPES[dname]
        model = load_dsv2(path, dtype)
        hf = load_hf(path, dtype) if use_hf else None
        if dname == "fp32" and hf is not None:
            results["equivalence"] = check_equivalence(path, ids, lat, hf)
            log(f"  equivalence (fp32): {results['equivalence']}")
        weight_bytes = active_weight_bytes(model)
        fused = DecodeStep(model)
        warm_up(model, batches)
        settle(model, hf, lat, contexts[0], dtype)
        for ctx in contexts:
            for batch in batches:
                g = torch.Generator().manual_seed(ctx * 31 + batch)
                toks = torch.randint(2, model.config.vocab_size, (room, batch, 1), generator=g)
                cell = {"dtype": dname, "context": ctx, "batch": batch, "ms": {}, "ms_median": {}, "n": {},
                        "load": round(common.loadavg(), 2)}
                fns, caches, setup = {}, {}, {}
                for peer in peers:
                    step = iter(range(room))
                    if peer.startswith("dsv2"):
                        cache = dsv2_cache(model, lat, ctx, batch, room, dtype)

                        def fn(model=model, toks=toks, cache=cache, absorb=peer == "dsv2 absorbed", step=step,
                               fused=fused, batch=batch):
                            if absorb and fused.applies(batch):  # as dsv2.generate decodes
                                fused(toks[next(step)], cache.positions(batch, 1, None), cache)
                            else:
                                model(toks[next(step)], cache=cache, absorb=absorb)
                    else:
                        cache = hf_cache(hf, lat, ctx, batch, dtype)

                        def fn(hf=hf, toks=toks, cache=cache, step=step):
                            hf(input_ids=toks[next(step)], cache=cache, use_cache=True)
                        # transformers' experts implementations share one loaded model: switched untimed
                        setup[peer] = functools.partial(set_hf_experts, hf, peer.split(" ", 1)[1])
                    fns[peer], caches[peer] = fn, cache
                cache_read = ctx * batch * model.config.num_hidden_layers * (
                    model.config.kv_lora_rank + model.config.qk_rope_head_dim) * torch.finfo(dtype).bits // 8
                if batch == 1:  # the bytes a step must read, read by a plain sum in the same rounds as the peers
                    cell["bytes_per_step_batch1"] = weight_bytes + cache_read
                    fns[READ_PROBE] = common.read_probe(cell["bytes_per_step_batch1"])
                timings = measure_peers(fns, setup=setup, warmup=1, min_iters=3, max_iters=room - 2, min_time=1.5,
                                        max_time=max_time)
                if READ_PROBE in timings:
                    probe = timings.pop(READ_PROBE)
                    cell["bound_ms"] = probe.best_ms
                    cell["read_GBps"] = cell["bytes_per_step_batch1"] / probe.min_s / 1e9
                    cell["bandwidth_fraction"] = {p: probe.min_s / t.min_s for p, t in timings.items()}
                for peer, t in timings.items():
                    cell["ms"][peer], cell["ms_median"][peer], cell["n"][peer] = t.best_ms, t.median_s * 1e3, t.n
                if ctx == contexts[0] and batch == batches[0]:
                    kv = results["kv_bytes_per_token"].setdefault(dname, {})
                    for peer, cache in caches.items():
                        if peer == "dsv2 absorbed":
                            kv["dsv2 (MLA latent)"] = cache.nbytes() / cache.max_len / batch
                        elif peer.startswith("hf"):
                            kv["transformers (DynamicCache)"] = hf_cache_bytes_per_token(cache)
                del fns, caches, fn, cache
                free_memory()
                results["cells"].append(cell)
                log(f"  {dname} ctx {ctx:5d} batch {batch}: " + ", ".join(
                    f"{p} {ms:.1f} ms (n={cell['n'][p]})" for p, ms in cell["ms"].items()))
        results.setdefault("active_weight_bytes", {})[dname] = weight_bytes
        del model, hf
        free_memory()
    results["kv_bytes_per_token"]["mha_baseline"] = mha_bytes_per_token(path, dtypes)
    return results


@torch.inference_mode()
def settle(model, hf, lat, ctx: int, dtype, seconds: float = 3.0) -> None:
    """Untimed decoding before the first cell: right after the long prefill, the first cell was measured ~15% slow
    for every peer (allocator and caches settling), which would flatter the 8K / 512 ratio."""
    steps = [(lambda c, t: model(t, cache=c), dsv2_cache(model, lat, ctx, 1, 64, dtype))]
    if hf is not None:
        steps.append((lambda c, t: hf(input_ids=t, cache=c, use_cache=True), hf_cache(hf, lat, ctx, 1, dtype)))
    for step, cache in steps:
        t0 = time.perf_counter()
        for i in range(60):
            step(cache, torch.full((1, 1), 2 + i))
            if time.perf_counter() - t0 > seconds:
                break


@torch.inference_mode()
def warm_up(model, batches) -> None:
    """One short decode per batch size: builds the C++ decode kernels (dsv2.cpu) outside the timings."""
    for batch in batches:
        cache = model.new_cache(batch, 8)
        model(torch.randint(2, 100, (batch, 4)), cache=cache)
        model(torch.randint(2, 100, (batch, 1)), cache=cache)


@torch.inference_mode()
def mha_bytes_per_token(path, dtypes) -> dict:
    """KV bytes per token of the MHA baseline (dsv2 attention_type='mha', same head dims), from a live cache."""
    import dsv2
    from dsv2.config import ModelConfig

    # the FFN does not touch the cache: the baseline is built dense to keep it small
    cfg = ModelConfig.from_json(path).replace(attention_type="mha", n_routed_experts=None)
    out = {}
    for dname in dtypes:
        with torch.device("meta"):
            model = dsv2.DeepseekV2(cfg)
        model = model.to(DTYPES[dname]).to_empty(device="cpu")
        model.init_weights()
        cache = model.new_cache(1, 64)
        model(torch.randint(2, cfg.vocab_size, (1, 16)), cache=cache)
        out[dname] = cache.nbytes() / cache.max_len
        del model, cache
    free_memory()
    return out
