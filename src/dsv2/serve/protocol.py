"""The OpenAI API's request bodies (pydantic) as `dsv2 serve` accepts them, the limits it enforces on them, and its
error shape (ApiError); the response bodies are in responses.py.

Types are strict (a string where a number belongs is a 400, as OpenAI answers, not a silent conversion). Ranges are
OpenAI's where it has one (temperature in [0, 2], at most 4 stop strings, n <= 128, logprobs <= 5 for completions,
top_logprobs <= 20 for chat, at most 300 logit_bias entries), then SamplingParams' own checks
(dsv2/inference/engine/params.py), so the engine and the server refuse the same values with the same words. The
limits bound what one request can cost the others (LIMITS). Fields that would change the output and that dsv2 does
not implement (tools, response_format, best_of, suffix, ...) are refused with a 400 naming them, never ignored;
fields that change nothing here (user, metadata, store, ...) are ignored, as any unknown field is.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from ..errors import GenerationError
from ..inference.engine import SamplingParams
from .responses import ErrorDetail, ErrorResponse

LIMITS = {
    "stop": 4,                  # stop strings a request (OpenAI's limit)
    "stop_chars": 256,          # characters a stop string
    "stop_token_ids": 256,      # stop token ids a request
    "logit_bias": 300,          # logit_bias entries (OpenAI's limit)
    "n": 128,                   # completions a prompt (OpenAI's limit; also at most --max-queue)
    "logprobs": 5,              # top log-probabilities a token, /v1/completions (OpenAI's limit)
    "top_logprobs": 20,         # top log-probabilities a token, /v1/chat/completions (OpenAI's limit)
    "temperature": 2.0,         # OpenAI's range is [0, 2]
    "logprob_entries": 1 << 20,  # prompts x n x max_tokens x (1 + logprobs): a response's log-probabilities
}
"""What one request may ask for: each bounds the work or the response size one client can impose on the others.
The prompt's size is bounded too, before it is tokenized: see tokens.TokenTable.max_prompt_bytes."""
ROLES = ("system", "user", "assistant", "tool", "developer", "function")


class ApiError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             503: "server_overloaded", 500: "internal_server_error"}
    CODES = {401: "invalid_api_key"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or self.CODES.get(status)

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, param=self.param, code=self.code,
                                               type=self.TYPES.get(self.status, "invalid_request_error"))).model_dump()


# -- field checks (a ValueError is a 400 naming the field: http.py words it) ---------------------------------------
def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may carry a lone surrogate ("\ud800"): no tokenizer can take it
        raise ValueError("the text is not valid Unicode (a lone surrogate)") from None
    return text


def _in(name: str, low: float, high: float):
    def check(x):
        if not low <= x <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {x}")
        return x
    return AfterValidator(check)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > LIMITS["stop"]:
        raise ValueError(f"stop has {len(stops)} strings; at most {LIMITS['stop']} are allowed")
    long = [i for i, s in enumerate(stops) if len(s) > LIMITS["stop_chars"]]
    if long:
        raise ValueError(f"stop string {long[0]} has {len(stops[long[0]])} characters; at most "
                         f"{LIMITS['stop_chars']} are allowed")
    return stops


def _stop_token_ids(ids: list[int]) -> list[int]:
    if len(ids) > LIMITS["stop_token_ids"]:
        raise ValueError(f"stop_token_ids has {len(ids)} ids; at most {LIMITS['stop_token_ids']} are allowed")
    return ids


def _logit_bias(bias: dict[str, Any]) -> dict[int, float]:
    """OpenAI's logit_bias: JSON keys are token ids written as strings, values numbers in [-100, 100]."""
    if len(bias) > LIMITS["logit_bias"]:
        raise ValueError(f"logit_bias has {len(bias)} entries; at most {LIMITS['logit_bias']} are allowed")
    out = {}
    for key, value in bias.items():
        if not re.fullmatch(r"[0-9]{1,10}", key):
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers as strings), got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key}")
        if int(key) in out:  # "5" and "05": one token, two biases
            raise ValueError(f"logit_bias names token {int(key)} twice")
        out[int(key)] = float(value)
    return out


def _role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    return role


Number = StrictFloat | StrictInt
TokenIds = list[StrictInt]
Text = Annotated[StrictStr, AfterValidator(_utf8)]
Stop = Annotated[Text | list[Text] | None, AfterValidator(_stops)]


class _Body(BaseModel):
    """Strict types; unknown fields ignored; an explicit null means the default (as OpenAI and vLLM take it)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(_Body):
    include_usage: StrictBool = False


# the OpenAI fields that would change the output and that dsv2 does not do: refused unless harmless (the test)
_UNSUPPORTED = {
    "response_format": (lambda v: v == {"type": "text"}, "constrained output (json_object, json_schema) is not "
                        'supported: leave it out, or send {"type": "text"}'),
    "tools": (lambda v: v == [], "tool calls are not supported"),
    "functions": (lambda v: v == [], "function calls are not supported"),
    "tool_choice": (lambda v: v in ("none", "auto"), "tool calls are not supported"),
    "function_call": (lambda v: v in ("none", "auto"), "function calls are not supported"),
    "audio": (lambda v: False, "audio output is not supported"),
    "modalities": (lambda v: v == ["text"], "only text output is supported"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported"),
}


class _Sampling(_Body):
    """What completions and chat completions share."""

    model: StrictStr | None = None
    n: Annotated[StrictInt, _in("n", 1, LIMITS["n"])] = 1
    temperature: Annotated[Number, _in("temperature", 0, LIMITS["temperature"])] = 1.0
    top_p: Number = 1.0
    stop: Stop = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: Annotated[dict[str, Any], AfterValidator(_logit_bias)] | None = None
    # the common extensions (vLLM's names)
    top_k: StrictInt = 0
    min_p: Number = 0.0
    repetition_penalty: Number = 1.0
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[TokenIds, AfterValidator(_stop_token_ids)] | None = None
    return_token_ids: StrictBool = Field(False, description="vLLM's: the token ids of the prompt and of each "
                                         "completion in the response (always on a checkpoint without a tokenizer)")
    # refused unless harmless (_UNSUPPORTED): declared so that a request naming them is never silently ignored
    response_format: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    prompt_logprobs: Any = None

    def check(self) -> None:
        """What pydantic does not see field by field: the unsupported fields and the fields that need another."""
        for name, (harmless, why) in _UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value is not None and not harmless(value):
                raise ApiError(400, f"{name}: {why}", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams of this request; its range errors as a 400 naming the parameter."""
        try:
            return SamplingParams(
                n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, stop=list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
                logit_bias=self.logit_bias or None, prompt_logprobs=prompt_logprobs)
        except GenerationError as e:
            raise ApiError(400, str(e), param=getattr(e, "param", None) or str(e).split(" ", 1)[0]) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: Annotated[StrictInt, _in("logprobs", 0, LIMITS["logprobs"])] | None = None
    echo: StrictBool = False
    prompt_logprobs: Annotated[StrictInt, _in("prompt_logprobs", 0, LIMITS["logprobs"])] | None = None
    """vLLM's: each prompt token's log-probability and the top N, in the choice's prompt_logprobs."""
    best_of: StrictInt | None = None
    suffix: Any = None

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, f"best_of: choosing the best of best_of={self.best_of} completions is not "
                           "supported (leave it out, or equal to n)", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 only with echo: the prompt alone)", param="max_tokens")

    @property
    def echo_logprobs(self) -> bool:
        """echo + logprobs: the prompt's tokens get log-probabilities too (lm-evaluation-harness's loglikelihood)."""
        return self.echo and self.logprobs is not None

    @property
    def top_prompt_logprobs(self) -> int | None:
        """What the engine's prompt_logprobs must be: logprobs with echo, or vLLM's prompt_logprobs field."""
        asked = [n for n in (self.logprobs if self.echo_logprobs else None, self.prompt_logprobs) if n is not None]
        return max(asked) if asked else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            return list(p)
        raise ApiError(400, PROMPT_TYPES, param="prompt")


PROMPT_TYPES = "prompt must be a string, a list of strings, token ids or a list of token-id lists"


class TextPart(_Body):
    """A part of a message's content: text parts only (an image or audio part is a 400 that says so)."""

    type: StrictStr
    text: Text | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"only text parts are supported, got a part of type {self.type!r}")
        if self.text is None:
            raise ValueError("a text part needs its text")
        return self


class Message(_Body):
    model_config = ConfigDict(strict=True, extra="allow")  # a template may read tool_calls, name, ...
    role: Annotated[Text, AfterValidator(_role)]
    content: Text | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # text parts joined, as the text-only chat templates expect
            d["content"] = "".join(part.text for part in self.content)
        return d


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, _in("top_logprobs", 0, LIMITS["top_logprobs"])] | None = None
    add_generation_prompt: StrictBool = True

    def check(self) -> None:
        super().check()
        if self.prompt_logprobs is not None:
            raise ApiError(400, "prompt_logprobs: a chat's prompt log-probabilities are not returned (send the "
                           "rendered prompt to /v1/completions)", param="prompt_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "send max_tokens or max_completion_tokens, not both", param="max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def asked(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: Text | None = None
    messages: list[Message] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: TokenIds


class LoadLoRARequest(_Body):
    lora_name: StrictStr = Field(min_length=1, max_length=256)
    lora_path: StrictStr = Field(min_length=1, max_length=4096)


class UnloadLoRARequest(_Body):
    lora_name: StrictStr = Field(min_length=1, max_length=256)


REQUESTS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest, Message, TextPart,
            StreamOptions)
FIELDS = frozenset(name for model in REQUESTS for name in model.model_fields)
"""Every request field's name: what an error's location keeps (pydantic's union members and tags are dropped)."""
