"""Every mistake a user can make on the command line ends in one clear line on stderr and exit status 2, never a
traceback. Most cases run the CLI's main() in this process (an escaping exception fails the test); the full disk
and the read-only folder run `python -m dsv2` in a user and mount namespace with a small tmpfs."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_dsv2, tiny_config, train_argv

import dsv2
from dsv2.checkpoint import save_pretrained
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
    from dsv2.training.data import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_pretrained(dsv2.DeepseekV2(tiny_config(num_hidden_layers=2, vocab_size=300,
                                    max_position_embeddings=24)), path)
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
    (["--device", "cuda:99"], ["--device cuda:99: no such CUDA device here"]),
    (["--batch-size", "1000000000000000"], ["out of memory"]),
    (["--max-bytes", "100"], ["split has", "fewer than one window of seq_len + 1 = 33"]),
    (["--sample-tokens", "-5"], ["--sample-tokens must be >= 0"]),
    (["--out", ""], ["out (the run directory) must not be empty"]),
    (["--preset", "small", "--init-from", "x"], ["--preset and --init-from both choose the model"]),
    (["--resume", "--overwrite"], ["--resume and --overwrite contradict each other"]),
])
def test_train_flag_mistakes(corpus, tmp_path, capsys, extra, words):
    assert main(train_argv(corpus, tmp_path / "run", *extra)) == 2
    one_error_line(capsys, *words)


def test_argument_parser_mistakes_exit_2(corpus, tmp_path, capsys):
    for argv in (train_argv(corpus, tmp_path / "r", "--seed", "99999999999999999999999"),
                 ["generate", "--model", "m", "--ids", "0", "--seed", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--seed must be in [0, 2**63)" in err and "Traceback" not in err


def test_data_with_no_text(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "utf16.txt").write_bytes("some text".encode("utf-16"))
    (tmp_path / "d" / "empty.txt").write_text("  \n")
    assert main(train_argv(tmp_path / "d", tmp_path / "run")) == 2
    one_error_line(capsys, "no text in the data: 2 file(s)", "utf16.txt")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 but not really")
    assert main(train_argv(tmp_path / "fake.parquet", tmp_path / "run2")) == 2
    one_error_line(capsys, "fake.parquet is not a readable parquet file")


def test_a_last_step_that_is_skipped_still_ends_the_run(corpus, tmp_path, capsys):
    """--lr 1e30: the first update makes the weights huge, every later step is skipped as non-finite; with the
    tolerance not exhausted the run still ends with an evaluation and a checkpoint, no traceback."""
    assert main(train_argv(corpus, tmp_path / "run", "--lr", "1e30", max_steps=3)) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "validation loss" in out.out
    assert (tmp_path / "run" / "checkpoints" / "step_0000003").is_dir()


def test_train_run_directory_mistakes(corpus, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    one_error_line(capsys, "holds no run to resume")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_config.json").write_text(json.dumps({"max_steps": 5}))
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    one_error_line(capsys, "has no checkpoint yet", "--overwrite")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train_config.json").write_text("[1, 2]")
    assert main(["train", "--out", str(tmp_path / "odd"), "--resume"]) == 2
    one_error_line(capsys, "cannot read the settings of", "holds no settings object")
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


def test_generate_ids_outside_the_vocabulary_with_a_tokenizer(checkpoint, capsys):
    for ids in ("-1", "99999999999999999999", "0,300"):
        assert main(["generate", "--model", str(checkpoint), "--ids", ids]) == 2
        out = capsys.readouterr()
        assert out.out == "" and "outside the vocabulary" in out.err  # nothing echoed before the error


def test_routing_sim_and_upcycle_mistakes(checkpoint, tmp_path, capsys):
    base = ["routing-sim", "--out", str(tmp_path / "sim"), "--tokens", "64", "--experts", "16", "--devices", "4"]
    for extra, words in [(["--tokens", "0"], "tokens must be >= 1"), (["--devices", "1"], "devices must be >= 2"),
                         (["--experts", "0"], "experts must be >= 1"), (["--top-k", "17"], "top_k must be in [1, 16"),
                         (["--top-k", "0"], "top_k must be in"), (["--logit-std", "nan"], "logit_std must be"),
                         (["--devices", "3"], "do not split evenly")]:
        assert main([*base, *extra]) == 2, extra
        one_error_line(capsys, words)
    assert main([*base, "--top-k", "6"]) == 0  # M = 1 holds 4 experts < 6: a row that says so, not NaNs
    table = (tmp_path / "sim" / "routing_sim.md").read_text()
    assert "| 1 | n/a" in table and "nan" not in table
    assert "NaN" not in (tmp_path / "sim" / "routing_sim.json").read_text()
    dense = tmp_path / "dense"
    save_pretrained(dsv2.DeepseekV2(tiny_config(num_hidden_layers=2, n_routed_experts=0)), dense)
    moe = tmp_path / "moe.json"
    tiny_config(num_hidden_layers=2).save(moe)
    assert main(["upcycle", str(dense), "--config", str(moe), str(tmp_path / "up"), "--routed-scale", "nan"]) == 2
    one_error_line(capsys, "routed_scale must be a finite number")
    assert main(["upcycle", str(dense), "--config", str(moe), str(checkpoint)]) == 2  # holds a checkpoint
    one_error_line(capsys, "is not empty")


def test_plot_mistakes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    r = run_dsv2(["plot", str(run)])  # a process of its own: pytest would capture the warnings
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == f"warning: {run / 'metrics.jsonl'}:2: not valid JSON, skipped"
    assert r.stderr.strip().splitlines()[-1].endswith("metrics.jsonl has no step with a loss")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "plots").write_text("a file")
    assert main(["plot", str(run)]) == 2
    one_error_line(capsys, "plots (or a folder above it) is a file, not a folder")


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


@pytest.mark.parametrize("extra,words", [
    (["--cache-memory", "64TiB"], ["--cache-memory", "more than the", "memory this machine has"]),
    (["--cache-memory", "lots"], ["--cache-memory 'lots' is not a size"]),
    (["--max-queue", "0"], ["--max-queue must be >= 1"]),
    (["--max-queue", "-1"], ["--max-queue must be >= 1"]),
    (["--grace", "-5"], ["--grace must be a number of seconds >= 0"]),
    (["--block-size", "100000"], ["--block-size 100000 is more than --max-model-len (24)"]),
    (["--max-num-seqs", "0"], ["--max-num-seqs must be >= 1"]),
    (["--max-model-len", "1"], ["--max-model-len must be in [2, 24]"]),
    (["--api-key", ""], ["--api-key is empty"]),
])
def test_serve_option_mistakes(checkpoint, capsys, extra, words):
    """Each bad start-up option is one line and exit 2, before a port is served (and before the weights load,
    except the cache's size against the machine's memory, which needs the model's bytes per token)."""
    assert main(["serve", "--model", str(checkpoint), "--port", "0", *extra]) == 2
    one_error_line(capsys, *words)
