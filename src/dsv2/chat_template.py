"""Chat templates: a checkpoint's `chat_template` (tokenizer_config.json) rendered as transformers'
`apply_chat_template` renders it, so that a chat reaches the model as the same tokens it was trained on.

The environment is transformers': a sandbox (a template is data from a checkpoint, not code to trust), trim_blocks
and lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text; the
template sees `messages`, `add_generation_prompt` and the special tokens named in tokenizer_config.json
(`bos_token`, `eos_token`, ...).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that cannot be read or rendered (or one that raised on these messages): the client's 400."""


def _raise(message: str):
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent, **kw)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not parse: {e}") from None
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatTemplate | None:
        """The template in path/tokenizer_config.json, None where it has none (the file or the key)."""
        f = Path(path) / TOKENIZER_CONFIG
        if not f.is_file():
            return None
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChatTemplateError(f"{f} is not readable JSON ({e})") from None
        source = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(source, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None

        def token(v):  # a string, or an AddedToken as a dict
            return v.get("content") if isinstance(v, dict) else v

        return cls(source, {k: token(cfg[k]) for k in SPECIAL_TOKENS if isinstance(token(cfg.get(k)), str)})

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
