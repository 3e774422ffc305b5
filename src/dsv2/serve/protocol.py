"""The OpenAI API's bodies (pydantic), requests and responses, and its error shape, as `dsv2 serve` accepts and
returns them; the routes declare both, so GET /openapi.json shows both.

Requests: types are strict (a string where a number belongs is a 400, as OpenAI answers, not a silent conversion);
ranges are SamplingParams' own checks (dsv2/inference/engine/params.py), so the engine and the server refuse the same
values with the same words. Fields the OpenAI API has and dsv2 does not use (user, suffix, ...) are ignored.

Responses: every field is on the wire, null where it is null, except those OpenAI leaves out (`_absent_if_none`): a
stream chunk's usage until the last chunk, and a chat delta's role and content where they do not change.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may carry a lone surrogate ("\ud800"): no tokenizer can take it
        raise ValueError("the text is not valid Unicode (a lone surrogate)") from None
    return text


Number = StrictFloat | StrictInt
TokenIds = list[StrictInt]
Text = Annotated[StrictStr, AfterValidator(_utf8)]


class _Body(BaseModel):
    """Strict types; unknown fields ignored; an explicit null means the default (as OpenAI and vLLM take it)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class ApiError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded",
             500: "internal_server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, param=self.param, code=self.status,
                                               type=self.TYPES.get(self.status, "invalid_request_error"))).model_dump()


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """What completions and chat completions share."""

    model: StrictStr | None = None
    n: StrictInt = 1
    temperature: Number = 1.0
    top_p: Number = 1.0
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    # the common extensions (vLLM's names)
    top_k: StrictInt = 0
    min_p: Number = 0.0
    repetition_penalty: Number = 1.0
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: TokenIds | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams of this request; its range errors as a 400 naming the parameter."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k,
                min_p=self.min_p, seed=self.seed, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty, stop=stop,
                stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs)
        except GenerationError as e:
            raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False

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
        raise ApiError(400, "prompt must be a string, a list of strings, token ids or a list of token-id lists",
                       param="prompt")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class Message(_Body):
    model_config = ConfigDict(strict=True, extra="allow")  # a template may read tool_calls, name, ...
    role: Text
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
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True

    def logprobs_n(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
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


# -- responses ----------------------------------------------------------------------------------------------------
def _is_none(value) -> bool:
    return value is None


def _absent_if_none(description: str):
    """A field left off the wire while it is None (where OpenAI's API leaves it out)."""
    return Field(None, exclude_if=_is_none, description=description)


class _Out(BaseModel):
    # json.dumps writes a -inf logprob as -Infinity, as the server always has (pydantic's default would be null)
    model_config = ConfigDict(ser_json_inf_nan="constants")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(_Out):
    """Every error: 4xx and 5xx, before a stream's 200 or as a stream's last event before [DONE]."""

    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamResponse(_Out):
    """One event of a streamed completion (text/event-stream, `data: {...}`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _absent_if_none("in the last event alone, with stream_options.include_usage")


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob]
    refusal: str | None = None


class ChatMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Out):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Out):
    role: Literal["assistant"] | None = _absent_if_none("in each completion's first event alone")
    content: str | None = _absent_if_none("absent in a completion's last event, which has its finish_reason")


class ChatChunkChoice(_Out):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Out):
    """One event of a streamed chat completion (text/event-stream, `data: {...}`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _absent_if_none("in the last event alone, with stream_options.include_usage")


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv2"
    root: str | None
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Out):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Out):
    prompt: str


STREAMED = (CompletionStreamResponse, ChatCompletionChunk)
"""The events of a stream: in the OpenAPI schema as the text/event-stream of their route (no route returns them)."""
