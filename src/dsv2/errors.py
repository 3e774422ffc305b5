"""The few exception types dsv2 raises for a caller's mistake, at the bottom of the package so that every layer
imports them from one place (the CLI turns each into one line; the server maps them to HTTP statuses).

Each is a ValueError: the input was wrong, not the program. Bugs stay RuntimeErrors and tracebacks.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot describe a working model; the message names the field and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor at fault."""


class GenerationError(ValueError):
    """Generation or an engine asked for something it cannot do (bad prompts, sampling settings, cache sizes)."""


class RequestError(GenerationError):
    """A request the engine refuses at admission (Engine.admit). `param` names the request field at fault (the
    OpenAI error's `param`), or None when the request as a whole is the problem; `code` is OpenAI's error code where
    one applies ("context_length_exceeded")."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class AdapterError(ValueError):
    """A LoRA adapter folder that cannot be applied to this model; the message names the file or tensor at fault."""
