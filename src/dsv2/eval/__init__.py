"""Evaluating a checkpoint: perplexity and bits per byte on text (perplexity.py, `dsv2 eval --data`), and
lm-evaluation-harness's tasks in-process on the engine (harness.py's LMEvalModel, `dsv2 eval --tasks`; lm_eval
is imported only there)."""

from .perplexity import Perplexity, perplexity, token_stream, windows

__all__ = ["LMEvalModel", "Perplexity", "perplexity", "token_stream", "windows"]


def __getattr__(name: str):
    if name == "LMEvalModel":  # lm_eval is an extra: imported on first use
        from .harness import LMEvalModel

        return LMEvalModel
    raise AttributeError(f"module 'dsv2.eval' has no attribute {name!r}")
