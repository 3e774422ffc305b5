"""Reproducible training (README "Reproducible runs"): on one machine with one thread count, the same command run
twice gives the same per-step metrics and the same checkpoint bytes, and a run killed with SIGKILL and resumed gives
them too, in fp32 and in bf16 (where the CPU multiplies bf16 natively), and on 2 ranks with expert parallelism.

The runs are sized so that the MoE dispatch's gradient crosses torch's parallel grain (T*K*D >= 32768 elements):
below it the CPU kernels run on one thread and would hide the atomics this guards against."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import run_dsv2, train_argv
from test_train import signal_at

from dsv2.cpu.ops import native_bf16

SIZED = ["--batch-size", "8", "--micro-batch-size", "4", "--seq-len", "64", "--set", "num_experts_per_tok=4",
         "--set", "hidden_size=64"]
TIMING = {"tokens_per_s", "step_time", "elapsed", "wall_time", "time"}
BF16 = pytest.param("bf16", marks=pytest.mark.skipif(
    not native_bf16(), reason="this CPU emulates bf16 matmul (no AVX512-BF16 or AMX): bf16 runs are checked where "
    "it is native"))


def metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def checkpoint_bytes(run) -> dict[str, str]:
    """sha256 of every tensor file of every checkpoint the run kept."""
    return {f"{c.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
            for c in sorted((run / "checkpoints").iterdir()) for f in sorted(c.glob("*.safetensors"))}


@pytest.mark.parametrize("dtype", ["fp32", BF16])
def test_same_command_same_run_and_resume(corpus, tmp_path, dtype):
    argv = [*SIZED, "--dtype", dtype]
    runs = {name: tmp_path / name for name in ("a", "b", "killed")}
    threads = {"OMP_NUM_THREADS": "2"}  # the atomics this guards against need more than one thread
    for name in ("a", "b"):
        r = run_dsv2(train_argv(corpus, runs[name], *argv), env=threads)
        assert r.returncode == 0, r.stderr[-2000:]
    r = run_dsv2(train_argv(corpus, runs["killed"], *argv), env=threads, prelude=signal_at(4, signal.SIGKILL))
    assert r.returncode == -9, r.stderr[-2000:]
    r = run_dsv2(["train", "--out", str(runs["killed"]), "--resume", "--sample-tokens", "0"], env=threads)
    assert r.returncode == 0, r.stderr[-2000:]
    a = metrics(runs["a"])
    assert [row["step"] for row in a] == [1, 2, 3, 4, 5, 6]
    assert metrics(runs["b"]) == a and metrics(runs["killed"]) == a  # every logged number, bit for bit
    ckpt = checkpoint_bytes(runs["a"])
    assert {"step_0000006/model.safetensors", "step_0000006/optimizer.safetensors"} <= set(ckpt)
    assert checkpoint_bytes(runs["b"]) == ckpt
    assert checkpoint_bytes(runs["killed"]) == ckpt


def test_expert_parallel_runs_repeat(corpus, tmp_path):
    """2 ranks, experts split over them: two runs, and one killed on both ranks and resumed, write the same
    checkpoints (the all-to-all's arrival order does not reach the result)."""
    def torchrun(out, prelude_step: int | None = None, *extra: str) -> subprocess.CompletedProcess:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        if prelude_step is None:
            args += ["-m", "dsv2"]
        else:  # each rank kills itself while fetching that step's batch
            script = tmp_path / "killed_at.py"
            script.write_text(f"import sys\n{signal_at(prelude_step, signal.SIGKILL)}\nfrom dsv2.cli import main\n"
                              "sys.exit(main(sys.argv[1:]))\n")
            args += [str(script)]
        argv = train_argv(corpus, out, *SIZED, "--expert-parallel", "2", *extra)
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        return subprocess.run([sys.executable, *args, *argv], capture_output=True, text=True, timeout=300,
                              env={**env, "OMP_NUM_THREADS": "2"})

    for name in ("a", "b"):
        r = torchrun(tmp_path / name)
        assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(tmp_path / "killed", 4)
    assert r.returncode != 0
    r = torchrun(tmp_path / "killed", None, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a = metrics(tmp_path / "a")
    assert metrics(tmp_path / "b") == a and metrics(tmp_path / "killed") == a
    ckpt = checkpoint_bytes(tmp_path / "a")
    assert checkpoint_bytes(tmp_path / "b") == ckpt == checkpoint_bytes(tmp_path / "killed")


def test_deterministic_flag_runs_and_restores_torch_setting(corpus, tmp_path, monkeypatch):
    """--deterministic (for CUDA) turns torch's deterministic algorithms on during the steps, changes nothing a CPU
    run computes, and leaves torch's setting as it found it (a strict one stays strict)."""
    import torch

    from dsv2.cli import main
    from dsv2.training import trainer

    seen = []
    real = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda s, step: seen.append(
        (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()))
        or real(s, step))
    plain, det = tmp_path / "plain", tmp_path / "det"
    assert main(train_argv(corpus, plain, max_steps=2, save_every=2)) == 0
    assert main(train_argv(corpus, det, "--deterministic", max_steps=2, save_every=2)) == 0
    assert seen == [(False, False)] * 2 + [(True, True)] * 2
    assert metrics(plain) == metrics(det) and checkpoint_bytes(plain) == checkpoint_bytes(det)
    assert not torch.are_deterministic_algorithms_enabled()
    assert json.loads((det / "train_config.json").read_text())["deterministic"] is True
    torch.use_deterministic_algorithms(True)  # the caller's strict setting survives a run
    try:
        assert main(train_argv(corpus, tmp_path / "strict", "--deterministic", max_steps=1, save_every=1)) == 0
        assert seen[-1] == (True, False)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
