"""Batched generation over the latent cache: prefill with the naive MLA path, decode with weight absorption.

Prompts of different lengths are left-padded into one batch; padding slots are masked out of attention and each
row's RoPE positions start at 0 at its first real token, so a padded row computes exactly what it would alone.
Tokens are drawn by the engine's sampler (engine/sampler.py), the rows in turn from the one seeded generator; its
top-k keeps exactly k tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence

import torch

from ..cpu.decode_step import DecodeStep
from ..errors import GenerationError
from ..model import DeepseekV2
from .engine.params import SamplingParams, prompt_token_ids
from .engine.sampler import Row, sample


def check_prompts(model: DeepseekV2, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """The prompts as lists of ints (each checked as the engine checks one), or a GenerationError naming the first
    problem."""
    cfg = model.config
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not prompts:
        raise GenerationError("no prompts given")
    out = [prompt_token_ids(p, cfg.vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]
    for i, p in enumerate(out):
        if len(p) > cfg.max_position_embeddings:
            raise GenerationError(f"prompt {i} has {len(p)} tokens, longer than the model's context "
                                  f"({cfg.max_position_embeddings})")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    return out


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> SamplingParams:
    """generate's settings as the engine's SamplingParams (None: no top-k / top-p cut), checked by it: a
    GenerationError for settings that cannot sample, whatever the temperature (a greedy call with a bad top_p is
    still a mistake)."""
    if top_k is not None and not isinstance(top_k, bool):
        try:
            top_k = operator.index(top_k)  # numpy and torch integers too
        except TypeError:
            pass  # SamplingParams names it
    return SamplingParams(temperature=temperature, top_k=0 if top_k is None else top_k,
                          top_p=1.0 if top_p is None else top_p, max_tokens=None)


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0; otherwise sample from softmax(logits / T) restricted to top-k / top-p, by the
    engine's sampler (every row draws from `generator`, in turn)."""
    rows = [Row(check_sampling(temperature, top_k, top_p), [], [], generator)] * logits_BV.shape[0]
    return torch.tensor(sample(logits_BV, rows)[0], device=logits_BV.device)


@torch.inference_mode()
def stream_generate(model: DeepseekV2, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                    ) -> Iterator[list[int | None]]:
    """Yield, per decode step, the new token of each prompt (None once that prompt has finished). Generation
    stops early at EOS and at the model's context (max_position_embeddings), whichever comes first. Decode steps
    run the fused step (dsv2.cpu.decode_step) where it applies; the model's modules are never changed (prefill
    takes the CPU paths if the model has them: dsv2.cpu.optimize, which from_pretrained applies)."""
    prompts = check_prompts(model, prompts, max_new_tokens)
    params = check_sampling(temperature, top_k, top_p)
    fused = DecodeStep(model)
    cfg = model.config
    eos = set(cfg.eos_token_ids if eos_token_id is None else
              ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
    device = model.model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    max_new = min(max_new_tokens, cfg.max_position_embeddings - P)  # never run past the context
    if max_new <= 0:
        return
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    pad_mask = torch.zeros(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        pad_mask[b, P - len(p):] = True
    positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    rows = [Row(params, [], [], generator)] * B  # the rows draw from the one generator in turn

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, P + max_new)
        logits = model(ids, positions=positions, cache=cache, pad_mask=pad_mask,
                       logits_at=torch.arange(B, device=device) * P + P - 1)
        pos = positions[:, -1:]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new):
            tokens = sample(logits, rows)[0]
            yield [None if d else t for t, d in zip(tokens, done.tolist(), strict=True)]
            done |= torch.tensor([t in eos for t in tokens], device=device)
            if bool(done.all()) or step == max_new - 1:
                break
            pos = pos + 1
            new = torch.tensor(tokens, device=device)[:, None]
            logits = (fused(new, pos, cache) if fused.applies(B) else
                      model(new, positions=pos, cache=cache, logits_at=torch.arange(B, device=device)))
    finally:
        model.train(was_training)


def generate(model: DeepseekV2, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             callback: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Generate for a batch of token-id prompts; returns the new tokens of each (EOS included when hit).

    callback(prompt_index, token) is called as each token is produced (streaming).
    """
    outs: list[list[int]] = [[] for _ in prompts]
    for step_tokens in stream_generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, eos_token_id=eos_token_id):
        for i, t in enumerate(step_tokens):
            if t is not None:
                outs[i].append(t)
                if callback is not None:
                    callback(i, t)
    return outs
