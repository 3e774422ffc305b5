"""Training memory per rank and tokens/s with each memory lever: `python -m benchmarks.fsdp_memory`.

The peers benchmark's V2-Lite-shaped 4-layer model (220M parameters), fine-tuned (`--init-from`) on 2 gloo ranks
under torchrun: DDP, FSDP, FSDP + activation checkpointing, each a fresh `torchrun -m dsv2 train` of the same steps;
the largest per-rank peak RSS (wait4's ru_maxrss over torchrun's reaped workers) and the median tokens/s after two
steps; beside them what `dsv2 info --parallel` computes for weights, gradients and AdamW state. (The benchmark
model has V2-Lite's shape: no device groups, so under expert parallelism the ranks are token dropping's devices.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from dsv2.config import ModelConfig
from dsv2.cpu import ops
from dsv2.tools.parallel_memory import STATE_BYTES, memory_per_rank

from . import common
from .lora import _corpus
from .peers import ROOT, prepare

UNDROPPED = ["--capacity-factor", "64"]
"""The model has no device groups: without EP its one device never drops a token (capacity = all assignments);
under EP the ranks are the devices and would drop at the default capacity. Undropped, every row does the same work."""
LEVERS = {"DDP": [], "FSDP": ["--fsdp"],
          "FSDP + activation checkpointing": ["--fsdp", "--activation-checkpointing"],
          "FSDP + CPU offload": ["--fsdp", "--cpu-offload"],
          "FSDP + 2-way EP": ["--fsdp", "--expert-parallel", "2", *UNDROPPED],
          "DDP + 2-way EP": ["--expert-parallel", "2", *UNDROPPED]}
"""(CPU offload on a CPU run: the same memory, host and device being one; it shows the path's cost alone.)"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fsdp")
    args = ap.parse_args(argv)
    log = common.logger()
    ckpt, data = prepare(args.workdir), _corpus(args.workdir)
    config = ModelConfig.from_json(ckpt / "config.json")
    rows = {}
    for name, flags in LEVERS.items():
        run = args.workdir / f"fsdp-{len(rows)}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}", "-m",
               "dsv2", "train", "--init-from", str(ckpt), "--data", str(data), "--out", str(run), "--overwrite",
               "--max-steps", str(args.steps), "--batch-size", "4", "--seq-len", "256", "--micro-batch-size", "2",
               "--warmup-steps", "1", "--eval-every", str(args.steps), "--save-every", str(10 * args.steps),
               "--sample-tokens", "0", *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise RuntimeError(f"{name}: {proc.stderr.read()[-2000:]}")
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        ep = int(flags[flags.index("--expert-parallel") + 1]) if "--expert-parallel" in flags else 1
        computed = memory_per_rank(config, args.ranks, fsdp="--fsdp" in flags, expert_parallel=ep)
        rows[name] = {"peak_rss_MB": usage.ru_maxrss / 1024,
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[2:]),
                      "computed_state_MB": STATE_BYTES * computed["parameters_owned"] / 2**20,
                      "dropped_fraction": max(r["dropped_fraction"] for r in records)}
        log(f"{name}: {rows[name]}")
    res = {"stamp": common.stamp(os.cpu_count() or 2), "cpu": ops.cpu_name(),
           "command": common.command_line("benchmarks.fsdp_memory", argv), "ranks": args.ranks, "rows": rows}
    lines = [f"| {args.ranks} ranks, batch 4 x 256 | peak RSS per rank | weights + grads + AdamW (dsv2 info) | "
             "tokens/s | dropped |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['peak_rss_MB']:.0f} MB | {v['computed_state_MB']:.0f} MB | {v['tokens_per_s']:.0f} | "
              f"{v['dropped_fraction']:.1%} |" for k, v in rows.items()]
    common.write_results(args.out, "fsdp_memory", res, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
