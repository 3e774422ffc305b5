"""What a decode step costs besides its bytes: `python -m benchmarks.overhead [--steps N]`.

The decode benchmark's model structure (4 layers, 1 dense, 32 routed experts top-6, 2 shared, 8 heads, MLA without
query compression) with every width shrunk to a few dozen, so that a step reads almost nothing and its time is its
fixed costs: op dispatch, allocations, parallel regions, Python. Batch 1 after a 256-token prompt, the fused step
(dsv2.cpu.decode_step) and the CPU modules' forward alternating, fp32 and bf16; prints the median ms per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import dsv2
from dsv2.cpu import optimize
from dsv2.cpu.decode_step import DecodeStep
from dsv2.cpu.ops import cpu_name

from .common import BENCH_OVERRIDES

NARROW = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=16, vocab_size=256, kv_lora_rank=32,
              qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)


@torch.inference_mode()
def run(dtype: torch.dtype, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = optimize(dsv2.DeepseekV2(dsv2.get_config("deepseek-v2-lite", **{**BENCH_OVERRIDES, **NARROW}))
                     .to(dtype).eval())
    fused = DecodeStep(model)
    cache = model.new_cache(1, 256 + 2 * steps + 8)
    model(torch.randint(2, 200, (1, 256)), cache=cache, logits_at=torch.tensor([255]))
    tok, pos = torch.full((1, 1), 5), [255]

    def modules():
        pos[0] += 1
        model(tok, positions=torch.tensor([[pos[0]]]), cache=cache, logits_at=torch.arange(1))

    def fused_step():
        pos[0] += 1
        fused(tok, torch.tensor([[pos[0]]]), cache)

    times: dict[str, list[float]] = {"modules": [], "fused": []}
    for _ in range(steps):
        for name, f in (("modules", modules), ("fused", fused_step)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="steps of each, alternating")
    args = ap.parse_args(argv)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; median ms per decode step of a narrow model")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ms = run(dtype, args.steps)
        print(f"{name}: module by module {ms['modules']:.2f}, fused {ms['fused']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
