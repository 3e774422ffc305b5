"""Peak memory of one training step with the LM loss fused with the head (lm_loss.py) against cross-entropy over
materialised logits, as transformers computes it. Each variant runs in a fresh process (peak RSS is per process).

    python -m benchmarks.loss_memory [--preset small] [--vocab 102400] [--batch 2] [--seq 1024]

Writes benchmarks/results/loss_memory.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def step(variant: str, preset: str, vocab: int, batch: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dsv2 import DeepseekV2, get_config
    from dsv2.cpu import optimize

    torch.manual_seed(0)
    model = optimize(DeepseekV2(get_config(preset, vocab_size=vocab)))  # as the trainer runs it
    ids = torch.randint(0, vocab, (batch, seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if variant == "fused":
        model(x, targets=y).backward()
    else:
        F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).backward()
    return {"variant": variant, "seconds": time.perf_counter() - t0, "peak_bytes": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "before_bytes": before}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=102_400, help="V2's vocabulary by default")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--variant", choices=("fused", "unfused"), help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    if a.variant:
        print(json.dumps(step(a.variant, a.preset, a.vocab, a.batch, a.seq)))
        return
    rows = []
    for variant in ("fused", "unfused"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.loss_memory", "--variant", variant, "--preset",
                              a.preset, "--vocab", str(a.vocab), "--batch", str(a.batch), "--seq", str(a.seq)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    lines = [f"# LM loss memory: preset {a.preset}, vocab {a.vocab:,}, {a.batch} x {a.seq} tokens, one forward + "
             "backward (fp32)", "", f"Command: `python -m benchmarks.loss_memory --preset {a.preset} --vocab "
             f"{a.vocab} --batch {a.batch} --seq {a.seq}`", "",
             "| loss | peak RSS | before the step (the model) | step time |", "|---|---|---|---|"]
    names = {"fused": "dsv2 lm_loss (fused with the head, chunked)", "unfused": "F.cross_entropy over the logits"}
    for r in rows:
        lines.append(f"| {names[r['variant']]} | {r['peak_bytes'] / 2**30:.2f} GiB | {r['before_bytes'] / 2**30:.2f} "
                     f"GiB | {r['seconds']:.1f} s |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loss_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
