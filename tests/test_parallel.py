"""dsv2.distributed and the routing simulator in one process: settings that cannot work fail clearly, the one-process
Parallel() changes nothing, and the routing simulator obeys the device bound. Multi-process behaviour is in
test_parallel_dist.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from dsv2.checkpoint import save_pretrained
from dsv2.cli import main
from dsv2.distributed.parallel import Parallel, ParallelError, check_expert_parallel, init_parallel
from dsv2.model import DeepseekV2
from dsv2.tools.routing_sim import group_limited_topk, random_scores, simulate


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("overrides, ep, world, match", [
    (dict(n_routed_experts=16, n_group=4), 3, 6, r"must divide n_routed_experts=16"),
    (dict(n_routed_experts=16, n_group=2, topk_group=1), 4, 4, r"n_group=2 must be 1 or a multiple"),
    (dict(n_routed_experts=16, n_group=4), 4, 6, r"must divide the number of processes \(6\)"),
    (dict(n_routed_experts=None), 2, 2, r"needs a model with routed experts"),
])
def test_bad_expert_parallel_settings(overrides, ep, world, match):
    with pytest.raises(ParallelError, match=match):
        check_expert_parallel(tiny_config(**overrides), ep, world)


def test_good_settings_pass():
    check_expert_parallel(tiny_config(n_group=8, topk_group=3), 4, 8)  # two groups per rank, dp = 2
    check_expert_parallel(tiny_config(), 1, 3)
    check_expert_parallel(tiny_config(n_group=1, topk_group=1), 4, 4)  # no device groups (V2-Lite): any ep


def test_expert_parallel_needs_torchrun(tmp_path, capsys):
    with pytest.raises(ParallelError, match="torchrun --nproc_per_node=2"):
        init_parallel(2)
    assert main(["train", "--expert-parallel", "2", "--out", str(tmp_path / "run")]) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_one_process_parallel_is_the_identity():
    par = init_parallel(1)
    assert (par.world, par.rank, par.ep, par.dp, par.is_main) == (1, 0, 1, 1, True)
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=2, hidden_size=32, vocab_size=64)
    model, ref = DeepseekV2(cfg), DeepseekV2(cfg)
    ref.load_state_dict(model.state_dict())
    assert par.wrap(model) is model
    x = torch.randint(64, (2, 8))
    for m in (model, ref):
        m(x).square().mean().backward()
    norm = par.clip_grad_norm_(model, 1e-3)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert par.mean([1.5, 2.0]) == [1.5, 2.0]
    assert par.full_parameters(model).keys() == dict(model.named_parameters()).keys()
    assert par.comm_metrics() == {}
    assert par.in_turn(lambda: 7) == 7


def test_group_limited_topk_matches_the_model_router():
    cfg = tiny_config()
    router = DeepseekV2(cfg).model.layers[1].mlp.gate
    x = torch.randn(64, cfg.hidden_size)
    r = router(x)
    got = group_limited_topk(r.scores_TE.detach(), cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok)
    assert torch.equal(got.sort(-1).values, r.experts_TK.sort(-1).values)


def test_routing_sim_at_v2_scale():
    rows = simulate(random_scores(2048, 160), n_devices=8, top_k=6)
    assert [r["M"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert 1 <= r["devices_per_token"] <= r["M"] + 1e-9
        assert r["off_device_copies_per_token"] <= r["devices_per_token"]
    assert rows[0]["devices_per_token"] == 1.0
    assert rows[-1]["traffic_vs_topk"] == rows[-1]["affinity_vs_topk"] == 1.0
    traffic = [r["traffic_vs_topk"] for r in rows]
    assert traffic == sorted(traffic) and traffic[2] < 0.8  # M = 3 cuts a third of the traffic or more
    assert rows[5]["devices_per_token"] == pytest.approx(rows[-1]["devices_per_token"])  # K = 6 caps it at M = 6


def test_routing_sim_cli(tmp_path, capsys):
    assert main(["routing-sim", "--tokens", "512", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 3 |" in out and "160 experts on 8 devices, top-6" in out
    meta = json.loads((tmp_path / "routing_sim.json").read_text())
    assert (meta["experts"], meta["devices"], meta["top_k"], len(meta["rows"])) == (160, 8, 6, 8)
    assert (tmp_path / "routing_sim.png").stat().st_size > 10_000
    assert (tmp_path / "routing_sim.md").read_text().startswith("160 experts")


def test_parallel_repr():
    assert "ep=1" in repr(Parallel())


def test_routing_sim_with_a_checkpoint_router(tmp_path, capsys):
    from dsv2.training.data import save_tokenizer, train_tokenizer

    cfg = tiny_config(num_hidden_layers=2, hidden_size=32, vocab_size=512)
    torch.manual_seed(0)
    save_pretrained(DeepseekV2(cfg), tmp_path / "ckpt")
    text = ["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20]
    tok = train_tokenizer(text, 300)
    save_tokenizer(tok, tmp_path / "ckpt")
    (tmp_path / "doc.txt").write_text("import os\nprint(os.getcwd())\n" * 200)
    assert main(["routing-sim", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "doc.txt"),
                 "--devices", "4", "--tokens", "512", "--out", str(tmp_path / "sim")]) == 0
    meta = json.loads((tmp_path / "sim" / "routing_sim.json").read_text())
    assert (meta["experts"], meta["devices"], meta["top_k"]) == (16, 4, 4)
    assert "checkpoint" in meta["source"]
    assert all(r["devices_per_token"] <= r["M"] + 1e-9 for r in meta["rows"])
