"""The engine's step loop on a thread of its own, apart from the HTTP event loop.

A forward can take from milliseconds (a decode step) to seconds (a long prefill chunk); on the event loop it would
stall every connection, and a slow client would stall generation. So the loop thread alone steps the engine:
handlers submit requests the engine has admitted (Engine.admit, on the handler's side: the loop adds the Admission
as it is, without checking it again) and abort them through a queue of commands (Add, Abort, Wake) that the thread
drains between steps, and each request's outputs come back on an asyncio.Queue of the handler's event loop
(call_soon_threadsafe). An abort therefore takes effect, and frees the request's blocks, before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..errors import GenerationError
from ..inference.engine import CompletionOutput, Engine, RequestOutput
from ..inference.engine.params import Admission
from .metrics import Metrics
from .protocol import ApiError

log = logging.getLogger("dsv2.serve")


@dataclass
class _Tracked:
    """A request the loop has taken: where its outputs go and its timings (for the metrics)."""

    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    tag: object
    arrival: float
    first_token: float | None = None

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.sink.put_nowait, (self.tag, item))
        except RuntimeError:  # the handler's event loop has closed (shutdown): nobody is listening
            pass


@dataclass
class Add:
    """Take an admitted request; its outputs go to tracked."""

    request_id: str
    admission: Admission
    tracked: _Tracked


@dataclass
class Abort:
    """Stop a request and free its blocks (nothing if it has finished or was never taken)."""

    request_id: str


@dataclass
class Wake:
    """Nothing to do: wakes a loop waiting for commands (to see that it is stopping)."""


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # the loop thread's alone
        self._pending = 0  # submitted, not yet taken by the loop thread (or taken since its last snapshot)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._snapshot = engine.stats
        self.metrics = Metrics(self.snapshot)
        self._thread = threading.Thread(target=self._run, name="dsv2-engine", daemon=True)

    # -- the HTTP side --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(Wake())
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def snapshot(self) -> dict:
        s = dict(self._snapshot)
        with self._lock:
            s["waiting"] += self._pending
        return s

    def queued(self) -> int:
        """Requests that could not start now: those submitted or waiting in the engine, less the sequences the
        running batch still has room for (max_num_seqs). The caller holds the lock."""
        s = self._snapshot
        room = max(0, s["max_num_seqs"] - s["running"])
        return max(0, self._pending + s["waiting"] - room)

    def submit(self, request_id: str, admission: Admission, sink: asyncio.Queue, tag: object = None) -> None:
        """Queue a request the engine has admitted (Engine.admit); its outputs arrive on sink as
        (tag, RequestOutput), or (tag, exception) if it fails. 503 when max_queue requests already wait (those
        that can start at once do not count: see queued)."""
        tracked = _Tracked(sink, asyncio.get_running_loop(), tag, time.monotonic())
        with self._lock:  # the loop thread's last drain takes the lock too: nothing is put after it
            if not self.alive:
                raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
            if self.queued() >= self.max_queue:
                raise ApiError(503, f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                               headers={"Retry-After": "1"})
            self._pending += 1
            self._commands.put(Add(request_id, admission, tracked))

    def abort(self, request_id: str) -> None:
        self._commands.put(Abort(request_id))

    def submit_all(self, request_ids: list[str], admissions: list[Admission]) -> asyncio.Queue:
        """Queue the requests (all or none: a 503 aborts those already queued); the outputs of the i-th come on the
        queue tagged i."""
        sink: asyncio.Queue = asyncio.Queue()
        for i, (rid, adm) in enumerate(zip(request_ids, admissions, strict=True)):
            try:
                self.submit(rid, adm, sink, tag=i)
            except ApiError:
                for earlier in request_ids[:i]:
                    self.abort(earlier)
                raise
        return sink

    async def outputs(self, sink: asyncio.Queue, request_ids: list[str],
                      disconnected: Callable[[], Awaitable[bool]] | None = None
                      ) -> AsyncIterator[tuple[int, RequestOutput, list[CompletionOutput]]]:
        """(index, output, its completions that moved) of submit_all's requests until every one has finished (a
        completion's finish is reported once). With disconnected (a response not streamed), a client that goes
        away ends it; a stream is cancelled by Starlette instead. What has not finished is aborted on the way out."""
        left, done = set(range(len(request_ids))), set()
        check_at = time.monotonic() + 1.0
        try:
            while left:
                try:
                    i, item = await asyncio.wait_for(sink.get(), timeout=1.0)
                except TimeoutError:
                    i, item = None, None
                if disconnected is not None and time.monotonic() >= check_at:
                    check_at = time.monotonic() + 1.0
                    if await disconnected():
                        return
                if item is None:
                    if not self.alive:
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
                self.abort(request_ids[i])

    # -- the loop thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                taken = self._drain(block=not self.engine.has_unfinished())
                stats = self.engine.stats
                with self._lock:  # what was just taken counts as waiting at once, and no longer as pending
                    self._snapshot, self._pending = stats, self._pending - taken
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # an engine bug: fail what is running, keep serving
                        log.exception("engine step failed")
                        self._fail_all(ApiError(500, f"the engine failed: {type(e).__name__}: {e}"))
                        outputs = []
                    for out in outputs:
                        self._deliver(out)
                    self._snapshot = self.engine.stats
        finally:  # whatever ended the loop, every request still waiting gets an answer
            self._stop.set()
            with self._lock:
                self._fail_all(ApiError(503, "the server is shutting down", headers={"Retry-After": "5"}),
                               untaken=True)

    def _drain(self, block: bool) -> int:
        """Handle the commands queued; how many requests were taken (Add)."""
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return 0
        taken = 0
        while True:
            self._handle(cmd)
            taken += isinstance(cmd, Add)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return taken

    def _handle(self, cmd: Add | Abort | Wake) -> None:
        match cmd:
            case Add():
                self._add(cmd)
            case Abort():
                self._abort(cmd)
            case Wake():
                pass
            case _:
                raise TypeError(f"not an engine loop command: {cmd!r}")

    def _add(self, cmd: Add) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.admission)  # admitted already: not checked again
        except GenerationError as e:  # a request id already running
            cmd.tracked.put(ApiError(400, str(e)))
            return
        except Exception as e:  # an engine bug: this request fails, the loop goes on
            log.exception("add_request failed")
            cmd.tracked.put(ApiError(500, f"the engine failed: {type(e).__name__}: {e}"))
            return
        self._tracked[cmd.request_id] = cmd.tracked
        self.metrics.prompt_tokens.inc(len(cmd.admission.prompt_ids))

    def _abort(self, cmd: Abort) -> None:
        if self._tracked.pop(cmd.request_id, None) is not None:
            self.engine.abort(cmd.request_id)
            self.metrics.finished.labels("abort").inc()

    def _deliver(self, out: RequestOutput) -> None:
        t = self._tracked.get(out.request_id)
        if t is None:  # aborted while this step ran
            return
        now = time.monotonic()
        new = sum(len(c.new_token_ids) for c in out.outputs)
        if new:
            self.metrics.generation_tokens.inc(new)
            if t.first_token is None:
                t.first_token = now
                self.metrics.ttft.observe(now - t.arrival)
        if out.finished:
            del self._tracked[out.request_id]
            self.metrics.e2e.observe(now - t.arrival)
            most = max(len(c.token_ids) for c in out.outputs)
            if most > 1 and t.first_token is not None:
                self.metrics.tpot.observe((now - t.first_token) / (most - 1))
            for c in out.outputs:
                self.metrics.finished.labels(c.finish_reason or "stop").inc()
        t.put(out)

    def _fail_all(self, error: ApiError, untaken: bool = False) -> None:
        """Answer every request taken with error (and those still in the queue, with untaken: the caller holds
        the lock)."""
        for rid, t in list(self._tracked.items()):
            t.put(error)
            try:
                self.engine.abort(rid)
            except Exception:  # an engine in a bad state after a failed step: the request is answered anyway
                log.exception("abort after a failed step")
        self._tracked.clear()
        while untaken:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, Add):
                self._pending -= 1
                cmd.tracked.put(error)
