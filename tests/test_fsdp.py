"""FSDP2 (`dsv2 train --fsdp`, torchrun on gloo) and activation checkpointing: the same losses as one process.

Tolerances as tests/test_parallel_dist.py (rel 1e-5 on losses and metrics): sharding changes only the order in
which gradients are summed (reduce-scatter over the ranks instead of DDP's all-reduce).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_parallel_dist import TRAIN_ARGS, _metrics, _same_losses, _train_in_process

PYTHON = sys.executable


def _launch(nproc: int) -> list[str]:
    """torchrun on this machine with nproc processes; what it runs follows."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _torchrun(nproc: int, out: Path, *extra: str) -> list[dict]:
    cmd = [*_launch(nproc), "-m", "dsv2", "train", "--out", str(out), *TRAIN_ARGS, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return _metrics(out)


MICRO = ("--micro-batch-size", "2")
"""Micro-batches of 2 sequences in every run: token dropping decides per micro-batch, so one process and 2 or 4
ranks drop the same copies (as test_parallel_dist.py's data-parallel case)."""


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_single")
    return out, _train_in_process(out, *MICRO)


def test_fsdp_on_2_ranks_logs_single_process_losses(single, tmp_path):
    one_dir, one = single
    tok = str(one_dir / "tokenizer" / "tokenizer.json")
    two = _torchrun(2, tmp_path / "fsdp2", "--fsdp", "--tokenizer", tok, *MICRO)
    _same_losses(one, two)
    ckpt = tmp_path / "fsdp2" / "checkpoints" / "step_0000004"
    assert {"dcp", "rng.safetensors", "config.json", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # each rank wrote its own shards
    assert "model.safetensors" not in {p.name for p in ckpt.iterdir()}


UNDROPPED = ("--capacity-factor", "64")
"""No token dropping: each layout's dropping decides over its own share of the batch (with expert parallelism,
over the ranks of an ep group), so runs that change the layout compare with one process only without it."""


@pytest.fixture(scope="module")
def single_undropped(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_single_undropped")
    return out, _train_in_process(out, *UNDROPPED, "--tokenizer", str(single[0] / "tokenizer" / "tokenizer.json"))


def test_hsdp_with_expert_parallelism_on_4_ranks_logs_single_process_losses(single_undropped, tmp_path):
    """Mesh (dp 2, ep 2), 10 steps: the dense weights HSDP-sharded (2 replicas of 2 shards), each block of experts
    over the ep ranks and FSDP-sharded over the 2 ranks holding it; the expert load and the all-to-all's traffic
    reported."""
    ten = ("--max-steps", "10", "--eval-every", "10", "--save-every", "10", "--tokenizer",
           str(single_undropped[0] / "tokenizer" / "tokenizer.json"), *UNDROPPED)
    one = _train_in_process(tmp_path / "one", *ten)
    four = _torchrun(4, tmp_path / "hsdp4", "--fsdp", "--dp-replicate", "2", "--expert-parallel", "2", *ten)
    assert len(four) == 10
    _same_losses(one, four)
    assert all(r["comm_token_copies"] > 0 for r in four)
    for a, b in zip(one, four, strict=True):  # each expert's share of the step's assignments
        torch.testing.assert_close(torch.tensor(b["expert_load"]), torch.tensor(a["expert_load"]), rtol=0, atol=1e-5)


def test_a_model_without_device_groups_trains_with_fsdp_and_expert_parallelism(single_undropped, tmp_path):
    """n_group = 1 (V2-Lite's greedy routing): experts over 2 ranks, which are token dropping's devices; undropped,
    the one-process losses; with dropping (capacity 1), each rank drops over capacity on what reaches it."""
    tok = str(single_undropped[0] / "tokenizer" / "tokenizer.json")
    flat = ["--set", "n_group=1", "--set", "topk_group=1", "--tokenizer", tok]
    one = _train_in_process(tmp_path / "one", *UNDROPPED, *flat)
    _same_losses(one, _torchrun(2, tmp_path / "ep2", "--fsdp", "--expert-parallel", "2", *UNDROPPED, *flat))
    dropping = _torchrun(2, tmp_path / "drop", "--fsdp", "--expert-parallel", "2", "--capacity-factor", "1", *flat)
    assert all(r["dropped_fraction"] > 0 for r in dropping) and all(r["dropped_fraction"] == 0 for r in one)


def test_a_run_sharded_with_experts_on_4_ranks_resumes_on_2_and_in_one_process(single_undropped, tmp_path):
    """Saved by 4 ranks (FSDP + 4-way expert parallelism), stopped after step 2 (step 4's checkpoint removed):
    resumed on the same mesh (bit-exact), on 2 ranks with 2-way expert parallelism (and activation checkpointing,
    the group size stated), with --fsdp alone, and in one process (DCP reshards the experts' DTensors): steps 3-4
    log what one process logged; `dsv2 export` of it is the model restored in one process, tensor for tensor."""
    from safetensors.torch import load_file

    import dsv2
    from dsv2.model import DeepseekV2
    from dsv2.training.sharded import restore_sharded

    one_dir, one = single_undropped
    tok = str(one_dir / "tokenizer" / "tokenizer.json")
    straight = _torchrun(4, tmp_path / "run", "--fsdp", "--expert-parallel", "4", "--tokenizer", tok, *UNDROPPED)
    _same_losses(one, straight)
    def ranks(n: int) -> list[str]:
        return [*_launch(n), "-m", "dsv2", "train", "--fsdp"]

    for name, cmd in (("same", [*ranks(4), "--expert-parallel", "4"]),
                      ("ep2", [*ranks(2), "--expert-parallel", "2", "--activation-checkpointing", "--dp-shard", "2"]),
                      ("fsdp2", ranks(2)), ("one", [PYTHON, "-m", "dsv2", "train"])):
        run = tmp_path / name
        shutil.copytree(tmp_path / "run", run)
        shutil.rmtree(run / "checkpoints" / "step_0000004")
        res = subprocess.run([*cmd, "--out", str(run), "--resume", "--sample-tokens", "0"], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        _same_losses(one[2:], _metrics(run)[2:])
        if name == "same":  # the same mesh: bit-exact (the shards, moments, step and RNG come back as they were)
            assert [r["loss"] for r in _metrics(run)[2:]] == [r["loss"] for r in straight[2:]]

    ckpt = tmp_path / "run" / "checkpoints" / "step_0000004"
    from conftest import run_dsv2

    r = run_dsv2(["export", str(ckpt), str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr
    model = DeepseekV2(dsv2.ModelConfig.from_json(ckpt / "config.json"))
    restore_sharded(ckpt, model, None)  # the whole model in one process
    dsv2.save_pretrained(model, tmp_path / "ref")
    got, want = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in got  # every expert under its official name
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(dsv2.from_pretrained(tmp_path / "hf").eval()(ids), dsv2.cpu.optimize(model).eval()(ids))


def test_cpu_offload_logs_single_process_losses(single, tmp_path):
    """--cpu-offload: FSDP2's CPUOffloadPolicy, the optimizer step on the shards in host memory (on a CPU run the
    same code path, without the copies a GPU run makes)."""
    tok = str(single[0] / "tokenizer" / "tokenizer.json")
    _same_losses(single[1], _torchrun(2, tmp_path / "offload", "--fsdp", "--cpu-offload", "--tokenizer", tok, *MICRO))


def test_activation_checkpointing_changes_memory_not_losses(single, tmp_path):
    one_dir, one = single
    tok = str(one_dir / "tokenizer" / "tokenizer.json")
    _same_losses(one, _train_in_process(tmp_path / "ac", "--activation-checkpointing", "--tokenizer", tok, *MICRO))


@pytest.mark.parametrize("argv,message", [
    (["--fsdp"], "this is one process"),
    (["--dp-replicate", "2"], "dp_replicate applies with fsdp"),
    (["--cpu-offload"], "cpu_offload applies with fsdp"),
    (["--dp-shard", "2"], "dp_shard applies with fsdp"),
])
def test_bad_sharding_flags_are_one_line(tmp_path, argv, message):
    from conftest import run_dsv2

    r = run_dsv2(["train", "--out", str(tmp_path / "x"), *TRAIN_ARGS, *argv])
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_a_mesh_that_does_not_fit_the_processes_is_one_line(tmp_path):
    cmd = [*_launch(2), "-m", "dsv2", "train",
           "--out", str(tmp_path / "x"), *TRAIN_ARGS, "--fsdp", "--dp-shard", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "--dp-shard 4 x --dp-replicate 1 must be the number of processes (2)" in out
    assert "src/dsv2/" not in out  # no traceback through dsv2's code


def _without_model_flags(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--set":
            skip = True
        else:
            out.append(a)
    return out


def test_fsdp_from_a_checkpoint_logs_single_process_losses(single, tmp_path):
    """--init-from read one parameter at a time, each rank keeping its shard (checkpoint/reader.py)."""
    init = ["--init-from", str(single[0] / "checkpoints" / "step_0000004"), *MICRO]
    args = _without_model_flags(TRAIN_ARGS)
    from dsv2.cli import main

    assert main(["train", "--out", str(tmp_path / "one"), *args, *init]) == 0
    cmd = [*_launch(2), "-m", "dsv2", "train",
           "--out", str(tmp_path / "two"), *args, *init, "--fsdp"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    _same_losses(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"))


MEMORY_SCRIPT = """
import json, sys, torch
from pathlib import Path
from dsv2.distributed.fsdp import materialize
from dsv2.distributed.parallel import init_parallel
from dsv2.training.config import TrainConfig
from dsv2.training.setup import build_model, initial_weights

def hwm():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1])

par = init_parallel(1, "cpu", fsdp=True)
tc = TrainConfig(model=dict(hidden_size=512, num_hidden_layers=12, moe_intermediate_size=256, intermediate_size=1024,
                            n_routed_experts=16, vocab_size=4096), fsdp=True, progress=False)
before = hwm()
model = build_model(tc, torch.device("cpu"), meta=True)
par.wrap(model)
materialize(model, torch.device("cpu"), initial_weights(tc, model.config))
full = sum(4 * p.numel() for p in model.parameters())  # DTensors: the global size
print(json.dumps({"rank": par.rank, "added_kib": hwm() - before, "full_kib": full // 1024}))
par.close()
"""


def test_a_sharded_model_never_exists_whole_on_a_rank(tmp_path):
    """Built on the meta device, sharded, then filled one whole parameter at a time: each of 2 ranks' peak memory
    grows by half the model (its shards), the largest parameter (5% of it) and the process group's own memory
    (measured: 0.68 of the model), where a whole copy alone would be 1.0."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    cmd = [*_launch(2), str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 2
    for r in ranks:
        assert r["full_kib"] > 300_000  # a model large enough that a whole copy would show
        assert r["added_kib"] < 0.85 * r["full_kib"], r


KILL_SCRIPT = """
import os, sys
import torch.distributed as dist
import dsv2.training.sharded as sharded

save = sharded.dcp.save


def dying_save(state, checkpoint_id):
    if dist.get_rank() == 1 and "step_0000004" in checkpoint_id:
        os._exit(9)  # rank 1 dies while the ranks write the step-4 checkpoint
    return save(state, checkpoint_id=checkpoint_id)


sharded.dcp.save = dying_save
from dsv2.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_killed_mid_checkpoint_leaves_the_last_one_whole(single, tmp_path):
    tok = str(single[0] / "tokenizer" / "tokenizer.json")
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    cmd = [*_launch(2), str(script), "train",
           "--out", str(run), *TRAIN_ARGS, "--fsdp", "--tokenizer", tok, *MICRO]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_0000002"]
    res = subprocess.run([PYTHON, "-m", "dsv2", "train", "--out", str(run), "--resume", "--sample-tokens", "0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _same_losses(single[1][2:], _metrics(run)[2:])


def test_fsdp_gathers_bf16_weights_under_bf16_autocast(single, tmp_path):
    """--dtype bf16: weights gathered and computed in bf16, reduced in fp32: the losses stay near fp32's."""
    tok = str(single[0] / "tokenizer" / "tokenizer.json")
    args = [a if a != "fp32" else "bf16" for a in TRAIN_ARGS]
    cmd = [*_launch(2), "-m", "dsv2", "train",
           "--out", str(tmp_path / "bf16"), *args, "--fsdp", "--tokenizer", tok, *MICRO]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    for a, b in zip(single[1], _metrics(tmp_path / "bf16"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.05, (a["loss"], b["loss"])



def test_a_damaged_shard_is_set_aside_and_a_run_ends_without_a_sample(single, tmp_path):
    """A sharded run's final sample is skipped with how to export (exit 0); a truncated shard of the newest
    checkpoint is named, set aside, and the run resumes from the one before."""
    tok = str(single[0] / "tokenizer" / "tokenizer.json")
    cmd = [*_launch(2), "-m", "dsv2", "train",
           "--out", str(tmp_path / "run"), *TRAIN_ARGS, "--sample-tokens", "5", "--fsdp", "--tokenizer", tok, *MICRO]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and "no sample; `dsv2 export" in res.stdout, res.stderr[-2000:]
    shard = sorted((tmp_path / "run" / "checkpoints" / "step_0000004" / "dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    res = subprocess.run([PYTHON, "-m", "dsv2", "train", "--out", str(tmp_path / "run"), "--resume", "--max-steps",
                          "4", "--sample-tokens", "0"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "is missing or truncated" in res.stderr
    assert (tmp_path / "run" / "checkpoints" / "damaged-step_0000004").is_dir()
    _same_losses(single[1][2:], _metrics(tmp_path / "run")[2:])


def test_a_checkpoint_before_any_optimizer_step_holds_no_made_up_state(tmp_path):
    """Every step so far skipped (non-finite): AdamW has no state, which DCP's get_state_dict would make up (a step
    with zero gradients, step count 1). Saved without it, a restore leaves a fresh AdamW as built; after a real step,
    the step count and moments come back as they were."""
    from conftest import tiny_config

    from dsv2.distributed.parallel import Parallel
    from dsv2.model import DeepseekV2
    from dsv2.training.run_dir import RunDir
    from dsv2.training.sharded import restore_sharded, save_sharded

    torch.manual_seed(0)
    model, fresh = DeepseekV2(tiny_config()), DeepseekV2(tiny_config())
    opt, opt2 = torch.optim.AdamW(model.parameters()), torch.optim.AdamW(fresh.parameters())
    run = RunDir(tmp_path / "run")
    run.checkpoints_dir.mkdir(parents=True)
    ckpt = save_sharded(run, 1, model, opt, {"step": 1}, None, 2, Parallel())
    assert not opt.state  # saving took no step
    restore_sharded(ckpt, fresh, opt2)
    assert not opt2.state
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(ids, targets=ids).backward()
    opt.step()
    restore_sharded(save_sharded(run, 2, model, opt, {"step": 2}, None, 2, Parallel()), fresh, opt2)
    assert [s["step"] for s in opt2.state.values()] == [s["step"] for s in opt.state.values()]
    assert all(torch.equal(opt2.state[b]["exp_avg"], opt.state[a]["exp_avg"])
               for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
