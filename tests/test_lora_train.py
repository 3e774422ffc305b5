"""`dsv2 train --lora`: adapters trained on a frozen checkpoint, on instruction data with the loss on the answers;
checkpoints of adapters and their optimizer state only; resume exactly; a run that learns; expert parallelism.

The base model is a short `dsv2 train` run of the training tests' model (conftest.TRAIN_MODEL) on a synthetic task:
the answer to five words is the word after the last one in a fixed list.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_dsv2, train_argv
from safetensors.torch import load_file

import dsv2
from dsv2.lora import adapted, load_adapter
from dsv2.training.data import IGNORE_INDEX, DataError, Renderer
from dsv2.training.data.instructions import Example, InstructionDataset

WORDS = ["alpha", "beta", "gamma", "delta", "router", "expert", "latent", "cache", "token", "device"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def records(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        words = [rnd.choice(WORDS) for _ in range(5)]
        answer = WORDS[(WORDS.index(words[-1]) + 1) % len(WORDS)]
        if i % 2:
            out.append({"prompt": " ".join(words) + " :", "completion": " " + answer})
        else:
            out.append({"messages": [{"role": "user", "content": " ".join(words)},
                                     {"role": "assistant", "content": answer}]})
    return out


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A trained checkpoint with a chat template, and instruction records."""
    root = tmp_path_factory.mktemp("lora_train")
    r = run_dsv2(train_argv(corpus, root / "base", max_steps=60, save_every=60))
    assert r.returncode == 0, r.stderr
    ckpt = root / "base" / "checkpoints" / "step_0000060"
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    data = root / "inst.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(160)))
    return ckpt, data


def lora_argv(base, out, *extra, steps=6):
    ckpt, data = base
    return ["train", "--init-from", str(ckpt), "--lora", "--data", str(data), "--out", str(out), "--max-steps",
            str(steps), "--batch-size", "8", "--seq-len", "24", "--warmup-steps", "2", "--eval-every", "3",
            "--save-every", "3", "--dtype", "fp32", "--sample-tokens", "0", "--lr", "1e-2", *extra]


def test_lora_checkpoints_hold_the_adapters_only_and_resume_exactly(base, tmp_path):
    r = run_dsv2(lora_argv(base, tmp_path / "straight", "--lora-targets", "attention,experts"))
    assert r.returncode == 0, r.stderr
    assert "before fine-tuning" in r.stdout and "in PEFT's format" in r.stdout
    ckpt = tmp_path / "straight" / "checkpoints" / "step_0000006"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json",
            "tokenizer.json"} <= files and "model.safetensors" not in files
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert any(".mlp.experts.3.down_proj.lora_B" in k for k in adapter)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in adapter)
    half = tmp_path / "resumed"  # the run as if stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "straight", half)
    shutil.rmtree(half / "checkpoints" / "step_0000006")
    r = run_dsv2(["train", "--out", str(half), "--resume", "--sample-tokens", "0"])
    assert r.returncode == 0, r.stderr
    again = load_file(half / "checkpoints" / "step_0000006" / "adapter_model.safetensors")
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)
    # the adapters apply to the base as the run saw them
    model = load_adapter(dsv2.from_pretrained(base[0]), ckpt)
    assert {type(m).__name__ for _, m in adapted(model)} == {"LoRALinear", "LoRAExperts"}


def test_a_lora_run_learns_the_task(base, tmp_path):
    from dsv2.training.config import TrainConfig
    from dsv2.training.trainer import train

    ckpt, data = base
    tc = TrainConfig(init_from=str(ckpt), lora=True, lora_targets="all-linear", data=[str(data)],
                     out=str(tmp_path / "run"), max_steps=60, batch_size=8, seq_len=24, warmup_steps=2, lr=1e-2,
                     eval_every=60, save_every=60, dtype="fp32", val_fraction=0.2, progress=False)
    s = train(tc)
    assert s["val_loss"] < s["base_val_loss"] - 0.5, s  # held-out answer tokens


def test_the_loss_covers_the_answers_only():
    class Tok:  # one id per character: spans are easy to read back
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [ord(c) for c in text]})()

    from dsv2.chat_template import ChatTemplate

    r = Renderer(Tok(), ChatTemplate(TEMPLATE), bos_id=1, eos_id=2)
    e = r.example({"prompt": "ab", "completion": "cd"}, "x")
    assert e.ids == [1, 97, 98, 99, 100, 2] and e.target == [False] * 3 + [True] * 3
    chat = r.example({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                   {"role": "user", "content": "q"}, {"role": "assistant", "content": "z"}]}, "x")
    text = "".join(chr(i) for i in chat.ids)
    assert text == "user: hi\nassistant: yo\nuser: q\nassistant: z\n"
    answers = "".join(chr(i) for i, t in zip(chat.ids, chat.target, strict=True) if t)
    assert answers == " yo\n z\n"  # what each assistant message adds after the generation prompt
    ds = InstructionDataset([e, Example([5, 6, 7], [False, True, True])], 0.0, 0, pad_id=0)
    x, y = ds.rows(ds.train_examples, 4)
    assert x.tolist() == [[1, 97, 98, 99], [5, 6, 0, 0]]
    assert y.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 99, 100], [6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(DataError, match="chat template"):
        Renderer(Tok(), None, 1, 2).example({"messages": [{"role": "assistant", "content": "a"}]}, "f:1")
    with pytest.raises(DataError, match="no assistant message"):
        r.example({"messages": [{"role": "user", "content": "a"}]}, "f:1")


def test_batches_are_a_function_of_the_step_on_any_number_of_ranks():
    examples = [Example([i, i + 1, i + 2], [False, True, True]) for i in range(10)]
    ds = InstructionDataset(examples, 0.2, 3, pad_id=0)
    x, y = ds.batch_for_step(7, 4, 3, seed=3)
    halves = [ds.batch_for_step(7, 4, 3, seed=3, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x) and torch.equal(torch.cat([h[1] for h in halves]), y)
    seen = {tuple(ds.batch_for_step(k, 4, 3, seed=3)[0][i].tolist()) for k in range(2) for i in range(4)}
    assert len(seen) == len(ds.train_examples)  # an epoch: every training example once


@pytest.mark.parametrize("argv,message", [
    (["--lora-targets", "attn"], "neither a group"),
    (["--lora-r", "0"], "lora_r must be >= 1"),
])
def test_bad_lora_flags_are_one_line(base, tmp_path, argv, message):
    r = run_dsv2(lora_argv(base, tmp_path / "x", *argv))
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_lora_needs_a_checkpoint(corpus, tmp_path):
    r = run_dsv2(train_argv(corpus, tmp_path / "x", "--lora"))
    assert r.returncode != 0 and "--init-from" in r.stderr and "Traceback" not in r.stderr


def test_lora_with_expert_parallelism_logs_single_process_losses(base, tmp_path):
    """Adapters of the routed experts sharded with their experts over 2 ranks (torchrun, gloo)."""
    args = lora_argv(base, tmp_path / "one", "--lora-targets", "all-linear", "--lora-dropout", "0", steps=3)
    assert run_dsv2(args).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsv2",
           *lora_argv(base, tmp_path / "two", "--lora-targets", "all-linear", "--lora-dropout", "0", steps=3),
           "--expert-parallel", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read("one"), read("two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-4)
    one = load_file(tmp_path / "one" / "checkpoints" / "step_0000003" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / "step_0000003" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    # Adam moves an element by about +-lr whatever its gradient's size, so an element whose gradient is zero up to
    # rounding (summed in another order on 2 ranks) may step either way: a few elements differ by up to 3 lr
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert diff.max() <= 3 * 1e-2 and (diff > 1e-5).float().mean() < 0.01


def test_a_lora_run_whose_base_moved_does_not_resume_and_keeps_its_checkpoints(base, tmp_path):
    ckpt, data = base
    moved = tmp_path / "base"
    shutil.copytree(ckpt, moved)
    run = tmp_path / "run"
    assert run_dsv2(lora_argv((moved, data), run, steps=3)).returncode == 0
    shutil.rmtree(moved)
    r = run_dsv2(["train", "--out", str(run), "--resume", "--max-steps", "6", "--sample-tokens", "0"])
    assert r.returncode != 0 and "its base model" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"]  # nothing set aside as damaged


def test_records_whose_answer_starts_past_seq_len_are_left_out(tmp_path):
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [ord(c) for c in text]})()

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "x" * 30, "completion": "y"}) + "\n" +
                 json.dumps({"prompt": "ab", "completion": "cd"}) + "\n")
    ds = InstructionDataset.build([str(f)], Renderer(Tok(), None, 1, 2), 0.0, 0, pad_id=0, seq_len=8)
    assert ds.dropped == 1 and len(ds.train_examples) == 1
    with pytest.raises(DataError, match="start their answer past it"):
        InstructionDataset.build([str(f)], Renderer(Tok(), None, 1, 2), 0.0, 0, pad_id=0, seq_len=2)



@pytest.mark.parametrize("flags,sharding", [
    (("--lora-targets", "all-linear", "--micro-batch-size", "2"), ("--fsdp",)),
    # the experts' adapters sharded with their experts over the ep ranks (token dropping then decides over the
    # batch of both ranks, as one process without micro-batches does)
    (("--lora-targets", "attention,experts"), ("--fsdp", "--expert-parallel", "2")),
])
def test_lora_under_fsdp_logs_single_process_losses(base, tmp_path, flags, sharding):
    """The frozen base and the adapters sharded by FSDP2 over 2 ranks; the adapters gathered into the PEFT folder."""
    flags = ("--lora-dropout", "0", *flags)
    assert run_dsv2(lora_argv(base, tmp_path / "one", *flags, steps=3)).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsv2",
           *lora_argv(base, tmp_path / "two", *flags, steps=3), *sharding]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read("one"), read("two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "step_0000003" / "adapter_model.safetensors").is_file()
