"""Evaluating a checkpoint: perplexity and bits per byte on text (perplexity.py, `dsv2 eval`)."""

from .perplexity import Perplexity, perplexity, token_stream, windows

__all__ = ["Perplexity", "perplexity", "token_stream", "windows"]
