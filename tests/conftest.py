"""Shared pytest setup: thread count, the small corpus and model of the training tests, a CLI runner.

The test models are tiny: one intra-op thread is fastest, and with several threads a busy 2-core machine spends
most of its time in OpenMP spin-waits (measured: ~100x slower per forward under load).
"""

import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)

@pytest.fixture(scope="session")
def kernels():
    """The CPU kernels, built (or loaded) once per session; tests that need them are skipped where they cannot
    be built (no compiler: dsv2 then runs the ops' reference implementations, which other tests cover)."""
    from dsv2.cpu import ops

    if not ops.load_kernels():
        pytest.skip("the C++ kernels do not build here")


def tiny_config(**overrides):
    """The tests' model configs, all of them: the tiny preset with the fields a test sets."""
    from dsv2.presets import get_config

    return get_config("tiny", **overrides)


def random_model(cfg, seed: int, std: float = 0.2, norms: bool = False):
    """A DeepseekV2 in eval mode whose matrices are N(0, std) (larger than the init, so that paths differ visibly)
    and, with norms, whose norm weights are U(0.5, 1.5) (so a dropped or misplaced norm shows)."""
    from dsv2.model import DeepseekV2

    torch.manual_seed(seed)
    model = DeepseekV2(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, std)
            elif norms:
                p.uniform_(0.5, 1.5)
    return model


TRAIN_MODEL = dict(vocab_size=384, hidden_size=48, intermediate_size=96, moe_intermediate_size=16,
                   num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_group=4, topk_group=2,
                   num_experts_per_tok=2)
"""The model of the training tests: the tiny preset cut to 2 layers of width 48 (trains a step in milliseconds)."""


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """40 documents of 300 words from a 10-word vocabulary."""
    d = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "router", "expert", "latent", "cache", "token", "device"]
    for i in range(40):
        idx = torch.randint(0, len(words), (300,), generator=g).tolist()
        (d / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    return d


def train_argv(corpus, out, *extra: str, max_steps: int = 6, save_every: int = 3) -> list[str]:
    """`dsv2 train` arguments for a short fp32 run of TRAIN_MODEL on `corpus` (no final sample)."""
    sets = [a for k, v in TRAIN_MODEL.items() for a in ("--set", f"{k}={v}")]
    return ["train", "--data", str(corpus), "--out", str(out), "--max-steps", str(max_steps), "--batch-size", "4",
            "--micro-batch-size", "2", "--seq-len", "32", "--warmup-steps", "2", "--eval-every", "3",
            "--save-every", str(save_every), "--dtype", "fp32", "--sample-tokens", "0", *sets, *extra]


def run_dsv2(argv: list[str], env: dict | None = None, timeout: float = 300, prelude: str = "",
             **kw) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: `python -c "<prelude>; dsv2.cli.main(argv)"`. The environment is this one
    without MKL_CBWR (dsv2 must make resume exact without it), plus `env`."""
    base = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    script = f"import sys\n{prelude}\nfrom dsv2.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})}, **kw)
