"""The MoE layer's achieved GFLOP/s against this machine's measured dense matmul peak in the same dtype.

Useful FLOPs only: per token, the gate (2 E D) and the K routed + shared SwiGLU experts (3 matmuls of 2 D F
each). The layer is the first MoE layer of the shared checkpoint, run on the same random input by both peers.
"""

from __future__ import annotations

import functools

import torch

from .common import DTYPES, free_memory, hf_available, load_dsv2, load_hf, measure_peers, set_hf_experts

PEERS = ("dsv2", "hf eager", "hf grouped_mm")


def moe_flops(cfg, tokens: int) -> int:
    n_active = cfg.num_experts_per_tok + (cfg.n_shared_experts or 0)
    return tokens * (n_active * 3 * 2 * cfg.hidden_size * cfg.moe_intermediate_size
                     + 2 * cfg.num_routed * cfg.hidden_size)


@torch.inference_mode()
def run(path, *, tokens=(2048, 8, 1), dtypes=("fp32", "bf16"), peers=None, max_time: float = 10.0,
        log=print) -> dict:
    peers = list(peers or (PEERS if hf_available() else PEERS[:1]))
    out = {"rows": []}
    for dname in dtypes:
        dtype = DTYPES[dname]
        model = load_dsv2(path, dtype)
        cfg = model.config
        i = next(j for j in range(cfg.num_hidden_layers) if cfg.is_moe_layer(j))
        ours = model.model.layers[i].mlp
        hf = load_hf(path, dtype) if any(p.startswith("hf") for p in peers) else None
        theirs = hf.model.layers[i].mlp if hf is not None else None
        with torch.inference_mode():  # build the C++ few-row kernels (dsv2.cpu) outside the timings
            ours(torch.randn(1, 1, cfg.hidden_size).to(dtype))
        for T in tokens:
            x = torch.randn(1, T, cfg.hidden_size, generator=torch.Generator().manual_seed(T)).to(dtype)
            flops = moe_flops(cfg, T)
            row = {"dtype": dname, "tokens": T, "GFLOPs": {}}
            fns, setup = {}, {}
            for peer in peers:
                if peer == "dsv2":
                    def fn(ours=ours, x=x):
                        ours(x)
                else:
                    def fn(theirs=theirs, x=x):
                        theirs(x)
                    setup[peer] = functools.partial(set_hf_experts, hf, peer.split(" ", 1)[1])
                fns[peer] = fn
            for peer, t in measure_peers(fns, setup=setup, warmup=2, min_iters=5, max_iters=50, min_time=1.0,
                                         max_time=max_time).items():
                row["GFLOPs"][peer] = flops / t.min_s / 1e9
            out["rows"].append(row)
            log(f"  MoE {dname} T={T}: " + ", ".join(f"{p} {v:.1f} GF/s" for p, v in row["GFLOPs"].items()))
        del model, hf, ours, theirs
        free_memory()
    return out


def add_peaks(results: dict, peaks: dict) -> None:
    for row in results["rows"]:
        row["peak_GFLOPs"] = peaks[row["dtype"]]["GFLOPs"]
        row["fraction_of_peak"] = {p: v / row["peak_GFLOPs"] for p, v in row["GFLOPs"].items()}
