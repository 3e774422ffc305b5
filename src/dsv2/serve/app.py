"""The OpenAI-compatible HTTP API over the engine (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/tokenize, /detokenize, /health, /metrics.

Each handler checks its request completely before anything is queued (types by pydantic, ranges by SamplingParams,
the prompt by engine.check_request, the context by max_model_len), so a bad request is a 4xx in OpenAI's error shape
and never reaches the engine. Completions stream as server-sent events, one `data:` line per chunk and a final
`data: [DONE]`, as OpenAI's API does; a client that goes away aborts its requests (their blocks are freed before the
next step).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import RequestError
from ..inference.engine import Engine, RequestOutput, SamplingParams, TokenLogprob
from .chat import ChatTemplate, ChatTemplateError
from .engine_loop import EngineLoop
from .http import EventStream, Guard, install_error_handlers
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
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


def build_app(engine: Engine, config: ServerConfig, chat_template: ChatTemplate | None = None) -> FastAPI:
    loop = EngineLoop(engine, config.max_queue)
    tokenizer = engine.tokenizer
    vocab = engine.model.config.vocab_size

    @asynccontextmanager
    async def lifespan(_app):
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.stop)

    app = FastAPI(title="dsv2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine_loop = loop
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    install_error_handlers(app)

    # -- helpers --------------------------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise ApiError(404, f"the model '{name}' does not exist (this server has '{config.model_name}')",
                           param="model")

    def need_tokenizer(what: str) -> None:
        if tokenizer is None:
            raise ApiError(400, f"{what} needs a tokenizer and this checkpoint has no tokenizer.json: send token ids")

    def prepared(prompt: str | list[int], req, logprobs: int | None, requested: int | None, param: str
                 ) -> tuple[list[int], SamplingParams]:
        """The prompt's ids and the request's SamplingParams, admitted by the engine (max_tokens None: what the
        context and the cache leave, chat's default)."""
        try:
            adm = engine.admit(prompt, req.sampling_params(requested, logprobs), truncate=False)
        except RequestError as e:
            raise ApiError(400, str(e), param=param if e.param in (None, "prompt") else e.param) from None
        return adm.prompt_ids, adm.params

    def token_text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False) if tokenizer is not None else f"token_id:{t}"

    def token_bytes(t: int) -> list[int]:
        return list(token_text(t).encode("utf-8", errors="replace"))

    def chat_prompt(messages, add_generation_prompt: bool) -> list[int]:
        if chat_template is None:
            raise ApiError(400, "this checkpoint has no chat template (chat_template in tokenizer_config.json): use "
                           "/v1/completions, or add one", param="messages")
        need_tokenizer("a chat")
        try:
            text = chat_template.render([m.for_template() for m in messages], add_generation_prompt)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        try:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # text the tokenizer cannot take (a lone surrogate from a message's extra fields)
            raise ApiError(400, "the rendered chat is not valid Unicode", param="messages") from None
        if not ids:
            raise ApiError(400, "the chat template rendered these messages as no tokens", param="messages")
        return ids

    def submit(rids: list[str], prompts: list[list[int]], params: list[SamplingParams]) -> asyncio.Queue:
        """Queue the prompts (all or none: a 503 aborts those already queued); their outputs come on the queue."""
        sink: asyncio.Queue = asyncio.Queue()
        for i, (rid, ids, p) in enumerate(zip(rids, prompts, params, strict=True)):
            try:
                loop.submit(rid, ids, p, sink, tag=i)
            except ApiError:
                for earlier in rids[:i]:
                    loop.abort(earlier)
                raise
        return sink

    async def outputs(sink: asyncio.Queue, rids: list[str], request: Request | None = None
                      ) -> AsyncIterator[tuple[int, RequestOutput, list]]:
        """(prompt index, output, its completions that moved) until every prompt has finished (a completion's
        finish is reported once). With request (a response not streamed), a client that goes away ends it; a stream
        is cancelled by Starlette instead. What has not finished is aborted on the way out."""
        left, done = set(range(len(rids))), set()
        check_at = time.monotonic() + 1.0
        try:
            while left:
                try:
                    i, item = await asyncio.wait_for(sink.get(), timeout=1.0)
                except TimeoutError:
                    i, item = None, None
                if request is not None and time.monotonic() >= check_at:
                    check_at = time.monotonic() + 1.0
                    if await request.is_disconnected():
                        return
                if item is None:
                    if not loop.alive:
                        raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
                    continue
                if isinstance(item, Exception):
                    left.discard(i)
                    raise item
                if item.finished:
                    left.discard(i)
                moved = [c for c in item.outputs if (i, c.index) not in done]
                done.update((i, c.index) for c in moved if c.finish_reason)
                yield i, item, moved
        finally:
            for i in left:
                loop.abort(rids[i])

    def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
        tokens = [token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{token_text(i): v for i, v in [(lp.token_id, lp.logprob), *lp.top]} for lp in lps],
                "text_offset": offsets}

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        def entry(t: int, v: float) -> dict:
            return {"token": token_text(t), "logprob": v, "bytes": token_bytes(t)}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps], "refusal": None}

    def usage(prompts: list[list[int]], finals: dict[int, RequestOutput]) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream(gen: AsyncIterator[str], rids: list[str]) -> StreamingResponse:
        return EventStream(gen, lambda: [loop.abort(r) for r in rids])

    async def sse_errors(gen: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's error after its 200: an error event, then [DONE] (as vLLM and OpenAI end a failed stream)."""
        try:
            async for chunk in gen:
                yield chunk
        except ApiError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    # -- endpoints ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not loop.alive:
            raise ApiError(503, "the engine loop is not running")
        return {}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(loop.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "dsv2", "root": config.root,
                                            "max_model_len": config.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either prompt or messages", param="prompt")
        if req.messages is not None:
            ids = chat_prompt(req.messages, req.add_generation_prompt)
        else:
            need_tokenizer("a text prompt")
            ids = engine.encode(req.prompt, bos=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": config.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        need_tokenizer("detokenizing")
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs (the prompt's log-probabilities) is not supported", param="echo")
        prompts = req.prompts()
        if len(prompts) * req.n > config.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} completions is more than the server queues "
                           f"({config.max_queue})", param="prompt")
        if any(isinstance(p, str) for p in prompts) or req.echo:
            need_tokenizer("a text prompt" if not req.echo else "echo")
        ids, params = [], []
        for p in prompts:
            prompt_ids, sp = prepared(p, req, req.logprobs, req.max_tokens, "prompt")
            ids.append(prompt_ids)
            params.append(sp)
        echoes = [(p if isinstance(p, str) else tokenizer.decode(x, skip_special_tokens=False)) if req.echo else ""
                  for p, x in zip(prompts, ids, strict=True)]
        base = f"cmpl-{uuid.uuid4().hex}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        created, n = int(time.time()), req.n

        def head(choices, **extra) -> dict:
            return {"id": base, "object": "text_completion", "created": created, "model": config.model_name,
                    "choices": choices, **extra}

        sink = submit(rids, ids, params)  # a full queue is a 503 before any 200
        if req.stream:
            async def chunks() -> AsyncIterator[str]:
                finals: dict[int, RequestOutput] = {}
                sent: dict[int, int] = {}  # characters streamed per choice (text_offset of logprobs)
                if req.echo:
                    for i, e in enumerate(echoes):
                        for j in range(n):
                            sent[i * n + j] = len(e)
                            yield sse(head([{"index": i * n + j, "text": e, "logprobs": None, "finish_reason": None}]))
                async for i, out, moved in outputs(sink, rids):
                    if out.finished:
                        finals[i] = out
                    for c in moved:
                        k = i * n + c.index
                        lp = (completion_logprobs(c.new_logprobs, sent.get(k, 0))
                              if c.new_logprobs and req.logprobs is not None else None)
                        if c.text_delta or lp or c.finish_reason:
                            sent[k] = sent.get(k, 0) + len(c.text_delta)
                            yield sse(head([{"index": k, "text": c.text_delta, "logprobs": lp,
                                             "finish_reason": c.finish_reason}]))
                if req.include_usage:
                    yield sse(head([], usage=usage(ids, finals)))

            return stream(sse_errors(chunks()), rids)

        finals: dict[int, RequestOutput] = {}
        async for i, out, _ in outputs(sink, rids, request):
            if out.finished:
                finals[i] = out
        if len(finals) < len(prompts):  # the client went away
            return Response(status_code=499)
        choices = []
        for i in range(len(prompts)):
            for c in finals[i].outputs:
                lp = completion_logprobs(c.logprobs, len(echoes[i])) if req.logprobs is not None else None
                choices.append({"index": i * n + c.index, "text": echoes[i] + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return head(choices, usage=usage(ids, finals))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "send max_tokens or max_completion_tokens, not both", param="max_tokens")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = req.logprobs_n()
        if req.n > config.max_queue:
            raise ApiError(400, f"n={req.n} is more than the server queues ({config.max_queue})", param="n")
        prompt_ids, params = prepared(chat_prompt(req.messages, req.add_generation_prompt), req, logprobs, asked,
                                      "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def head(choices, **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk" if req.stream else "chat.completion",
                    "created": created, "model": config.model_name, "choices": choices, **extra}

        sink = submit([rid], [prompt_ids], [params])
        if req.stream:
            async def chunks() -> AsyncIterator[str]:
                final = None
                for j in range(req.n):
                    yield sse(head([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]))
                async for _, out, moved in outputs(sink, [rid]):
                    final = out if out.finished else final
                    for c in moved:
                        lp = chat_logprobs(c.new_logprobs) if c.new_logprobs and logprobs is not None else None
                        if c.text_delta or lp:
                            yield sse(head([{"index": c.index, "delta": {"content": c.text_delta}, "logprobs": lp,
                                             "finish_reason": None}]))
                        if c.finish_reason:
                            yield sse(head([{"index": c.index, "delta": {}, "logprobs": None,
                                             "finish_reason": c.finish_reason}]))
                if req.include_usage and final is not None:
                    yield sse(head([], usage=usage([prompt_ids], {0: final})))

            return stream(sse_errors(chunks()), [rid])

        final = None
        async for _, out, _ in outputs(sink, [rid], request):
            final = out if out.finished else final
        if final is None:
            return Response(status_code=499)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs) if logprobs is not None else None,
                    "finish_reason": c.finish_reason} for c in final.outputs]
        return head(choices, usage=usage([prompt_ids], {0: final}))

    return app
