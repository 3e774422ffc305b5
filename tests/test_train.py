"""Training loop: schedule, optimizer groups, metrics, checkpoints, exact resume after SIGKILL and Ctrl-C through
the CLI with no MKL_CBWR in the environment, non-finite steps, config files. All runs are tiny (fp32, CPU) on a
small corpus written by the test (conftest.py)."""

import json
import math
import signal

import pytest
from conftest import TRAIN_MODEL, run_dsv2, tiny_config, train_argv

import dsv2
from dsv2.training.config import TrainConfig, TrainingError, load_train_config
from dsv2.training.schedule import build_optimizer, lr_at
from dsv2.training.setup import latest_checkpoint
from dsv2.training.trainer import train

MODEL = TRAIN_MODEL


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
    model = dsv2.DeepseekV2(tiny_config(**MODEL))
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


def signal_at(step: int, sig: int) -> str:
    """A prelude for run_dsv2: the process sends itself `sig` while fetching that (0-based) step's batch. SIGKILL
    leaves nothing a chance to clean up; SIGINT is a Ctrl-C."""
    return (f"import os\nfrom dsv2.training import data\nreal = data.TokenDataset.batch_for_step\n"
            f"def batch(self, step, *a, **k):\n    if step == {step}:\n        os.kill(os.getpid(), {int(sig)})\n"
            f"    return real(self, step, *a, **k)\ndata.TokenDataset.batch_for_step = batch\n")


def test_resume_with_no_other_flags_continues_exactly(corpus, tmp_path):
    """A run with non-default settings, stopped by SIGKILL (after its step-3 checkpoint) or by Ctrl-C (which
    checkpoints at the step boundary), resumed with `--out RUN --resume` alone, logs bit-identical per-step losses
    to a straight run. No MKL_CBWR in any of these processes' environments (run_dsv2): dsv2 sets it up itself."""
    straight, killed, interrupted = tmp_path / "straight", tmp_path / "killed", tmp_path / "interrupted"
    r = run_dsv2(train_argv(corpus, straight), prelude="from dsv2 import reproducibility as R\n"
                 "import atexit\natexit.register(lambda: print('mkl strict:', R.mkl_reproducible()))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mkl strict: True" in r.stdout or "mkl strict: None" in r.stdout  # None: a torch without MKL

    r = run_dsv2(train_argv(corpus, killed), prelude=signal_at(4, signal.SIGKILL))
    assert r.returncode == -9, r.stderr[-2000:]
    assert latest_checkpoint(killed).name == "step_0000003" and max(losses(killed)) == 4

    r = run_dsv2(train_argv(corpus, interrupted), prelude=signal_at(3, signal.SIGINT))
    assert r.returncode == 130, r.stderr[-2000:]
    assert "stopped at step 4 of 6" in r.stderr and f"dsv2 train --out {interrupted} --resume" in r.stderr
    assert latest_checkpoint(interrupted).name == "step_0000004"  # the step boundary, not a save_every multiple

    data_meta = (killed / "data" / "meta.json").stat().st_mtime_ns
    for run in (killed, interrupted):
        r = run_dsv2(["train", "--out", str(run), "--resume", "--sample-tokens", "0"])
        assert r.returncode == 0, r.stderr[-2000:]
        assert list(losses(run)) == [1, 2, 3, 4, 5, 6]
        assert losses(run) == losses(straight)  # bit-identical (fp32, CPU, deterministic data and drops)
        assert json.loads((run / "train_config.json").read_text())["batch_size"] == 4  # not the default 16
    assert (killed / "data" / "meta.json").stat().st_mtime_ns == data_meta  # the token files were reused


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
    (tmp_path / "f.yaml").write_text("lr: 1e-3\ndecay_at: [.5, 0.9]\nwarmup_steps: 10\n")  # YAML 1.1 reads 1e-3 as text
    f = load_train_config(tmp_path / "f.yaml")
    assert f.lr == 1e-3 and f.decay_at == (0.5, 0.9) and f.warmup_steps == 10
    (tmp_path / "c.yaml").write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="unknown training config keys"):
        load_train_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_cli_train_then_generate(corpus, tmp_path):
    out = tmp_path / "cli"
    r = run_dsv2(train_argv(corpus, out, "--sample-tokens", "5", max_steps=3), env={"PYTHONHASHSEED": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation loss" in r.stdout and "unigram entropy" in r.stdout
    ckpt = latest_checkpoint(out)
    g = run_dsv2(["generate", "--model", str(ckpt), "--ids", "0,5,6", "--max-new-tokens", "3"])
    assert g.returncode == 0 and g.stdout.strip(), g.stderr
