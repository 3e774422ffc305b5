"""`python -m benchmarks [--quick] [--only decode,prefill,moe,train] ...`: run the suite, write benchmarks/results/."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import common, decode, moe, prefill, report, train

ROOT = Path(__file__).resolve().parent
SUITES = ("decode", "prefill", "moe", "train")


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def _strs(s: str) -> tuple[str, ...]:
    return tuple(x for x in s.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fp32, contexts 512,2048, batch 1, tiny preset only; writes to results/quick")
    ap.add_argument("--only", type=_strs, default=SUITES, help=f"comma list of {','.join(SUITES)}")
    ap.add_argument("--dtypes", type=_strs, default=("fp32", "bf16"), help="decode/prefill/MoE dtypes")
    ap.add_argument("--contexts", type=_ints, default=(512, 2048, 8192))
    ap.add_argument("--batches", type=_ints, default=(1, 8))
    ap.add_argument("--presets", type=_strs, default=("tiny", "small"), help="training presets")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--max-time", type=float, default=12.0, help="seconds of timed repeats per cell (at least 1)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp",
                    help="where the shared checkpoints are written (git-ignored)")
    ap.add_argument("--update-readme", action="store_true", help="replace the Speed section of benchmarks/README.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other suites' results already in OUT/results.json (run suites at quiet times)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite results.md, the plots (and benchmarks/README.md) from OUT/results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.dtypes, args.contexts, args.batches, args.presets = ("fp32",), (512, 2048), (1,), ("tiny",)
        args.max_time = min(args.max_time, 4.0)
    out = args.out or (ROOT / "results" / ("quick" if args.quick else ""))
    unknown = set(args.only) - set(SUITES)
    if unknown:
        ap.error(f"unknown suites {sorted(unknown)}; choose from {SUITES}")

    if args.render:
        md = report.write(json.loads((out / "results.json").read_text()), out,
                          ROOT / "README.md" if args.update_readme else None)
        print(md.read_text())
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.time()
    command = common.command_line("benchmarks", argv)
    res: dict = {}
    if args.merge and (out / "results.json").exists():
        res = json.loads((out / "results.json").read_text())
    res["stamp"] = common.stamp(args.threads)
    res["commands"] = [c for c in res.get("commands", []) if c != command] + [command]

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    log(f"stamp: {res['stamp']}")
    peak_dtypes = sorted(set(args.dtypes) | {"fp32"})
    machine: dict = {"bandwidth": common.memory_bandwidth(),
                     "matmul_peak": {d: common.matmul_peak(common.DTYPES[d]) for d in peak_dtypes}}
    log(f"machine (start): {machine}")

    cfg = common.bench_config()
    needs_bench = {"decode", "prefill", "moe"} & set(args.only)
    if needs_bench:
        path = common.checkpoint(args.workdir, "bench", cfg)
        import dsv2

        with torch.device("meta"):
            n_params = dsv2.DeepseekV2(cfg).num_parameters()
        res["model"] = {"description": common.describe_config(cfg), "params": n_params, "checkpoint": str(path)}
        log(f"checkpoint {path}: {res['model']['description']}")
    sections = {}
    if "decode" in args.only:
        sections["decode"] = decode.run(path, contexts=args.contexts, batches=args.batches, dtypes=args.dtypes,
                                        max_time=args.max_time, log=log)
    if "prefill" in args.only:
        sections["prefill"] = prefill.run(path, dtypes=args.dtypes, max_time=max(args.max_time, 20.0), log=log)
    if "moe" in args.only:
        sections["moe"] = moe.run(path, dtypes=args.dtypes, max_time=args.max_time, log=log)
    if "train" in args.only:
        sections["train"] = train.run(args.workdir, presets=args.presets, max_time=max(args.max_time, 20.0), log=log)
    # machine limits again at the end (other tenants come and go): the best of the two is reported
    end = {"bandwidth": common.memory_bandwidth(),
           "matmul_peak": {d: common.matmul_peak(common.DTYPES[d]) for d in peak_dtypes}}
    log(f"machine (end): {end}")
    machine = common.best_limits(machine, end)
    fp32 = machine["matmul_peak"]["fp32"]["GFLOPs"]
    bf16 = machine["matmul_peak"].get("bf16", {}).get("GFLOPs")
    if bf16 is not None:
        machine["native_dtype"] = "fp32" if fp32 > bf16 else "bf16"
        machine["native_note"] = (f"bf16 matmul {bf16:.1f} GFLOP/s vs fp32 {fp32:.1f} GFLOP/s; CPU capability "
                                  f"{res['stamp']['isa']}, no AVX512-BF16/AMX: bf16 GEMMs are emulated")
    if "moe" in sections:
        moe.add_peaks(sections["moe"], machine["matmul_peak"])
    res["stamp"]["load_end"] = round(common.loadavg(), 2)
    res["stamp"]["wall_s"] = round(time.time() - t_start)
    for name, sec in sections.items():  # each suite keeps the stamp and machine limits of the run that measured it
        sec["stamp"], sec["machine"] = dict(res["stamp"]), machine
        res[name] = sec
    res = common.to_jsonable(res)
    md = report.write(res, out, ROOT / "README.md" if args.update_readme else None)
    log(f"wrote {md}")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
