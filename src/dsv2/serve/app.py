"""The OpenAI-compatible HTTP API over the engine (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/tokenize, /detokenize, /health, /metrics, and its OpenAPI schema (/openapi.json, browsable at /docs).

A Server owns the engine loop, the tokenizer, the metrics, the chat template and the limits; each route is one of
its methods, registered with its response model (ROUTES) on the FastAPI app it builds, Server(...).app, which
build_app returns. Each handler checks its request
completely before anything is queued (types by pydantic, ranges by SamplingParams, the prompt, its length and its
worst case by Engine.admit, once: the engine loop adds that Admission as it is), so a bad request is a 4xx in
OpenAI's error shape and never reaches the engine. A full queue is a 503 before any 200, a stream's too.
Completions stream as server-sent events, one `data:` line per chunk and a final `data: [DONE]`, as OpenAI's API
does; a client that goes away aborts its requests (their blocks are freed before the next step).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import RequestError
from ..inference.engine import Engine, RequestOutput, TokenLogprob
from ..inference.engine.params import Admission
from .chat import ChatTemplate, ChatTemplateError
from .engine_loop import EngineLoop
from .http import EventStream, Guard, install_error_handlers, openapi_schema, sse, sse_errors
from .protocol import (
    ApiError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
)


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 << 20
    root: str | None = None
    """The checkpoint directory (shown by /v1/models)."""


@dataclass
class _Job:
    """One API request's prompts in the engine: request id of each, their admissions, the response's id and time."""

    id: str
    rids: list[str]
    admissions: list[Admission]
    created: int

    @classmethod
    def of(cls, prefix: str, admissions: list[Admission]) -> _Job:
        base = f"{prefix}-{uuid.uuid4().hex}"
        return cls(base, [f"{base}-{i}" for i in range(len(admissions))], admissions, int(time.time()))

    def usage(self, finals: dict[int, RequestOutput]) -> Usage:
        p = sum(len(a.prompt_ids) for a in self.admissions)
        c = sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


_CLIENT = {"model": ErrorResponse, "description": "The request's mistake (400; 401 without the API key; 404; 413), "
           "in OpenAI's error shape"}
_SERVER = {"model": ErrorResponse, "description": "The server's (500: a bug; 503: its queue is full, or it is "
           "stopping), in OpenAI's error shape"}
_ERRORS = {"4XX": _CLIENT, "5XX": _SERVER}
# response_class JSONResponse, not FastAPI's default: the response model's dump written by json.dumps, as the server
# has always written its JSON (pydantic's own JSON would write a logprob of 1e-05 as 0.00001)
ROUTES = (  # method, path, the Server's method, response model, response class, responses other than the 200
    ("GET", "/health", "health", None, JSONResponse, {"5XX": _SERVER}),
    ("GET", "/metrics", "prometheus_metrics", None, PlainTextResponse, {}),
    ("GET", "/v1/models", "models", ModelList, JSONResponse, _ERRORS),
    ("POST", "/tokenize", "tokenize", TokenizeResponse, JSONResponse, _ERRORS),
    ("POST", "/detokenize", "detokenize", DetokenizeResponse, JSONResponse, _ERRORS),
    ("POST", "/v1/completions", "completions", CompletionResponse, JSONResponse, _ERRORS),
    ("POST", "/v1/chat/completions", "chat_completions", ChatCompletionResponse, JSONResponse, _ERRORS),
)
STREAMS = {"/v1/completions": CompletionStreamResponse, "/v1/chat/completions": ChatCompletionChunk}
"""The routes that stream with stream: true, and their events (in the OpenAPI schema as a text/event-stream)."""


def build_app(engine: Engine, config: ServerConfig, chat_template: ChatTemplate | None = None) -> FastAPI:
    return Server(engine, config, chat_template).app


class Server:
    """The API over one engine: the engine loop, the tokenizer, the metrics, the chat template and the limits
    (config). A public method per route, named in ROUTES; .app is the FastAPI app, whose lifespan runs the loop."""

    def __init__(self, engine: Engine, config: ServerConfig, chat_template: ChatTemplate | None = None):
        self.engine, self.config, self.chat_template = engine, config, chat_template
        self.loop = EngineLoop(engine, config.max_queue)
        self.metrics = self.loop.metrics
        self.tokenizer = engine.tokenizer
        self.vocab = engine.model.config.vocab_size
        self.app = self._build()

    def _build(self) -> FastAPI:
        """The FastAPI app: a route per entry of ROUTES, the API key and the body limit, errors in OpenAI's shape,
        the OpenAPI schema at /openapi.json and its pages at /docs (open without the API key, as /health)."""
        app = FastAPI(title="dsv2", summary="The OpenAI-compatible API of dsv2 serve", lifespan=self._lifespan,
                      docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
        app.state.server, app.state.engine_loop = self, self.loop
        app.add_middleware(Guard, api_key=self.config.api_key, max_body_bytes=self.config.max_body_bytes)
        install_error_handlers(app)
        for method, path, name, model, kind, responses in ROUTES:
            app.add_api_route(path, getattr(self, name), methods=[method], response_model=model, response_class=kind,
                              responses=responses)
        app.openapi = lambda: openapi_schema(app, STREAMS)
        return app

    @asynccontextmanager
    async def _lifespan(self, _app):
        self.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.loop.stop)

    # -- routes ---------------------------------------------------------------------------------------------------
    async def health(self) -> dict:
        """200 while the engine loop runs, 503 once it has stopped (open without the API key)."""
        if not self.loop.alive:
            raise ApiError(503, "the engine loop is not running")
        return {}

    async def prometheus_metrics(self) -> Response:
        """The server's Prometheus metrics (open without the API key)."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> ModelList:
        """The one model this server serves."""
        c = self.config
        return ModelList(data=[ModelCard(id=c.model_name, created=int(time.time()), root=c.root,
                                         max_model_len=c.max_model_len)])

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """A prompt's token ids (BOS first), or a chat's as its template renders it: what the engine is fed."""
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either prompt or messages", param="prompt")
        if req.messages is not None:
            ids = self._chat_prompt(req.messages, req.add_generation_prompt)
        else:
            self._need_tokenizer("a text prompt")
            ids = self.engine.encode(req.prompt, bos=req.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.config.max_model_len)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids' text (special tokens included)."""
        self._check_model(req.model)
        self._need_tokenizer("detokenizing")
        bad = [t for t in req.tokens if not 0 <= t < self.vocab]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False))

    async def completions(self, req: CompletionRequest, request: Request) -> CompletionResponse | Response:
        """Completions of a prompt or of a list of prompts (text or token ids), n each; streamed as
        text/event-stream events (CompletionStreamResponse) with stream: true."""
        self._check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs (the prompt's log-probabilities) is not supported", param="echo")
        prompts = req.prompts()
        if len(prompts) * req.n > self.config.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} completions is more than the server queues "
                           f"({self.config.max_queue})", param="prompt")
        if any(isinstance(p, str) for p in prompts) or req.echo:
            self._need_tokenizer("a text prompt" if not req.echo else "echo")
        job = _Job.of("cmpl", [self._admit(p, req, req.logprobs, req.max_tokens, "prompt") for p in prompts])
        echoes = [(p if isinstance(p, str) else self.tokenizer.decode(a.prompt_ids, skip_special_tokens=False))
                  if req.echo else "" for p, a in zip(prompts, job.admissions, strict=True)]
        sink = self.loop.submit_all(job.rids, job.admissions)  # a full queue is a 503 before any 200
        if req.stream:
            return self._stream(self._completion_events(req, job, echoes, sink), job)
        finals = await self._finals(sink, job, request)
        if finals is None:
            return Response(status_code=499)
        choices = [CompletionChoice(index=i * req.n + c.index, text=echoes[i] + c.text, finish_reason=c.finish_reason,
                                    logprobs=(self._completion_logprobs(c.logprobs, len(echoes[i]))
                                              if req.logprobs is not None else None))
                   for i in range(len(prompts)) for c in finals[i].outputs]
        return CompletionResponse(id=job.id, created=job.created, model=self.config.model_name, choices=choices,
                                  usage=job.usage(finals))

    async def chat_completions(self, req: ChatCompletionRequest, request: Request
                               ) -> ChatCompletionResponse | Response:
        """Chat completions of a conversation rendered by the checkpoint's chat template, n of them; streamed as
        text/event-stream events (ChatCompletionChunk) with stream: true."""
        self._check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "send max_tokens or max_completion_tokens, not both", param="max_tokens")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = req.logprobs_n()
        if req.n > self.config.max_queue:
            raise ApiError(400, f"n={req.n} is more than the server queues ({self.config.max_queue})", param="n")
        prompt = self._chat_prompt(req.messages, req.add_generation_prompt)
        job = _Job.of("chatcmpl", [self._admit(prompt, req, logprobs, asked, "messages")])
        sink = self.loop.submit_all(job.rids, job.admissions)
        if req.stream:
            return self._stream(self._chat_events(req, logprobs is not None, job, sink), job)
        finals = await self._finals(sink, job, request)
        if finals is None:
            return Response(status_code=499)
        choices = [ChatChoice(index=c.index, message=ChatMessage(content=c.text), finish_reason=c.finish_reason,
                              logprobs=self._chat_logprobs(c.logprobs) if logprobs is not None else None)
                   for c in finals[0].outputs]
        return ChatCompletionResponse(id=job.id, created=job.created, model=self.config.model_name, choices=choices,
                                      usage=job.usage(finals))

    # -- streams --------------------------------------------------------------------------------------------------
    async def _completion_events(self, req: CompletionRequest, job: _Job, echoes: list[str], sink: asyncio.Queue
                                 ) -> AsyncIterator[CompletionStreamResponse]:
        def event(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionStreamResponse:
            return CompletionStreamResponse(id=job.id, created=job.created, model=self.config.model_name,
                                            choices=choices, usage=usage)

        n, finals = req.n, {}
        sent: dict[int, int] = {}  # characters streamed per choice (text_offset of logprobs)
        if req.echo:
            for i, e in enumerate(echoes):
                for j in range(n):
                    sent[i * n + j] = len(e)
                    yield event([CompletionChoice(index=i * n + j, text=e, logprobs=None, finish_reason=None)])
        async for i, out, moved in self.loop.outputs(sink, job.rids):
            if out.finished:
                finals[i] = out
            for c in moved:
                k = i * n + c.index
                lp = (self._completion_logprobs(c.new_logprobs, sent.get(k, 0))
                      if c.new_logprobs and req.logprobs is not None else None)
                if c.text_delta or lp or c.finish_reason:
                    sent[k] = sent.get(k, 0) + len(c.text_delta)
                    yield event([CompletionChoice(index=k, text=c.text_delta, logprobs=lp,
                                                  finish_reason=c.finish_reason)])
        if req.include_usage:
            yield event([], job.usage(finals))

    async def _chat_events(self, req: ChatCompletionRequest, logprobs: bool, job: _Job, sink: asyncio.Queue
                           ) -> AsyncIterator[ChatCompletionChunk]:
        def event(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=job.id, created=job.created, model=self.config.model_name, choices=choices,
                                       usage=usage)

        def choice(index: int, delta: Delta, lp: ChatLogprobs | None = None, finish: str | None = None):
            return [ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)]

        final = None
        for j in range(req.n):
            yield event(choice(j, Delta(role="assistant", content="")))
        async for _, out, moved in self.loop.outputs(sink, job.rids):
            final = out if out.finished else final
            for c in moved:
                lp = self._chat_logprobs(c.new_logprobs) if c.new_logprobs and logprobs else None
                if c.text_delta or lp:
                    yield event(choice(c.index, Delta(content=c.text_delta), lp))
                if c.finish_reason:
                    yield event(choice(c.index, Delta(), finish=c.finish_reason))
        if req.include_usage and final is not None:
            yield event([], job.usage({0: final}))

    def _stream(self, events: AsyncIterator, job: _Job) -> EventStream:
        """The events as server-sent events (an error after the 200 as an error event), then [DONE]; the job's
        requests are aborted however the response ends."""
        async def lines() -> AsyncIterator[str]:
            async for e in events:
                yield sse(e.model_dump())

        return EventStream(sse_errors(lines()), lambda: [self.loop.abort(r) for r in job.rids])

    # -- the engine -----------------------------------------------------------------------------------------------
    def _admit(self, prompt: str | list[int], req: CompletionRequest | ChatCompletionRequest, logprobs: int | None,
               requested: int | None, param: str) -> Admission:
        """The request admitted by the engine, once (max_tokens None: what the context and the cache leave, chat's
        default); a RequestError is a 400 naming its param (a prompt's is `param`: "messages" for a chat)."""
        try:
            return self.engine.admit(prompt, req.sampling_params(requested, logprobs), truncate=False)
        except RequestError as e:
            raise ApiError(400, str(e), param=param if e.param in (None, "prompt") else e.param) from None

    async def _finals(self, sink: asyncio.Queue, job: _Job, request: Request) -> dict[int, RequestOutput] | None:
        """Each prompt's final output, or None when the client went away first."""
        finals = {}
        async for i, out, _ in self.loop.outputs(sink, job.rids, request.is_disconnected):
            if out.finished:
                finals[i] = out
        return finals if len(finals) == len(job.rids) else None

    # -- requests and responses -----------------------------------------------------------------------------------
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ApiError(404, f"the model '{name}' does not exist (this server has '{self.config.model_name}')",
                           param="model")

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ApiError(400, f"{what} needs a tokenizer and this checkpoint has no tokenizer.json: send token ids")

    def _chat_prompt(self, messages, add_generation_prompt: bool) -> list[int]:
        if self.chat_template is None:
            raise ApiError(400, "this checkpoint has no chat template (chat_template in tokenizer_config.json): use "
                           "/v1/completions, or add one", param="messages")
        self._need_tokenizer("a chat")
        try:
            text = self.chat_template.render([m.for_template() for m in messages], add_generation_prompt)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # text the tokenizer cannot take (a lone surrogate from a message's extra fields)
            raise ApiError(400, "the rendered chat is not valid Unicode", param="messages") from None
        if not ids:
            raise ApiError(400, "the chat template rendered these messages as no tokens", param="messages")
        return ids

    def _token_text(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer is not None else f"token_id:{t}"

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        tokens = [self._token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        top = [{self._token_text(i): v for i, v in [(lp.token_id, lp.logprob), *lp.top]} for lp in lps]
        return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in lps], top_logprobs=top,
                                  text_offset=offsets)

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        def entry(t: int, v: float) -> dict:
            text = self._token_text(t)
            return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8", errors="replace"))}

        return ChatLogprobs(content=[ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                                                      top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
                                     for lp in lps])
