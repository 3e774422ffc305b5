"""Training loop: schedule, optimizer groups, metrics, checkpoints, exact resume after SIGKILL, non-finite steps,
config files. All runs are tiny (fp32, CPU) on a small corpus written by the test."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dsv2
from dsv2.train import TrainConfig, TrainingError, build_optimizer, latest_checkpoint, load_train_config, lr_at, train

MODEL = dict(vocab_size=384, hidden_size=48, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "router", "expert", "latent", "cache", "token", "device"]
    for i in range(40):
        idx = torch.randint(0, len(words), (300,), generator=g).tolist()
        (d / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    return d


def config(corpus, out, **kw):
    base = dict(preset="tiny", model=MODEL, data=[str(corpus)], out=str(out), max_steps=6, batch_size=4,
                micro_batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2,
                save_every=3, keep_last=5, dtype="fp32", progress=False, val_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_schedule_warmup_then_v2_step_decay_and_cosine():
    tc = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(59, tc) == 1.0 and lr_at(60, tc) == pytest.approx(0.316)
    assert lr_at(89, tc) == pytest.approx(0.316) and lr_at(90, tc) == pytest.approx(0.316**2)
    cos = TrainConfig(lr=1.0, warmup_steps=0, max_steps=100, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(1.0) and lr_at(100, cos) == pytest.approx(0.1)
    assert lr_at(50, cos) == pytest.approx(0.55)


def test_weight_decay_on_matrices_only():
    model = dsv2.DeepseekV2(dsv2.get_config("tiny", **MODEL))
    opt = build_optimizer(model, TrainConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_run_writes_metrics_checkpoints_and_a_loadable_model(corpus, tmp_path):
    summary = train(config(corpus, tmp_path / "run", capacity_factor=0.5))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        for key in ("loss", "expert_balance", "device_balance", "comm_balance", "lr", "grad_norm", "tokens_per_s",
                    "expert_load_max_mean", "dropped_fraction", "expert_load"):
            assert key in r, key
        assert len(r["expert_load_max_mean"]) == 1 and len(r["expert_load"][0]) == 8  # one MoE layer, 8 experts
        assert math.isclose(sum(r["expert_load"][0]), 1.0, abs_tol=1e-3)
        assert 0 < r["dropped_fraction"] < 1  # capacity factor 0.5 must drop some assignments
    assert "val_loss" in rows[2] and "val_loss" in rows[5] and "val_loss" not in rows[0]
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_0000006" and summary["checkpoint"] == str(ckpt)
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors",
            "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    model = dsv2.from_pretrained(ckpt)
    out = dsv2.generate(model, [[0, 5, 6]], max_new_tokens=4)
    assert len(out[0]) <= 4
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_keep_last_checkpoints(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", max_steps=4, save_every=1, keep_last=2, eval_every=100))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000004"]


def run_in_process(tc, tmp_path, resume=False, kill_at_step=None):
    """Train in a fresh interpreter. MKL_CBWR=AUTO,STRICT makes MKL's fp32 GEMMs bitwise reproducible whatever
    the memory alignment, which otherwise varies between processes. kill_at_step: the child SIGKILLs itself
    while fetching that (0-based) step's batch, so nothing gets a chance to clean up."""
    cfg = tmp_path / f"tc-{os.getpid()}-{resume}-{kill_at_step}.json"
    cfg.write_text(json.dumps(tc.to_dict()))
    script = textwrap.dedent(f"""
        import json, os, signal
        from dsv2 import data, train
        real = data.TokenDataset.batch_for_step
        def batch(self, step, *a, **k):
            if step == {kill_at_step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, step, *a, **k)
        data.TokenDataset.batch_for_step = batch
        train.train(train.TrainConfig(**json.loads(open({str(cfg)!r}).read())), resume={resume})
    """)
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)


def test_resume_after_sigkill_gives_identical_losses(corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_in_process(config(corpus, straight), tmp_path).returncode == 0
    tc = config(corpus, killed)
    proc = run_in_process(tc, tmp_path, kill_at_step=4)  # after the step-3 checkpoint, mid-run
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest_checkpoint(killed).name == "step_0000003"
    assert max(losses(killed)) == 4  # step 4 was logged before the kill; the resumed run redoes it
    proc = run_in_process(tc, tmp_path, resume=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit-identical per-step losses (fp32, CPU, deterministic data and protection draws)


def test_non_finite_steps_are_skipped_then_stop_the_run(corpus, tmp_path, monkeypatch):
    tc = config(corpus, tmp_path / "run", max_steps=8, save_every=2, max_bad_steps=2)
    real_forward = dsv2.DeepseekV2.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real_forward(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 4:  # from step 3 on (2 micro-batches per step), every loss is NaN
                logits, routings = out
                return logits * float("nan"), routings
        return out

    monkeypatch.setattr(dsv2.DeepseekV2, "forward", poisoned)
    with pytest.raises(TrainingError, match="step_0000002"):
        train(tc)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, True, True]
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"  # the last good one is intact
    dsv2.from_pretrained(latest_checkpoint(tmp_path / "run"))


def test_config_files_and_flag_precedence(tmp_path):
    (tmp_path / "a.yaml").write_text("max_steps: 7\nlr: 0.01\nmodel:\n  num_hidden_layers: 2\n")
    (tmp_path / "b.toml").write_text("max_steps = 9\nschedule = 'cosine'\n")
    a = load_train_config(tmp_path / "a.yaml", lr=0.5)
    assert a.max_steps == 7 and a.lr == 0.5 and a.model == {"num_hidden_layers": 2}
    b = load_train_config(tmp_path / "b.toml")
    assert b.max_steps == 9 and b.schedule == "cosine"
    (tmp_path / "c.yaml").write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="unknown training config keys"):
        load_train_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_cli_train_then_generate(corpus, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    sets = [a for k, v in MODEL.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run([sys.executable, "-m", "dsv2", "train", "--data", str(corpus), "--out", str(out),
                        "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
                        "--save-every", "3", "--sample-tokens", "5", "--dtype", "fp32", *sets],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation loss" in r.stdout and "unigram entropy" in r.stdout
    ckpt = latest_checkpoint(out)
    g = subprocess.run([sys.executable, "-m", "dsv2", "generate", "--model", str(ckpt), "--ids", "0,5,6",
                        "--max-new-tokens", "3"], capture_output=True, text=True)
    assert g.returncode == 0 and g.stdout.strip(), g.stderr
