"""What the API sends back from the engine's outputs: a whole response (built, with its JSON, in a worker thread
by the caller: it grows with the request) or a stream's events, for completions and chats; and the Job, one API
request's prompts in the engine.

Token ids (vLLM's prompt_token_ids and token_ids) are shown with return_token_ids, and always in a completion on a
checkpoint without a tokenizer, whose `text` is then null (its output is its ids, never an empty text) and whose
logprobs have no text_offset.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from ..inference.engine import RequestOutput
from ..inference.engine.params import Admission
from .engine_loop import EngineLoop
from .http import EventStream, sse, sse_errors
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionResponse,
    CompletionStreamResponse,
    Delta,
    Usage,
)
from .tokens import TokenTable


@dataclass
class Job:
    """One API request's prompts in the engine: request id of each, their admissions, the response's id and time."""

    id: str
    rids: list[str]
    admissions: list[Admission]
    created: int
    model: str
    """The model the request named: the base model's name, or a LoRA adapter's."""

    @classmethod
    def of(cls, prefix: str, admissions: list[Admission], model: str) -> Job:
        base = f"{prefix}-{uuid.uuid4().hex}"
        return cls(base, [f"{base}-{i}" for i in range(len(admissions))], admissions, int(time.time()), model)

    def usage(self, finals: dict[int, RequestOutput], prompt_only: bool = False) -> Usage:
        p = sum(len(a.prompt_ids) for a in self.admissions)
        c = 0 if prompt_only else sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class Outputs:
    """Responses and events of one server: its TokenTable, its engine loop; `text`: whether the checkpoint has a
    tokenizer. A response names the model its Job ran on."""

    def __init__(self, tokens: TokenTable, loop: EngineLoop, text: bool):
        self.tokens, self.loop, self.text = tokens, loop, text

    def ids(self, req: CompletionRequest | ChatCompletionRequest) -> bool:
        """Whether a completion shows token ids: asked for, or the only output there is (no tokenizer)."""
        return req.return_token_ids or not self.text

    def completion_response(self, req: CompletionRequest, job: Job, echoes: list[str],
                             finals: dict[int, RequestOutput]) -> JSONResponse:
        ids, text, none = self.ids(req), self.text, req.max_tokens == 0  # max_tokens 0: the prompt alone

        def choice(i: int, c) -> CompletionChoice:
            lps, token_ids = ([], []) if none else (c.logprobs, c.token_ids)
            if req.echo_logprobs:
                lp = self.tokens.echo_logprobs(finals[i].prompt_logprobs, job.admissions[i].prompt_ids, lps,
                                               echoes[i] if text else None, req.logprobs)
            else:
                lp = (self.tokens.completion_logprobs(lps, len(echoes[i]) if text else None)
                      if req.logprobs is not None else None)
            return CompletionChoice(
                index=i * req.n + c.index, text=echoes[i] + ("" if none else c.text) if text else None,
                finish_reason="length" if none else c.finish_reason, logprobs=lp,
                prompt_token_ids=job.admissions[i].prompt_ids if ids else None,
                token_ids=token_ids if ids else None,
                prompt_logprobs=(self.tokens.prompt_logprobs(finals[i].prompt_logprobs, req.prompt_logprobs)
                                 if req.prompt_logprobs is not None else None))

        choices = [choice(i, c) for i in range(len(job.rids)) for c in finals[i].outputs]
        return JSONResponse(CompletionResponse(id=job.id, created=job.created, model=job.model,
                                               choices=choices, usage=job.usage(finals, none)).model_dump())

    def chat_response(self, req: ChatCompletionRequest, logprobs: bool, job: Job, final: RequestOutput
                       ) -> JSONResponse:
        ids = req.return_token_ids
        choices = [ChatChoice(index=c.index, message=ChatMessage(content=c.text), finish_reason=c.finish_reason,
                              logprobs=self.tokens.chat_logprobs(c.logprobs) if logprobs else None,
                              token_ids=c.token_ids if ids else None)
                   for c in final.outputs]
        return JSONResponse(ChatCompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=job.usage({0: final}),
            prompt_token_ids=job.admissions[0].prompt_ids if ids else None).model_dump())

    # -- streams --------------------------------------------------------------------------------------------------
    async def completion_events(self, req: CompletionRequest, job: Job, echoes: list[str], sink: asyncio.Queue
                                 ) -> AsyncIterator[CompletionStreamResponse]:
        ids, text, n, finals = self.ids(req), self.text, req.n, {}
        sent: dict[int, int] = {}  # characters streamed per choice (text_offset of logprobs)

        def event(k: int, delta: str, new_ids: list[int] | None = None, lp=None, finish: str | None = None,
                  prompt_lps=None):
            first = k not in sent
            sent[k] = sent.get(k, 0) + len(delta)
            choice = CompletionChoice(index=k, text=delta if text else None, logprobs=lp, finish_reason=finish,
                                      prompt_token_ids=job.admissions[k // n].prompt_ids if ids and first else None,
                                      token_ids=(new_ids or []) if ids else None, prompt_logprobs=prompt_lps)
            return CompletionStreamResponse(id=job.id, created=job.created, model=job.model,
                                            choices=[choice])

        # with the prompt's log-probabilities, the echo waits for them: a prompt's first output carries them
        with_prompt, none, echoed = req.echo_logprobs or req.prompt_logprobs is not None, req.max_tokens == 0, set()
        if req.echo and not with_prompt:
            for i, e in enumerate(echoes):
                for j in range(n):
                    yield event(i * n + j, e)
        async for i, out, moved in self.loop.outputs(sink, job.rids):
            if out.finished:
                finals[i] = out
            if with_prompt and i not in echoed:
                echoed.add(i)
                ids_i = job.admissions[i].prompt_ids
                lp = (self.tokens.echo_logprobs(out.prompt_logprobs, ids_i, [], echoes[i] if text else None,
                                                req.logprobs) if req.echo_logprobs else None)
                plp = (self.tokens.prompt_logprobs(out.prompt_logprobs, req.prompt_logprobs)
                       if req.prompt_logprobs is not None else None)
                for j in range(n):
                    yield event(i * n + j, echoes[i] if req.echo else "", lp=lp, prompt_lps=plp)
            for c in moved:
                k = i * n + c.index
                if none:  # max_tokens 0: the prompt alone; the one token sampled is not shown
                    if c.finish_reason:
                        yield event(k, "", [], None, "length")
                    continue
                lp = (self.tokens.completion_logprobs(c.new_logprobs, sent.get(k, 0) if text else None)
                      if c.new_logprobs and req.logprobs is not None else None)
                if c.text_delta or lp or c.finish_reason or (ids and c.new_token_ids):
                    yield event(k, c.text_delta, c.new_token_ids, lp, c.finish_reason)
        if req.include_usage:
            yield CompletionStreamResponse(id=job.id, created=job.created, model=job.model,
                                           choices=[], usage=job.usage(finals, none))

    async def chat_events(self, req: ChatCompletionRequest, logprobs: bool, job: Job, sink: asyncio.Queue
                           ) -> AsyncIterator[ChatCompletionChunk]:
        ids = req.return_token_ids

        def event(choices: list[ChatChunkChoice], usage: Usage | None = None, first: bool = False):
            return ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=choices,
                                       usage=usage, prompt_token_ids=job.admissions[0].prompt_ids
                                       if ids and first else None)

        def choice(index: int, delta: Delta, lp=None, finish: str | None = None, new_ids: list[int] | None = None):
            return [ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish,
                                    token_ids=(new_ids or []) if ids else None)]

        final = None
        for j in range(req.n):
            yield event(choice(j, Delta(role="assistant", content="")), first=j == 0)
        async for _, out, moved in self.loop.outputs(sink, job.rids):
            final = out if out.finished else final
            for c in moved:
                lp = self.tokens.chat_logprobs(c.new_logprobs) if c.new_logprobs and logprobs else None
                if c.text_delta or lp or (ids and c.new_token_ids):
                    yield event(choice(c.index, Delta(content=c.text_delta), lp, new_ids=c.new_token_ids))
                if c.finish_reason:
                    yield event(choice(c.index, Delta(), finish=c.finish_reason))
        if req.include_usage and final is not None:
            yield event([], job.usage({0: final}))

    def stream(self, events: AsyncIterator, job: Job) -> EventStream:
        """The events as server-sent events (an error after the 200 as an error event), then [DONE]; the job's
        requests are aborted however the response ends."""
        async def lines() -> AsyncIterator[str]:
            async for e in events:
                yield sse(e.model_dump())

        return EventStream(sse_errors(lines()), lambda: [self.loop.abort(r) for r in job.rids])
