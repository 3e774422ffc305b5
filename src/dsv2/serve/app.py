"""The OpenAI-compatible HTTP API over the engine (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/tokenize, /detokenize, /health, /metrics, and its OpenAPI schema (/openapi.json, browsable at /docs).

A Server owns the engine loop, the tokenizer (and its TokenTable), the metrics, the chat template and the limits;
each route is one of its methods, registered with its response model (ROUTES) on the FastAPI app it builds,
Server(...).app, which build_app returns. Each handler checks its request completely before anything is queued
(types and OpenAI's ranges by pydantic, the rest by SamplingParams, the prompt, its length and its worst case by
Engine.admit, once: the engine loop adds that Admission as it is), so a bad request is a 4xx in OpenAI's error
shape and never reaches the engine. A full queue is a 503 before any 200, a stream's too.

Nothing that grows with a request runs on the event loop, which every connection shares: a text is bounded in
bytes before it is tokenized, chat templates are rendered and texts tokenized and detokenized in a worker thread
(the tokenizer's batch calls let go of the GIL), and a whole response is built and written to JSON there too.
Completions stream as server-sent events, one `data:` line per chunk and a final `data: [DONE]`, as OpenAI's API
does; a client that goes away aborts its requests (their blocks are freed before the next step).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..chat_template import ChatTemplate, ChatTemplateError
from ..errors import AdapterError, RequestError
from ..inference.engine import Engine, RequestOutput
from ..inference.engine.params import Admission
from .engine_loop import EngineLoop
from .http import Guard, install_error_handlers, openapi_schema
from .outputs import Job, Outputs
from .protocol import (
    LIMITS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRARequest,
    TokenizeRequest,
    UnloadLoRARequest,
)
from .responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from .tokens import TokenTable


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 << 20
    root: str | None = None
    """The checkpoint folder's name (shown by /v1/models; never a path of the server's disk)."""
    lora_loading: bool = False
    """Whether clients may load and unload adapters (paths of the server's disk): with an API key, or asked for."""


_CLIENT = {"model": ErrorResponse, "description": "The request's mistake (400; 401 without the API key; 404; 408 "
           "too slow a body; 413), in OpenAI's error shape"}
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
    ("POST", "/v1/load_lora_adapter", "load_lora_adapter", None, PlainTextResponse, _ERRORS),
    ("POST", "/v1/unload_lora_adapter", "unload_lora_adapter", None, PlainTextResponse, _ERRORS),
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
        self.tokens = TokenTable(self.tokenizer, self.vocab)
        self.max_prompt_bytes = self.tokens.max_prompt_bytes(config.max_model_len)
        self.outputs = Outputs(self.tokens, self.loop, text=self.tokenizer is not None)
        self.app = self._build()

    def _build(self) -> FastAPI:
        """The FastAPI app: a route per entry of ROUTES (HEAD too where GET is served; no redirects, so that no
        answer is built from the client's Host header), the API key and the body, errors in OpenAI's shape, the
        OpenAPI schema at /openapi.json and its pages at /docs (open without the API key, as /health)."""
        app = FastAPI(title="dsv2", summary="The OpenAI-compatible API of dsv2 serve", lifespan=self._lifespan,
                      docs_url="/docs", redoc_url=None, openapi_url="/openapi.json", redirect_slashes=False)
        app.state.server, app.state.engine_loop = self, self.loop
        app.add_middleware(Guard, api_key=self.config.api_key, max_body_bytes=self.config.max_body_bytes)
        install_error_handlers(app)
        for method, path, name, model, kind, responses in ROUTES:
            app.add_api_route(path, getattr(self, name), methods=[method, "HEAD"] if method == "GET" else [method],
                              response_model=model, response_class=kind, responses=responses)
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
        """The base model, and each LoRA adapter loaded (its parent: the base model)."""
        c, now = self.config, int(time.time())
        adapters = [] if self.engine.adapters is None else list(self.engine.adapters.loaded.values())
        return ModelList(data=[ModelCard(id=c.model_name, created=now, root=c.root, max_model_len=c.max_model_len),
                               *(ModelCard(id=a.name, created=now, root=Path(a.path).name, parent=c.model_name,
                                           max_model_len=c.max_model_len) for a in adapters)])

    async def load_lora_adapter(self, req: LoadLoRARequest) -> PlainTextResponse:
        """Load a LoRA adapter folder (PEFT format, a path of the server's disk) under a name requests then give as
        their model (as vLLM's endpoint; behind the API key). It waits for the step in progress."""
        self._check_lora_loading()
        if req.lora_name == self.config.model_name:
            raise ApiError(400, f"{req.lora_name!r} is the base model's name", param="lora_name")
        try:
            await asyncio.to_thread(self.engine.add_adapter, req.lora_name, req.lora_path)
        except AdapterError as e:
            raise ApiError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload_lora_adapter(self, req: UnloadLoRARequest) -> PlainTextResponse:
        """Unload a LoRA adapter (400 while requests still run with it)."""
        self._check_lora_loading()
        try:
            await asyncio.to_thread(self.engine.remove_adapter, req.lora_name)
        except AdapterError as e:
            raise ApiError(400, str(e), param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """A prompt's token ids (BOS first), or a chat's as its template renders it: what the engine is fed."""
        self._adapter(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either prompt or messages", param="prompt")
        if req.messages is not None:
            ids = await self._chat_prompt(req.messages, req.add_generation_prompt)
        else:
            self._need_tokenizer("a text prompt")
            self._check_size(req.prompt, "prompt")
            ids = await asyncio.to_thread(self.engine.encode, req.prompt, req.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.config.max_model_len)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids' text (special tokens included)."""
        self._adapter(req.model)
        self._need_tokenizer("detokenizing")

        def run() -> JSONResponse:
            bad = [t for t in req.tokens if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}", param="tokens")
            text = self.tokenizer.decode_batch([req.tokens], skip_special_tokens=False)[0]
            return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

        return await asyncio.to_thread(run)

    async def completions(self, req: CompletionRequest, request: Request) -> CompletionResponse | Response:
        """Completions of a prompt or of a list of prompts (text or token ids), n each; streamed as
        text/event-stream events (CompletionStreamResponse) with stream: true."""
        adapter = self._adapter(req.model)
        req.check()
        prompts = req.prompts()
        if len(prompts) * req.n > self.config.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} completions is more than the server queues "
                           f"({self.config.max_queue})", param="prompt")
        self._check_budget(len(prompts) * req.n, req.max_tokens, req.logprobs)
        texts = [p for p in prompts if isinstance(p, str)]
        if texts or req.echo:
            self._need_tokenizer("a text prompt" if not req.echo else "echo")
        for p in texts:
            self._check_size(p, "prompt")

        def admit() -> tuple[list[Admission], list[str]]:  # tokenizing (and decoding the echoes) off the loop
            requested = 1 if req.max_tokens == 0 else req.max_tokens  # 0 (echo): one token sampled, not returned
            adms = self._within_budget([self._admit(p, req, req.logprobs, requested, "prompt", adapter,
                                                    req.top_prompt_logprobs) for p in prompts], req.logprobs)
            self._check_prompt_budget(adms, req.top_prompt_logprobs, req.n)
            if not req.echo:
                return adms, [""] * len(prompts)
            decoded = self.tokenizer.decode_batch([a.prompt_ids for a in adms], skip_special_tokens=False)
            return adms, [p if isinstance(p, str) else d for p, d in zip(prompts, decoded, strict=True)]

        admissions, echoes = await asyncio.to_thread(admit)
        job = Job.of("cmpl", admissions, req.model or self.config.model_name)
        sink = self.loop.submit_all(job.rids, job.admissions)  # a full queue is a 503 before any 200
        if req.stream:
            return self.outputs.stream(self.outputs.completion_events(req, job, echoes, sink), job)
        finals = await self._finals(sink, job, request)
        if finals is None:
            return Response(status_code=499)
        return await asyncio.to_thread(self.outputs.completion_response, req, job, echoes, finals)

    async def chat_completions(self, req: ChatCompletionRequest, request: Request
                               ) -> ChatCompletionResponse | Response:
        """Chat completions of a conversation rendered by the checkpoint's chat template, n of them; streamed as
        text/event-stream events (ChatCompletionChunk) with stream: true."""
        adapter = self._adapter(req.model)
        req.check()
        logprobs = req.logprobs_n()
        if req.n > self.config.max_queue:
            raise ApiError(400, f"n={req.n} is more than the server queues ({self.config.max_queue})", param="n")
        self._check_budget(req.n, req.asked, logprobs)
        prompt = await self._chat_prompt(req.messages, req.add_generation_prompt)
        admission = await asyncio.to_thread(self._admit, prompt, req, logprobs, req.asked, "messages", adapter)
        job = Job.of("chatcmpl", self._within_budget([admission], logprobs), req.model or self.config.model_name)
        sink = self.loop.submit_all(job.rids, job.admissions)
        if req.stream:
            return self.outputs.stream(self.outputs.chat_events(req, logprobs is not None, job, sink), job)
        finals = await self._finals(sink, job, request)
        if finals is None:
            return Response(status_code=499)
        return await asyncio.to_thread(self.outputs.chat_response, req, logprobs is not None, job, finals[0])

    # -- the engine -----------------------------------------------------------------------------------------------
    def _admit(self, prompt: str | list[int], req: CompletionRequest | ChatCompletionRequest, logprobs: int | None,
               requested: int | None, param: str, adapter: str | None = None,
               prompt_logprobs: int | None = None) -> Admission:
        """The request admitted by the engine, once (max_tokens None: what the context and the cache leave, chat's
        default); a RequestError is a 400 naming its param (a prompt's is `param`: "messages" for a chat). Any
        thread may call it."""
        try:
            return self.engine.admit(prompt, req.sampling_params(requested, logprobs, prompt_logprobs),
                                     truncate=False, adapter=adapter)
        except RequestError as e:
            raise ApiError(400, str(e), param=param if e.param in (None, "prompt") else e.param,
                           code=e.code) from None

    @staticmethod
    def _check_budget(seqs: int, max_tokens: int | None, logprobs: int | None) -> None:
        """At most LIMITS["logprob_entries"] log-probabilities in one response: completions (prompts x n) x
        max_tokens x (1 + logprobs), checked before any work where max_tokens is given (else: _within_budget)."""
        limit = LIMITS["logprob_entries"]
        if logprobs is None or max_tokens is None or seqs * max_tokens * (1 + logprobs) <= limit:
            return
        raise ApiError(400, f"logprobs: {seqs} completions x max_tokens={max_tokens} x (1 + {logprobs} top) = "
                       f"{seqs * max_tokens * (1 + logprobs)} log-probabilities is more than one response may carry "
                       f"({limit}): ask for fewer tokens, completions or top log-probabilities", param="logprobs")

    @staticmethod
    def _check_prompt_budget(admissions: list[Admission], top: int | None, n: int) -> None:
        """The prompts' log-probabilities count against LIMITS["logprob_entries"] too: prompt tokens x (1 + top),
        in each of a prompt's n choices."""
        tokens = n * sum(len(a.prompt_ids) for a in admissions)
        if top is not None and tokens * (1 + top) > LIMITS["logprob_entries"]:
            raise ApiError(400, f"logprobs: {tokens} prompt tokens x (1 + {top} top) log-probabilities is more than "
                           f"one response may carry ({LIMITS['logprob_entries']})", param="logprobs")

    @staticmethod
    def _within_budget(admissions: list[Admission], logprobs: int | None) -> list[Admission]:
        """A request that named no max_tokens (given what the context and the cache leave) gets no more tokens than
        LIMITS["logprob_entries"] log-probabilities allow."""
        if logprobs is None:
            return admissions
        seqs = sum(a.params.n for a in admissions)
        cap = max(1, LIMITS["logprob_entries"] // (seqs * (1 + logprobs)))
        return [replace(a, params=replace(a.params, max_tokens=min(a.params.max_tokens, cap),
                                          min_tokens=min(a.params.min_tokens, cap))) for a in admissions]

    async def _finals(self, sink: asyncio.Queue, job: Job, request: Request) -> dict[int, RequestOutput] | None:
        """Each prompt's final output, or None when the client went away first."""
        finals = {}
        async for i, out, _ in self.loop.outputs(sink, job.rids, request.is_disconnected):
            if out.finished:
                finals[i] = out
        return finals if len(finals) == len(job.rids) else None

    # -- requests -------------------------------------------------------------------------------------------------
    def _adapter(self, name: str | None) -> str | None:
        """The LoRA adapter a request's model field names (None: the base model); 404 for a name the server has
        not."""
        if name is None or name == self.config.model_name:
            return None
        adapters = self.engine.adapters.loaded if self.engine.adapters is not None else {}
        if name not in adapters:
            have = ", ".join(f"'{n}'" for n in [self.config.model_name, *adapters])
            raise ApiError(404, f"the model '{name}' does not exist (this server has {have})", param="model",
                           code="model_not_found")
        return name

    def _check_lora_loading(self) -> None:
        if self.engine.adapters is None:
            raise ApiError(400, "this server serves no LoRA adapters: start it with --max-loras N (or --lora-modules)")
        if not self.config.lora_loading:  # the request names paths of the server's disk
            raise ApiError(403, "loading adapters at run time is off: start dsv2 serve with --api-key, or with "
                           "--enable-lora-loading on a machine only trusted clients reach")

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ApiError(400, f"{what} needs a tokenizer and this checkpoint has no tokenizer.json: send token ids")

    def _check_size(self, text: str, param: str) -> None:
        """A text too long for the context whatever its tokens, refused before it is tokenized."""
        cap = self.max_prompt_bytes
        if cap is None or 4 * len(text) <= cap:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > cap:
            raise ApiError(400, f"{param}: the text is {size} bytes, more than the model's context of "
                           f"{self.config.max_model_len} tokens can hold ({cap} bytes: a token is at most "
                           f"{self.tokens.max_token_bytes} bytes)", param=param, code="context_length_exceeded")

    async def _chat_prompt(self, messages, add_generation_prompt: bool) -> list[int]:
        """The chat rendered by the template and tokenized, in a worker thread."""
        if self.chat_template is None:
            raise ApiError(400, "this checkpoint has no chat template (chat_template in tokenizer_config.json): use "
                           "/v1/completions, or add one", param="messages")
        self._need_tokenizer("a chat")

        def run() -> list[int]:
            try:
                text = self.chat_template.render([m.for_template() for m in messages], add_generation_prompt)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), param="messages") from None
            self._check_size(text, "messages")
            try:
                ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
            except (TypeError, ValueError):  # text the tokenizer cannot take (a lone surrogate from extra fields)
                raise ApiError(400, "the rendered chat is not valid Unicode", param="messages") from None
            if not ids:
                raise ApiError(400, "the chat template rendered these messages as no tokens", param="messages")
            return ids

        return await asyncio.to_thread(run)
