"""The HTTP plumbing under the API: the API key and the body limit (ASGI middleware, before any handler), every
error in OpenAI's shape, the event stream that aborts its requests however it ends (and its `data:` lines), and the
OpenAPI schema with the events of the streams."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ApiError

PROTECTED = ("/v1/", "/tokenize", "/detokenize")
"""Paths --api-key guards (as vLLM: /health and /metrics stay open for probes and scrapers, /docs and
/openapi.json for readers)."""


class Guard:
    """ASGI middleware: the API key (compared in constant time) and the body size limit, before any handler."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = self.api_key
        if key and scope["path"].startswith(PROTECTED):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + key.encode()):
                return await _send_error(send, ApiError(401, "a valid API key is needed: send the header "
                                                        "'Authorization: Bearer KEY'"))
        limit = self.limit
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_error(send, ApiError(413, f"the request body is over {limit} bytes"))
        seen = 0

        async def counted():  # a chunked body has no length up front
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # an HTTPException passes FastAPI's body parsing as it is (the handler shapes it)
                raise StarletteHTTPException(413, f"the request body is over {limit} bytes")
            return message

        return await self.app(scope, counted, send)


async def _send_error(send, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EventStream(StreamingResponse):
    """Server-sent events; on_close runs however the response ends (done, client gone, server shutting down), so
    a stream's requests are aborted even when its generator is left suspended at a send."""

    def __init__(self, gen: AsyncIterator[str], on_close):
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj: dict) -> str:
    """One server-sent event: a `data:` line of JSON (non-ASCII as it is), then a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events, then [DONE]; an error after its 200 as an error event before [DONE] (as vLLM and OpenAI
    end a failed stream)."""
    try:
        async for event in events:
            yield event
    except ApiError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"


def openapi_schema(app: FastAPI, streams: dict[str, type[BaseModel]]) -> dict:
    """FastAPI's schema of app, with each path in streams also answering 200 as text/event-stream events of its
    model (FastAPI sees only the JSON response model)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in streams.items():
            events = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            components.update(events.pop("$defs", {}))
            components[model.__name__] = events
            ok = schema["paths"][path]["post"]["responses"]["200"]
            ok.setdefault("content", {})["text/event-stream"] = {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            ok["description"] += f"; with stream: true, server-sent events `data: {model.__name__}`, then " \
                "`data: [DONE]`"
        app.openapi_schema = schema
    return app.openapi_schema


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation errors, Starlette's (404, 405), and bugs (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return _error_response(ApiError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}"
                                            .rstrip(": ")))
        where = ".".join(loc)
        return _error_response(ApiError(400, f"{where or 'body'}: {err['msg']}", param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, e: StarletteHTTPException):
        return _error_response(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _bug(_request, e: Exception):
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
