"""The inference engine: continuous batching over a paged latent cache, chunked prefill, prefix caching,
preemption, per-request sampling (engine.py and the pieces it drives)."""

from .engine import Engine
from .options import check_options
from .params import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob

__all__ = ["CompletionOutput", "Engine", "check_options", "RequestOutput", "SamplingParams", "TokenLogprob"]
