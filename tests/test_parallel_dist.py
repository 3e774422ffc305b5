"""Expert and data parallelism on real ranks: gloo on CPU, 2 and 4 processes.

- parity: logits, loss and gradients (before and after clipping) of the expert-parallel model equal the
  one-process model with the same weights and data (fp32, 1e-5), with token dropping on, for ep = 2, ep = 4 and
  ep = 2 x dp = 2 (with gradient accumulation), and when every token goes to rank 0 (the others receive nothing);
- dispatch counts: under group_limited_greedy no token is sent to more than topk_group ranks (and greedy does
  exceed it, so the check has teeth);
- training through torchrun: `--expert-parallel 2` on 2 processes, `--expert-parallel 4` on 4 and 2 data-parallel
  ranks accumulating 2 micro-batches each log the same per-step losses as one process; the 4-rank checkpoint is
  the one-process Hugging Face layout, loads in one process, and resumes on 2 ranks and in one process with the
  same losses (optimizer moments included).

Workers of the parity tests are spawned from pytest (torch.multiprocessing); training runs go through
`python -m torch.distributed.run --standalone`, as a user would launch them.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_config

from dsv2.model import DeepseekV2
from dsv2.model.moe import MoE
from dsv2.training.balance import balance_losses

TOL = dict(rtol=1e-5, atol=1e-5)
PYTHON = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


def _config(**overrides):
    base = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                vocab_size=96, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=24, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=16, n_shared_experts=1,
                num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=64)
    return tiny_config(**{**base, **overrides})


def _recorded(par) -> dict:
    """Each expert-parallel dispatcher's latest AllToAllDispatched, by id (the dispatchers keep nothing)."""
    last = {}
    for d in par.dispatchers:
        def dispatch(*a, d=d, real=d.dispatch, **k):
            out = real(*a, **k)
            last[id(d)] = out[2]
            return out
        d.dispatch = dispatch
    return last


# ------------------------------------------------------------------------------------------------------------
# parity of one training step
def _loss(model, x, y, cfg, token_drop):
    logits, routings = model(x, return_routing=True, token_drop=token_drop)
    B, S = x.shape
    aux = sum(balance_losses(r.scores_TE.view(B, S, -1), r.experts_TK.view(B, S, -1), cfg)["total"]
              for r in routings)
    return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten()) + aux


def _rank0_only(model):
    """Route every token to the experts of rank 0's block (the same patch on both models)."""
    for m in model.modules():
        if isinstance(m, MoE):
            gate, forward = m.gate, m.gate.forward

            def patched(x, gate=gate, forward=forward):
                r = forward(x)
                r.experts_TK = r.experts_TK % (gate.n_experts // 4)
                r.weights_TK = r.scores_TE.gather(-1, r.experts_TK)
                return r
            gate.forward = patched


def _parity_case(par_ep: int, cfg, accum: int, rank0_only: bool = False) -> None:
    from dsv2.distributed.parallel import init_parallel
    from dsv2.training.token_drop import DeviceTokenDrop

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = DeepseekV2(cfg).train()
    ref = copy.deepcopy(model)
    if rank0_only:
        _rank0_only(model)
        _rank0_only(ref)
    B, S = 8, 12
    g = torch.Generator().manual_seed(1)
    x = torch.randint(cfg.vocab_size, (B, S), generator=g)
    y = torch.randint(cfg.vocab_size, (B, S), generator=g)
    protect = torch.tensor([True, False, False, False, False, False, True, False])
    droppers = [DeviceTokenDrop(cfg, 1.0) for _ in range(2)]

    par = init_parallel(par_ep, "cpu")
    net = par.wrap(model)
    token_drop = par.token_drop(droppers[0], cfg)
    last = _recorded(par)
    local = B // world
    micro = local // accum
    ep, dp = par.ep, par.dp

    # the reference: forward j of replica r sees micro-batch j of each of its ep ranks, in rank order
    ref_logits = torch.empty(B, S, cfg.vocab_size)
    for r in range(dp):
        for j in range(accum):
            rows = torch.cat([torch.arange(k * local + j * micro, k * local + (j + 1) * micro)
                              for k in range(r * ep, (r + 1) * ep)])
            droppers[1].protect = protect[rows]
            logits, loss = _loss(ref, x[rows], y[rows], cfg, droppers[1])
            (loss / (dp * accum)).backward()
            ref_logits[rows] = logits.detach()
    for j in range(accum):  # as the trainer runs them: gradients synced in the last micro-batch only
        rows = torch.arange(rank * local + j * micro, rank * local + (j + 1) * micro)
        droppers[0].protect = protect[rows]
        with par.micro_batch(net, last=j == accum - 1):
            logits, loss = _loss(net, x[rows], y[rows], cfg, token_drop)
            (loss / accum).backward()
        torch.testing.assert_close(logits.detach(), ref_logits[rows], **TOL)
    assert droppers[0].dropped > 0 or rank0_only  # dropping was exercised
    if rank0_only:  # the other ranks received nothing, and still took part in every exchange
        for d in par.dispatchers:
            assert (sum(last[id(d)].recv_assign) == 0) == (par.ep_rank != 0)

    lo, hi = par.ep_rank * cfg.n_routed_experts // ep, (par.ep_rank + 1) * cfg.n_routed_experts // ep
    ref_params = dict(ref.named_parameters())

    def check_grads():
        for name, p in model.named_parameters():
            want = ref_params[name].grad
            if par.is_expert(p):
                want = want[lo:hi]
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")

    check_grads()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    norm = par.clip_grad_norm_(model, 0.05)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    assert norm > 0.05  # clipping was exercised
    check_grads()
    full = par.full_parameters(model)
    for name, t in full.items():
        torch.testing.assert_close(t, ref_params[name].detach(), rtol=0, atol=0)


def _parity_worker(rank: int, world: int, port: int, cases: list[dict]) -> None:
    _init(rank, world, port)
    for case in cases:
        _parity_case(case["ep"], _config(**case.get("config", {})), case.get("accum", 1),
                     case.get("rank0_only", False))
    dist.destroy_process_group()


def test_parity_two_ranks():
    _spawn(_parity_worker, 2, [dict(ep=2), dict(ep=2, accum=2, config=dict(n_shared_experts=0))])


def test_parity_four_ranks():
    _spawn(_parity_worker, 4, [dict(ep=4), dict(ep=2, accum=2), dict(ep=4, rank0_only=True)])


# ------------------------------------------------------------------------------------------------------------
# dispatch counts: at most M ranks per token
def _ranks_worker(rank: int, world: int, port: int) -> None:
    from dsv2.distributed.parallel import init_parallel

    _init(rank, world, port)
    for method, M in (("group_limited_greedy", 1), ("group_limited_greedy", 2), ("greedy", 4)):
        cfg = _config(topk_method=method, topk_group=M, num_experts_per_tok=4)
        torch.manual_seed(0)
        model = DeepseekV2(cfg).eval()
        par = init_parallel(4, "cpu")
        par.wrap(model)
        last = _recorded(par)
        x = torch.randint(cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            model(x)
        most = 0
        for d in par.dispatchers:
            sent = last[id(d)]
            assert sum(sent.send_rows) == int(sent.ranks_per_token.sum())  # one copy per (token, rank)
            most = max(most, int(sent.ranks_per_token.max()))
            if method != "greedy":
                assert most <= M, f"a token was sent to {most} ranks with topk_group={M}"
        if method == "greedy":
            assert most > 2  # unrestricted routing does spread tokens wider: the bound above is not vacuous
    dist.destroy_process_group()


def test_tokens_visit_at_most_M_ranks():
    _spawn(_ranks_worker, 4)


# ------------------------------------------------------------------------------------------------------------
# training through torchrun, checkpoints across world sizes
TRAIN_ARGS = ["--max-steps", "4", "--batch-size", "8", "--seq-len", "32", "--max-bytes", "200000", "--eval-every",
              "4", "--save-every", "2", "--dtype", "fp32", "--sample-tokens", "0", "--set", "num_hidden_layers=2",
              "--set", "hidden_size=64", "--set", "vocab_size=512"]
KEYS = ("loss", "aux_loss", "grad_norm", "dropped_fraction", "expert_balance", "device_balance", "comm_balance")


def _torchrun(nproc: int, out: Path, *extra: str) -> list[dict]:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dsv2",
           "train", "--out", str(out), *TRAIN_ARGS, *extra]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    print(f"{nproc} ranks: {time.time() - t0:.1f}s")
    return _metrics(out)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in KEYS:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k, ra[k], rb[k])
        if "val_loss" in ra:
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)


def _train_in_process(out: Path, *extra: str) -> list[dict]:
    from dsv2.cli import main

    assert main(["train", "--out", str(out), *TRAIN_ARGS, *extra]) == 0
    return _metrics(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, _train_in_process(out)


def test_expert_parallel_2_logs_single_process_losses(single, tmp_path):
    one_dir, one = single
    two = _torchrun(2, tmp_path / "ep2", "--expert-parallel", "2", "--tokenizer",
                    str(one_dir / "tokenizer" / "tokenizer.json"))
    _same_losses(one, two)
    for r in two:
        assert r["comm_token_copies"] > 0 and r["comm_bytes"] > 0
        assert 1 <= r["comm_ranks_per_token"] <= 2  # tiny: topk_group = 2
    assert "comm_bytes" not in one[0]


def test_data_parallel_with_accumulation_logs_single_process_losses(single, tmp_path):
    """2 data-parallel ranks, 2 micro-batches each: gradients are synced in the last micro-batch only
    (Parallel.micro_batch: DDP's no_sync before it), and the run logs the losses of one process with the same
    micro-batches (4 of 2 sequences: dropping decides per micro-batch)."""
    tok = str(single[0] / "tokenizer" / "tokenizer.json")
    one = _train_in_process(tmp_path / "one", "--micro-batch-size", "2", "--tokenizer", tok)
    two = _torchrun(2, tmp_path / "dp2", "--micro-batch-size", "2", "--tokenizer", tok)
    _same_losses(one, two)


def test_checkpoint_from_4_ranks_loads_and_resumes_on_2_and_1(single, tmp_path):
    from safetensors import safe_open

    from dsv2.checkpoint import from_pretrained

    one_dir, one = single
    tok = str(one_dir / "tokenizer" / "tokenizer.json")
    four = _torchrun(4, tmp_path / "ep4", "--expert-parallel", "4", "--tokenizer", tok)
    _same_losses(one, four)
    ckpt4, ckpt1 = tmp_path / "ep4" / "checkpoints", one_dir / "checkpoints"
    # the same Hugging Face layout as one process: every expert under its official name, same values
    with safe_open(ckpt4 / "step_0000004" / "model.safetensors", "pt") as a, \
            safe_open(ckpt1 / "step_0000004" / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert "model.layers.1.mlp.experts.15.down_proj.weight" in a.keys()
        for k in a.keys():
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k), **TOL)
    model = from_pretrained(ckpt4 / "step_0000002")
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 16

    def resume_dir(name: str) -> Path:
        d = tmp_path / name / "checkpoints"
        shutil.copytree(ckpt4 / "step_0000002", d / "step_0000002")
        return tmp_path / name

    two = _torchrun(2, resume_dir("resume2"), "--expert-parallel", "2", "--tokenizer", tok, "--resume")
    _same_losses(four[2:], two)
    one_more = _train_in_process(resume_dir("resume1"), "--tokenizer", tok, "--resume")
    _same_losses(four[2:], one_more)


def test_a_failure_on_rank_0_alone_stops_every_rank_with_one_line(single, tmp_path):
    """Rank 0 alone opens the run directory: its refusal (the directory holds a run) must reach rank 1, which
    would otherwise wait in a collective; one error line, no traceback from any rank."""
    one_dir, _ = single
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsv2", "train",
           "--out", str(one_dir), "--expert-parallel", "2", *TRAIN_ARGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert out.count("dsv2 train: error:") == 1 and "already holds a run" in out
    # no frame of dsv2's code in any traceback: only torchrun's own report
    assert "RankError" not in out and "Connection closed" not in out and "src/dsv2/" not in out
