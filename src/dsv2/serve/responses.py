"""The OpenAI API's response bodies (pydantic), as `dsv2 serve` returns them; the routes declare them, so GET
/openapi.json shows them.

Every field is on the wire, null where it is null, except those OpenAI leaves out (`_absent_if_none`): a stream
chunk's usage until the last chunk, a chat delta's role and content where they do not change, and the token ids
(vLLM's `prompt_token_ids` and `token_ids`) unless the request asked for them with `return_token_ids` or the
checkpoint has no tokenizer (then a completion's `text` is null: its output is its token ids).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    code: str | None = Field(description="OpenAI's code (invalid_api_key, model_not_found, "
                             "context_length_exceeded, ...), null for most errors")


class ErrorResponse(_Out):
    """Every error: 4xx and 5xx, before a stream's 200 or as a stream's last event before [DONE]."""

    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (with echo)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] | None = Field(description="null where there is no text (a checkpoint without a "
                                          "tokenizer: tokens are 'token_id:N')")


_PROMPT_IDS = "with return_token_ids (and on a checkpoint without a tokenizer): the prompt's token ids"
_IDS = "with return_token_ids (and on a checkpoint without a tokenizer): the generated token ids"


class CompletionChoice(_Out):
    index: int
    text: str | None = Field(description="null on a checkpoint without a tokenizer: see token_ids")
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    prompt_token_ids: list[int] | None = _absent_if_none(_PROMPT_IDS + " (a stream: in each choice's first event)")
    token_ids: list[int] | None = _absent_if_none(_IDS + " (a stream: those new in this event)")
    prompt_logprobs: list[dict[str, dict] | None] | None = _absent_if_none(
        "with vLLM's prompt_logprobs: per prompt token (null for the first), token id -> logprob, rank, "
        "decoded_token, for the token and the top N")


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
    bytes: list[int] = Field(description="the token's own UTF-8 bytes (part of a character for some tokens)")


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
    token_ids: list[int] | None = _absent_if_none(_IDS)


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = _absent_if_none(_PROMPT_IDS)


class Delta(_Out):
    role: Literal["assistant"] | None = _absent_if_none("in each completion's first event alone")
    content: str | None = _absent_if_none("absent in a completion's last event, which has its finish_reason")


class ChatChunkChoice(_Out):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    token_ids: list[int] | None = _absent_if_none(_IDS + " (those new in this event)")


class ChatCompletionChunk(_Out):
    """One event of a streamed chat completion (text/event-stream, `data: {...}`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _absent_if_none("in the last event alone, with stream_options.include_usage")
    prompt_token_ids: list[int] | None = _absent_if_none(_PROMPT_IDS + " (in the first event)")


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv2"
    root: str | None = Field(description="the checkpoint folder's name (never a path of the server's disk)")
    parent: str | None = Field(None, description="a LoRA adapter's base model")
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
