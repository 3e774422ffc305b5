"""`dsv2 eval`: perplexity and bits per byte in sliding windows (dsv2.eval.perplexity).

The sum of NLL equals a direct computation with the plain model (fp32, 1e-5 relative); the windows score every
token but the first exactly once, each with the context the stride promises (a hypothesis property)."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2 import save_pretrained
from dsv2.eval import perplexity, token_stream, windows
from dsv2.training.data import save_tokenizer, train_tokenizer


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len - 1))
    scored = []
    for begin, end, first in windows(n, seq_len, stride):
        assert 0 <= begin < first <= end <= n and end - begin <= seq_len
        if begin:  # a later window: its new targets have the promised context
            assert first - begin >= seq_len - stride
        scored += range(first, end)
    assert scored == list(range(1, n))


def _direct_nll(model, ids, seq_len, stride):
    """Each scored token's NLL from full logits of its window, summed."""
    total = 0.0
    for begin, end, first in windows(len(ids), seq_len, stride):
        logits = model(ids[None, begin:end - 1])[0].float()
        lp = F.log_softmax(logits, -1)
        for t in range(first, end):
            total -= lp[t - 1 - begin, ids[t]].item()
    return total


@pytest.mark.parametrize("seq_len,stride", [(16, 15), (16, 5), (64, 32)])
def test_perplexity_is_the_direct_computation(seq_len, stride):
    model = random_model(tiny_config(), 0)
    ids = torch.randint(2, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        r = perplexity(model, ids, nbytes=400, seq_len=seq_len, stride=stride, progress=False)
        want = _direct_nll(model, ids, seq_len, stride)
    assert r.tokens == 99
    assert abs(r.nll_sum - want) <= 1e-5 * abs(want)
    assert math.isclose(r.perplexity, math.exp(want / 99), rel_tol=1e-5)
    assert math.isclose(r.bits_per_byte, want / math.log(2) / 400, rel_tol=1e-5)


def test_bad_windows_are_one_line_errors():
    model = random_model(tiny_config(), 0)
    ids = torch.arange(2, 40)
    for kw, msg in [(dict(seq_len=1), "--seq-len must be in"), (dict(seq_len=8, stride=8), "--stride must be in"),
                    (dict(seq_len=10**6), "the model's context")]:
        with pytest.raises(ValueError, match=msg):
            perplexity(model, ids, 10, progress=False, **kw)


def test_cli_eval(tmp_path):
    docs = [" ".join(f"word{i % 37} token{i % 11}" for i in range(j, j + 60)) for j in range(40)]
    tok = train_tokenizer(docs, vocab_size=300)
    ckpt = tmp_path / "ckpt"
    save_pretrained(random_model(tiny_config(vocab_size=300), 0, std=0.05), ckpt)
    save_tokenizer(tok, ckpt)
    (tmp_path / "text.txt").write_text("\n\n".join(docs[:5]))
    text = str(tmp_path / "text.txt")
    p = subprocess.run([sys.executable, "-m", "dsv2", "eval", "--model", str(ckpt), "--data", text, "--seq-len", "64",
                        "--stride", "32", "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    ids, nbytes = token_stream(tok, [tmp_path / "text.txt"], tok.token_to_id("<|eos|>"))
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == nbytes and got["perplexity"] > 1
    for args, msg in [(["--stride", "64"], "--stride must be in"), (["--quantize", "int3"], "invalid choice")]:
        p = subprocess.run([sys.executable, "-m", "dsv2", "eval", "--model", str(ckpt), "--data",
                            str(tmp_path / "text.txt"), "--seq-len", "64", *args], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_checkpoints_carry_the_tokenizer_files_the_ecosystem_reads(tmp_path):
    """AutoTokenizer takes a dsv2 checkpoint's tokenizer as it is: the same ids both ways, the special tokens, the
    context; GenerationConfig its BOS/EOS ids."""
    transformers = pytest.importorskip("transformers")
    from dsv2.tokenizer import copy_tokenizer

    docs = [" ".join(f"alpha{i % 13} beta{i % 7}" for i in range(j, j + 40)) for j in range(30)]
    tok = train_tokenizer(docs, vocab_size=260)
    (tmp_path / "src").mkdir()
    save_tokenizer(tok, tmp_path / "src")
    model = random_model(tiny_config(vocab_size=260), 0)
    save_pretrained(model, tmp_path / "ckpt")
    copy_tokenizer(tmp_path / "src", tmp_path / "ckpt", model.config.max_position_embeddings,
                   model.config.bos_token_id, model.config.eos_token_ids[0])
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    text = "alpha3 beta5 alpha12 gamma"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text).ids
    assert hf.decode(tok.encode(text).ids) == tok.decode(tok.encode(text).ids)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf.bos_token_id == tok.token_to_id("<|bos|>") and hf.model_max_length == model.config.max_position_embeddings
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "ckpt")
    assert (gen.bos_token_id, gen.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id)
