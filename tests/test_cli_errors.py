"""Every mistake a user can make on the command line ends in one clear line on stderr and exit status 2, never a
traceback. Most cases run the CLI's main() in this process (an escaping exception fails the test); the full disk
and the read-only folder run `python -m dsv2` in a user and mount namespace with a small tmpfs."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import train_argv

import dsv2
from dsv2.cli import main


def one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dsv2 ") and ": error: " in last, err[-2000:]
    for w in words:
        assert w in last, (w, last)
    return last


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with a 24-token context and a valid tokenizer.json."""
    from dsv2.data import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    dsv2.DeepseekV2(dsv2.get_config("tiny", num_hidden_layers=2, vocab_size=300,
                                    max_position_embeddings=24)).save_pretrained(path)
    save_tokenizer(train_tokenizer(["some text to train on " * 20], 300), path)
    return path


@pytest.mark.parametrize("extra,words", [
    (["--batch-size", "5"], ["batch_size 5 is not a multiple of micro_batch_size 2"]),
    (["--save-every", "0"], ["save_every must be >= 1"]),
    (["--eval-every", "0"], ["eval_every must be >= 1"]),
    (["--set", "nosuchfield=3"], ["unknown model config field 'nosuchfield'"]),
    (["--set", "hidden_size"], ["--set expects FIELD=VALUE"]),
    (["--set", "n_group=two"], ["n_group must be an integer, got 'two'"]),
    (["--seq-len", "4096"], ["seq_len 4096 is longer than the model's context (max_position_embeddings=2048)"]),
    (["--lr", "1e30", "--max-steps", "12"], ["non-finite steps in a row; stopping", "Last good checkpoint"]),
    (["--device", "nonsense"], ["--device 'nonsense'"]),
])
def test_train_flag_mistakes(corpus, tmp_path, capsys, extra, words):
    assert main(train_argv(corpus, tmp_path / "run", *extra)) == 2
    one_error_line(capsys, *words)


def test_train_run_directory_mistakes(corpus, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    one_error_line(capsys, "holds no run to resume")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_config.json").write_text(json.dumps({"max_steps": 5}))
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    one_error_line(capsys, "has no checkpoint yet", "--overwrite")
    (tmp_path / "file").write_text("x")
    assert main(train_argv(corpus, tmp_path / "file")) == 2
    one_error_line(capsys, "is a file, not a directory")
    assert main(train_argv(corpus, tmp_path / "file" / "run")) == 2
    one_error_line(capsys, "is a file, not a directory")


def test_train_config_file_and_tokenizer_mistakes(corpus, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("max_steps: [unclosed\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    one_error_line(capsys, "bad.yaml is not valid YAML")
    (tmp_path / "typed.yaml").write_text("max_steps: ten\n")
    assert main(["train", "--config", str(tmp_path / "typed.yaml")]) == 2
    one_error_line(capsys, "typed.yaml", "max_steps must be an integer, got 'ten'")
    (tmp_path / "tokenizer.json").write_text('{"truncated": ')
    assert main(train_argv(corpus, tmp_path / "run", "--tokenizer", str(tmp_path / "tokenizer.json"))) == 2
    one_error_line(capsys, "tokenizer.json is not a readable tokenizer.json")


@pytest.mark.parametrize("extra,words", [
    (["--temperature", "nan"], ["temperature must be a finite number >= 0"]),
    (["--temperature", "-1"], ["temperature must be a finite number >= 0"]),
    (["--top-k", "-3", "--temperature", "0.8"], ["top_k must be >= 1"]),
    (["--top-p", "1.5"], ["top_p must be in (0, 1], got 1.5"]),  # checked at temperature 0 too
    (["--max-new-tokens", "-1"], ["max_new_tokens must be >= 0"]),
])
def test_generate_flag_mistakes(checkpoint, capsys, extra, words):
    assert main(["generate", "--model", str(checkpoint), "--ids", "0,5", *extra]) == 2
    one_error_line(capsys, *words)


def test_generate_checkpoint_mistakes(checkpoint, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(checkpoint, bad)
    (bad / "tokenizer.json").write_bytes(b"\x00\x01 not a tokenizer")
    assert main(["generate", "--model", str(bad), "--prompt", "hi"]) == 2
    one_error_line(capsys, "tokenizer.json is not a readable tokenizer.json")
    assert main(["generate", "--model", str(tmp_path / "nope"), "--ids", "1"]) == 2
    one_error_line(capsys, "is not a checkpoint directory")


def test_generation_cut_short_by_the_context_says_so(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--ids", "0,5,6", "--max-new-tokens", "40"]) == 0
    err = capsys.readouterr().err  # 24 - 3 prompt tokens
    assert "(stopped after 21 of 40 new tokens: the model's context is 24 tokens)" in err


def _namespace_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


needs_namespace = pytest.mark.skipif(not _namespace_works(), reason="needs unprivileged user+mount namespaces "
                                     "(unshare) to mount a small or read-only tmpfs")


def _train_on_tmpfs(tmp_path, corpus, options: str, **kw) -> subprocess.CompletedProcess:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = ["-m", "dsv2", *train_argv(corpus, mnt / "run", **kw)]
    listing = f"echo checkpoints: $(ls -A {mnt}/run/checkpoints 2>/dev/null)"
    script = (f"mount -t tmpfs -o {options} none {mnt} || exit 99; {sys.executable} "
              + " ".join(f"'{a}'" for a in argv) + f"; rc=$?; {listing}; exit $rc")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)


@needs_namespace
def test_out_on_a_full_disk(corpus, tmp_path):
    """The token files fit, the first checkpoint does not: one line naming the problem, and no half checkpoint."""
    r = _train_on_tmpfs(tmp_path, corpus, "size=160k", max_steps=3)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dsv2 train: error: No space left on device")
    assert r.stdout.strip().splitlines()[-1] == "checkpoints:"  # no half-written checkpoint left behind


@needs_namespace
def test_out_on_a_read_only_folder(corpus, tmp_path):
    r = _train_on_tmpfs(tmp_path, corpus, "ro")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dsv2 train: error: cannot write to ") and "Read-only file system" in last
