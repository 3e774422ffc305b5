"""Read timeouts under uvicorn, which has none for a request's headers or body (only keep-alive between requests):
its h11 protocol, subclassed, closes a connection whose client sends too slowly, so that a slow-header client
(slowloris) or a body shorter than its Content-Length cannot hold a connection open for as long as it likes.

    headers: a request's headers must be complete `header` seconds after its first byte (a new connection: after
             it opens), however they trickle in;
    body:    no more than `body_idle` seconds without a byte, and complete `body` seconds after the headers.

Either way the client gets a 408 (in OpenAI's error shape) and the connection is closed; a handler waiting for that
body sees the client go away. Between requests uvicorn's own keep-alive timeout (5 s) applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError


@dataclass(frozen=True)
class Timeouts:
    header: float = 10.0
    """Seconds for a request's headers: a client on any real link sends them in one round trip."""
    body_idle: float = 10.0
    """Seconds without a byte of a body."""
    body: float = 60.0
    """Seconds for a whole body (4 MiB at the size limit: 70 KB/s at least)."""


def _timeout_response(what: str) -> bytes:
    body = json.dumps(ApiError(408, f"the request's {what} did not arrive in time").body()).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the read timeouts of `timeouts` (a subclass per server: protocol(timeouts))."""

    timeouts = Timeouts()

    def connection_made(self, transport) -> None:
        self._header_timer = self._body_timer = self._idle_timer = None
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.timeouts.header, self._expired, "headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        self._cancel("_header_timer", "_body_timer", "_idle_timer")
        super().connection_lost(exc)

    def _watch(self) -> None:
        """The timers for the state the request is in, after what has just been read or sent."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self._cancel("_body_timer", "_idle_timer")
            if self.conn.trailing_data[0] and self._header_timer is None:  # a request's first bytes
                self._header_timer = self.loop.call_later(self.timeouts.header, self._expired, "headers")
            elif not self.conn.trailing_data[0] and self.cycle is not None:  # between requests: keep-alive's
                self._cancel("_header_timer")
        elif state is h11.SEND_BODY:
            self._cancel("_header_timer", "_idle_timer")
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.timeouts.body, self._expired, "body")
            self._idle_timer = self.loop.call_later(self.timeouts.body_idle, self._expired, "body")
        else:  # the request is in: nothing more to wait for
            self._cancel("_header_timer", "_body_timer", "_idle_timer")

    def _cancel(self, *names: str) -> None:
        for name in names:
            timer = getattr(self, name, None)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

    def _expired(self, what: str) -> None:
        self._cancel("_header_timer", "_body_timer", "_idle_timer")
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_timeout_response(what))
        self.transport.close()


def protocol(timeouts: Timeouts) -> type[TimedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with these timeouts."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"timeouts": timeouts})
