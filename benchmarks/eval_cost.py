"""What evaluation costs: `python -m benchmarks.eval_cost`.

1. Prompt log-probabilities (SamplingParams.prompt_logprobs) against a plain prefill of the same 2K-token prompt on
   the peers benchmark's model (V2-Lite-shaped, 4 layers, bf16): time (best of interleaved rounds) and the peak RSS
   the request adds above what the process held before it (VmHWM reset through /proc/self/clear_refs).
2. lm-evaluation-harness on the same model both ways: `local-completions` against `dsv2 serve` and in-process
   (dsv2.eval.LMEvalModel), a 200-question multiple-choice task written here (3 choices each): the harness's own
   evaluation time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsv2 import Engine, SamplingParams
from dsv2.cpu import ops
from dsv2.tokenizer import TOKENIZER_CONFIG_FILE, load_tokenizer, tokenizer_config

from . import common
from .peers import ROOT, prepare
from .serve import LOGS, free_port, wait_ready

OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _rss() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    get = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
           if line.startswith(("VmHWM", "VmRSS"))}
    return get["VmRSS"], get["VmHWM"]


@torch.inference_mode()
def prompt_cost(ckpt: Path, rounds: int, log) -> dict:
    engine = Engine.from_pretrained(ckpt, dtype=torch.bfloat16, max_num_seqs=1, prefix_caching=False)
    ids = torch.randint(2, engine.model.config.vocab_size, (2048,), generator=torch.Generator().manual_seed(0))
    variants = {"plain prefill": None, "prompt_logprobs=1": 1, "prompt_logprobs=5": 5}
    best = {k: (float("inf"), 0) for k in variants}
    engine.generate([ids[:64].tolist()], SamplingParams(max_tokens=1, prompt_logprobs=1), progress=False)
    for _ in range(rounds):
        for name, k in variants.items():
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
            before, _ = _rss()
            t = time.perf_counter()
            engine.generate([ids.tolist()], SamplingParams(max_tokens=1, prompt_logprobs=k), progress=False)
            dt = time.perf_counter() - t
            _, peak = _rss()
            best[name] = (min(best[name][0], dt), max(best[name][1], peak - before))
    out = {k: {"seconds": s, "added_peak_MB": m / 1e6} for k, (s, m) in best.items()}
    log(f"  {out}")
    return out


def _mc_task(workdir: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]
    rows = []
    for _ in range(200):
        pick = torch.randint(0, len(words), (6,), generator=g).tolist()
        rows.append({"question": " ".join(words[i] for i in pick[:3]), "choices": [words[i] for i in pick[3:]],
                     "answer": 0})
    folder = workdir / "eval-tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "bench_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    return folder


def harness_both_ways(ckpt: Path, workdir: Path, log) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsv2.eval import LMEvalModel

    tasks = _mc_task(workdir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(LOGS / "dsv2-eval.log", "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "dsv2", "serve", "--model", str(ckpt), "--port", str(port),
                                 "--dtype", "bf16", "--served-model-name", "bench", "--log-level", "warning"],
                                stdout=log_file, stderr=subprocess.STDOUT, text=True)
        proc.log_path = log_file.name
        try:
            wait_ready(proc, url)
            args = (f"base_url={url}/v1/completions,model=bench,tokenizer={ckpt},tokenizer_backend=huggingface,"
                    "num_concurrent=1,max_retries=1,max_length=4096")
            out_dir = workdir / "eval-out"
            p = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                                "--tasks", "bench_mc", "--include_path", str(tasks), "--output_path", str(out_dir)],
                               capture_output=True, text=True, timeout=3600, env=OFFLINE)
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    served = json.loads(sorted(out_dir.rglob("results*.json"))[-1].read_text())
    engine = Engine.from_pretrained(ckpt, dtype=torch.bfloat16)
    t = time.perf_counter()  # what the harness's CLI times as total_evaluation_time_seconds: simple_evaluate
    local = lm_eval.simple_evaluate(model=LMEvalModel(engine, 4095, progress=False), tasks=["bench_mc"],
                                    task_manager=TaskManager(include_path=str(tasks)))
    out = {"server_s": float(served["total_evaluation_time_seconds"]), "in_process_s": time.perf_counter() - t,
           "acc_server": served["results"]["bench_mc"]["acc,none"],
           "acc_in_process": local["results"]["bench_mc"]["acc,none"]}
    log(f"  {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "results" / "tmp")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "eval")
    args = ap.parse_args(argv)
    log = common.logger()
    LOGS.mkdir(parents=True, exist_ok=True)
    ckpt = prepare(args.workdir)
    # the tokenizer files a dsv2 checkpoint carries (peers.prepare writes a shorter tokenizer_config.json)
    (ckpt / TOKENIZER_CONFIG_FILE).unlink(missing_ok=True)
    (ckpt / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(load_tokenizer(ckpt), 16384)))
    res = {"stamp": common.stamp(os.cpu_count() or 2), "cpu": ops.cpu_name(),
           "command": common.command_line("benchmarks.eval_cost", argv),
           "prompt_logprobs": prompt_cost(ckpt, args.rounds, log),
           "harness": harness_both_ways(ckpt, args.workdir, log)}
    p, h = res["prompt_logprobs"], res["harness"]
    base = p["plain prefill"]
    lines = ["| 2K-token prompt, bf16 | seconds | vs plain prefill | peak RSS added |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.3f} | {v['seconds'] / base['seconds']:.2f}x | {v['added_peak_MB']:.0f} MB |"
              for k, v in p.items()]
    lines.append(f"\nlm-eval, 200 multiple-choice questions (600 log-likelihood requests): through dsv2 serve "
                 f"{h['server_s']:.1f} s, in-process {h['in_process_s']:.1f} s "
                 f"({h['server_s'] / h['in_process_s']:.2f}x); acc {h['acc_server']:.3f} / {h['acc_in_process']:.3f}.")
    common.write_results(args.out, "eval_cost", res, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
