"""The `dsv2` command line: info on the official configs, clear errors with exit status 2."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

import dsv2
from dsv2.checkpoint import save_pretrained
from dsv2.cli import main


def test_info_json_reproduces_the_paper(capsys):
    assert main(["info", "deepseek-v2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"]["total"] == pytest.approx(236e9, rel=0.01)
    assert d["activated"]["without_embedding"] == pytest.approx(21e9, rel=0.03)
    assert d["kv_cache"]["mla"]["elements_per_token"] == 34_560
    assert main(["info", "deepseek-v2-lite", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"]["total"] == pytest.approx(15.7e9, rel=0.01)
    assert d["activated"]["without_embedding"] == pytest.approx(2.4e9, rel=0.03)


def test_info_text_and_config_file(tmp_path, capsys):
    tiny_config().save(tmp_path)
    assert main(["info", str(tmp_path / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "MLA" in out


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    cfg = tiny_config().to_dict()
    cfg["n_group"] = 3  # 16 experts cannot split into 3 groups
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(tmp_path / "config.json")]) == 2
    assert "divisible by n_group" in capsys.readouterr().err
    assert main(["info", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_generate_ids_streams_token_ids_and_rejects_bad_ids(tmp_path):
    torch.manual_seed(0)
    save_pretrained(dsv2.DeepseekV2(tiny_config(num_hidden_layers=2)), tmp_path)
    ok = subprocess.run([sys.executable, "-m", "dsv2", "generate", "--model", str(tmp_path), "--ids", "0,5,6",
                         "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    ids = [int(t) for t in ok.stdout.split()]  # no tokenizer.json: token ids are printed
    assert 1 <= len(ids) <= 4 and all(0 <= t < 4096 for t in ids)
    bad = subprocess.run([sys.executable, "-m", "dsv2", "generate", "--model", str(tmp_path), "--ids", "0,99999"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "outside the vocabulary" in bad.stderr
    text = subprocess.run([sys.executable, "-m", "dsv2", "generate", "--model", str(tmp_path), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert text.returncode == 2 and "tokenizer.json" in text.stderr
