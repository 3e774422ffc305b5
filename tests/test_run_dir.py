"""Run directories: a new run never overwrites one, --resume keeps the run's settings and data, one trainer per
directory (an OS lock that dies with its process), damaged checkpoints are named and skipped, a finished run says
so. Runs are the tiny fp32 ones of conftest.py, through the CLI's main() (in process) or a child process."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import TRAIN_MODEL, train_argv

from dsv2.cli import main
from dsv2.training.config import TrainConfig, TrainingError
from dsv2.training.run_dir import RunDir
from dsv2.training.setup import latest_checkpoint, prepare_data
from dsv2.training.trainer import train


def snapshot(run):
    """Every file under the run with its bytes (but the lock's PID): what 'nothing in the directory changes'
    compares."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture
def finished(corpus, tmp_path):
    """A finished 6-step run with checkpoints at steps 3 and 6."""
    run = tmp_path / "run"
    assert main(train_argv(corpus, run)) == 0
    return run


def test_new_run_refuses_an_existing_one_and_changes_nothing(corpus, finished, capsys):
    before = snapshot(finished)
    capsys.readouterr()
    assert main(train_argv(corpus, finished, "--seq-len", "16")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(finished) in err and "--resume" in err and "another --out" in err and "--overwrite" in err
    assert "step 6 of 6, finished" in err
    assert snapshot(finished) == before


def test_overwrite_replaces_the_run_and_only_what_dsv2_wrote(corpus, finished):
    (finished / "notes.txt").write_text("mine")
    assert main(train_argv(corpus, finished, "--overwrite", max_steps=2, save_every=1)) == 0
    assert list(losses(finished)) == [1, 2]
    assert [p.name for p in RunDir(finished).checkpoints()] == ["step_0000001", "step_0000002"]
    assert (finished / "notes.txt").read_text() == "mine"
    assert main(["train", "--out", str(finished), "--resume", "--overwrite"]) == 2  # contradictory


def test_overwrite_with_a_mistake_leaves_the_old_run_whole(corpus, finished, capsys):
    before = snapshot(finished)
    assert main(train_argv(corpus, finished, "--overwrite", "--seq-len", "5000")) == 2  # past the context
    assert main(train_argv(corpus, finished, "--overwrite", "--data", str(finished / "nope"))) == 2
    ckpt = RunDir(finished).checkpoints()[-1]
    assert main(["train", "--out", str(finished), "--overwrite", "--init-from", str(ckpt), "--sample-tokens", "0",
                 "--max-steps", "2"]) == 2
    assert f"--overwrite would delete {ckpt}" in capsys.readouterr().err
    assert snapshot(finished) == before


def test_overwrite_keeps_files_dsv2_did_not_write(corpus, finished):
    for name in ("data/mine.txt", "plots/notes.md", "checkpoints/README", "tokenizer/vocab-notes.txt"):
        (finished / name).parent.mkdir(exist_ok=True)
        (finished / name).write_text("mine")
    assert main(train_argv(corpus, finished, "--overwrite", max_steps=1)) == 0
    for name in ("data/mine.txt", "plots/notes.md", "checkpoints/README", "tokenizer/vocab-notes.txt"):
        assert (finished / name).read_text() == "mine", name
    assert list(losses(finished)) == [1]


def test_a_run_stopped_while_preparing_its_data_is_a_run(corpus, tmp_path, capsys):
    """train_config.json is written before the data: a run killed while tokenizing is refused as a new run and
    replaced by --overwrite (its half-done tokenizer with it)."""
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "tokenizer.json").write_text("{}")  # no sources.json: killed before it was written
    assert main(train_argv(corpus, run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(train_argv(corpus, run, "--overwrite", max_steps=1)) == 0


def test_checkpoints_this_version_cannot_use_are_not_set_aside(finished, capsys):
    ckpt = RunDir(finished).checkpoints()[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["train_config"]["a_setting_from_a_newer_dsv2"] = 1  # unknown keys are ignored
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert main(["train", "--out", str(finished), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    state["train_config"]["lr"] = -1.0  # reads back, but this dsv2 refuses it: stop, move nothing
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert main(["train", "--out", str(finished), "--resume"]) == 2
    assert "cannot resume from" in capsys.readouterr().err and ckpt.is_dir()
    assert not RunDir(finished).set_aside_checkpoints()


def test_checkpoints_sort_by_step_and_ignore_other_names(tmp_path):
    run = RunDir(tmp_path)
    for name in ("step_0000100", "step_10000000", "step_0000100.bak", "step_x", "damaged-step_0000200"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in run.checkpoints()] == ["step_0000100", "step_10000000"]
    assert "checkpoint at step 10000000" in run.describe()


def test_resume_refuses_changed_settings_naming_each(finished, capsys):
    before = snapshot(finished)
    capsys.readouterr()
    assert main(["train", "--out", str(finished), "--resume", "--seq-len", "64", "--lr", "0.1", "--set",
                 "hidden_size=64", "--data", "stdlib"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for change in ("seq_len 32 -> 64", "lr 0.003 -> 0.1", "data [", "-> ['stdlib']", "'hidden_size': 48", "64}"):
        assert change in err, change
    assert snapshot(finished) == before


def test_resume_accepts_the_settings_that_may_change(finished, capsys):
    assert main(["train", "--out", str(finished), "--resume", "--max-steps", "8", "--save-every", "1",
                 "--eval-every", "4", "--sample-tokens", "0"]) == 0
    assert "the LR schedule of the remaining steps follows the new length" in capsys.readouterr().err
    assert list(losses(finished)) == list(range(1, 9))
    assert latest_checkpoint(finished).name == "step_0000008"
    assert json.loads((finished / "train_config.json").read_text())["max_steps"] == 8


def test_resuming_a_finished_run_says_so(finished, capsys):
    assert main(["train", "--out", str(finished), "--resume"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.splitlines() == [f"{finished} is already finished (step 6 of max_steps 6); to train it further: "
                                f"dsv2 train --out {finished} --resume --max-steps N (N > 6)"]


@pytest.mark.parametrize("named", ["optimizer.safetensors", "trainer_state.json", "model.safetensors"])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(corpus, tmp_path, capsys, named):
    """The straight 6-step run, and a copy whose step-6 checkpoint never got written (a kill) and whose step-4
    one is damaged: resume names the bad file, sets the checkpoint aside and redoes steps 3-6 from step 2, with
    the straight run's losses (one process: the same GEMM paths)."""
    tc = dict(preset="tiny", model=TRAIN_MODEL, data=[str(corpus)], max_steps=6, batch_size=4, micro_batch_size=2,
              seq_len=32, warmup_steps=2, eval_every=3, eval_batches=2, save_every=2, keep_last=3, dtype="fp32",
              progress=False)
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(TrainConfig(out=str(straight), **tc))
    train(TrainConfig(out=str(run), **tc))
    ckpts = RunDir(run).checkpoints()
    assert [c.name for c in ckpts] == ["step_0000002", "step_0000004", "step_0000006"]
    shutil.rmtree(ckpts[2])
    bad = ckpts[1] / named
    if named == "trainer_state.json":
        bad.write_text("{not json")
    else:
        bad.write_bytes(bad.read_bytes()[:-100])  # truncated
    capsys.readouterr()
    train(TrainConfig(out=str(run), **tc), resume=True)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step_0000004 is damaged" in warnings[0] and named in warnings[0]
    assert "set aside as damaged-step_0000004" in warnings[0] and "resumed from" in err
    assert (run / "checkpoints" / "damaged-step_0000004" / named).exists()  # kept for inspection
    assert losses(run) == losses(straight)


def test_resume_without_a_usable_checkpoint(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert main(train_argv(corpus, run, max_steps=2, save_every=5)) == 0  # the final step is saved
    for c in RunDir(run).checkpoints():
        (c / "trainer_state.json").write_text("[]")
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"dsv2 train: error: --resume: no checkpoint of .* reads back whole", err[-1])
    assert "damaged-*" in err[-1] and "another --out" in err[-1]
    assert main(["train", "--out", str(run), "--resume"]) == 2  # again: says where they went
    assert "were set aside as damaged (damaged-step_0000002)" in capsys.readouterr().err


def test_one_trainer_per_run_dir_and_no_stale_lock(corpus, tmp_path, capsys):
    """A trainer holds the directory; a second one is refused naming its PID; once the first is SIGKILLed the
    lock is gone with it (no stale lock) and the run resumes."""
    run = tmp_path / "run"
    prelude = ("import time\nfrom dsv2.training import data\nreal = data.TokenDataset.batch_for_step\n"
               "def batch(self, step, *a, **k):\n    if step == 2:\n        print('waiting', flush=True)\n"
               "        time.sleep(120)\n    return real(self, step, *a, **k)\n"
               "data.TokenDataset.batch_for_step = batch\n")
    argv = train_argv(corpus, run, save_every=1)
    script = f"import sys\n{prelude}\nfrom dsv2.cli import main\nsys.exit(main({argv!r}))"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        assert "waiting" in (line.strip() for line in child.stdout)  # step 2 reached, checkpoints 1, 2 written
        capsys.readouterr()
        assert main(["train", "--out", str(run), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by another trainer (PID {child.pid})" in err and len(err.splitlines()) == 1
        assert main(train_argv(corpus, run, "--overwrite")) == 2  # not even --overwrite takes it
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    t0 = time.time()
    assert main(["train", "--out", str(run), "--resume", "--sample-tokens", "0"]) == 0
    assert time.time() - t0 < 60
    assert list(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_tokenizer_is_reused_only_for_its_data(corpus, tmp_path):
    run = RunDir(tmp_path / "run")
    tc = TrainConfig(data=[str(corpus)], out=str(run.path), progress=False)
    prepare_data(tc, run, 384)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("completely different text " * 50)
    with pytest.raises(TrainingError, match=r"tokenizer\.json was trained on other data than this run's"):
        prepare_data(TrainConfig(data=[str(other)], out=str(run.path), progress=False), run, 384)
    prepare_data(tc, run, 384)  # the same data: reused
    given = TrainConfig(data=[str(corpus)], out=str(run.path), progress=False,
                        tokenizer=str(run.tokenizer_dir / "tokenizer.json"))
    prepare_data(given, run, 384)  # a given tokenizer replaces the run's copy, and no record vouches for it
    with pytest.raises(TrainingError, match="has no record"):
        prepare_data(tc, run, 384)


def test_resume_refuses_data_that_changed(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    run = tmp_path / "run"
    assert main(train_argv(data, run, max_steps=2, save_every=1)) == 0
    (data / "doc00.txt").write_text("edited " * 100)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "changed since step_0000002 was saved" in err and "--init-from" in err
