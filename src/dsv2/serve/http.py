"""The HTTP plumbing under the API: the API key, the body (its size limit, read whole before any handler and taken
as JSON whatever its Content-Type says), every error in OpenAI's shape and words (pydantic's internals never reach
the client), the event stream that aborts its requests however it ends (and its `data:` lines), and the OpenAPI
schema with the events of the streams."""

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

from .protocol import FIELDS, PROMPT_TYPES, ApiError

PROTECTED = ("/v1/", "/tokenize", "/detokenize")
"""Paths --api-key guards (as vLLM: /health and /metrics stay open for probes and scrapers, /docs and
/openapi.json for readers)."""


class Guard:
    """ASGI middleware, before any handler: the API key (compared in constant time; the scheme in any case, as
    RFC 9110 has it) and the body, read whole within the size limit (a client that goes away meanwhile gets
    nothing) and handed on as JSON."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith(PROTECTED) and not self._authorized(headers):
            return await _send_error(send, ApiError(401, "a valid API key is needed: send the header "
                                                    "'Authorization: Bearer KEY'",
                                                    headers={"WWW-Authenticate": 'Bearer realm="dsv2"'}))
        limit = self.limit
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_error(send, ApiError(413, f"the request body is over {limit} bytes"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:  # the protocol's read timeouts bound how long this waits (timeouts.py)
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:  # a chunked body has no length up front
                return await _send_error(send, ApiError(413, f"the request body is over {limit} bytes"))
            if not message.get("more_body", False):
                break
        # every POST route takes JSON: a body sent as text/plain or a form (curl -d) is read as JSON too
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")])
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: a disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())


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
        for operations in schema["paths"].values():  # HEAD is served wherever GET is: not an operation of its own
            operations.pop("head", None)
        app.openapi_schema = schema
    return app.openapi_schema


# -- errors -------------------------------------------------------------------------------------------------------
KINDS = {"float_type": "a number", "int_type": "an integer", "string_type": "a string", "bool_type": "a boolean",
         "list_type": "a list", "dict_type": "an object", "model_type": "an object",
         "model_attributes_type": "an object", "int_from_float": "an integer", "too_short": "a non-empty list"}
HINTS = {"prompt": PROMPT_TYPES, "stop": "stop must be a string or a list of strings",
         "content": "content must be a string or a list of text parts"}


def _where(loc) -> list:
    """A pydantic location as the request's fields and indices alone ("body", union members and tags dropped)."""
    return [x for x in loc if isinstance(x, int) or x in FIELDS]


def validation_error(errors: list[dict]) -> ApiError:
    """Pydantic's errors for a request body as one 400 in OpenAI's words: the first field at fault, named as the
    request names it (param), and what it must be."""
    if not errors:
        return ApiError(400, "invalid request")
    if errors[0].get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}".rstrip(": "))
    field = (_where(errors[0]["loc"]) or [None])[0]
    group = [e for e in errors if (_where(e["loc"]) or [None])[0] == field]  # the members of one union, say
    specific = next((e for e in group if e["type"] in ("value_error", "assertion_error")), None)
    if specific is not None:  # our own checks' words
        where = ".".join(map(str, _where(specific["loc"])))
        return ApiError(400, specific["msg"].removeprefix("Value error, "), param=where or None)
    locs = [_where(e["loc"]) for e in group]
    common = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(common), len(loc)) and common[n] == loc[n]:
            n += 1
        common = common[:n]
    where = ".".join(map(str, common))
    if not where:
        return ApiError(400, "the body must be a JSON object")
    last = common[-1]
    if isinstance(last, str) and last in HINTS and len(group) > 1:
        return ApiError(400, HINTS[last], param=where)
    if group[0]["type"] == "missing":
        return ApiError(400, f"{where} is required", param=where)
    kinds = list(dict.fromkeys(KINDS[e["type"]] for e, loc in zip(group, locs, strict=True)
                               if loc == common and e["type"] in KINDS))
    if "a number" in kinds:
        kinds = ["a number", *(k for k in kinds if k not in ("a number", "an integer"))]
    if kinds:
        return ApiError(400, f"{where} must be {' or '.join(kinds)}", param=where)
    return ApiError(400, f"{where}: {group[0]['msg']}", param=where)


def _parse_error(e: Exception) -> ApiError | None:
    """Why FastAPI could not parse a body (it says only "There was an error parsing the body")."""
    cause = e.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(400, f"the body is not valid UTF-8 (byte {cause.start}: {cause.reason})")
    if isinstance(cause, RecursionError):
        return ApiError(400, "the body's JSON is nested too deeply")
    if isinstance(cause, ValueError):
        return ApiError(400, f"the body is not valid JSON ({cause})")
    return None


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation errors, Starlette's (404, 405 with its Allow),
    and bugs (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        return _error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        if e.status_code == 400 and (parsed := _parse_error(e)) is not None:
            return _error_response(parsed)
        message = str(e.detail)
        if e.status_code == 404:
            message = f"Not Found: no route {request.method} {request.url.path}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow")
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        return _error_response(ApiError(e.status_code, message, headers=e.headers))

    @app.exception_handler(Exception)
    async def _bug(_request, e: Exception):
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
