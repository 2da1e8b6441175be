"""The secrets listeners' HTTP/1.1 protocol: one llhttp parser per connection.

Every byte a caller sends on a secrets listener is parsed here, once, by llhttp
(``httptools``), and every request is answered by the pipeline (:mod:`kms_agent.front`) in
the order it was sent. Nothing else on the connection reads HTTP. The shape is uvicorn's
httptools protocol, with the limits a secrets agent needs for callers that never send a
token:

* **Heads are bounded.** The request line and each header field are limited to
  ``server.max_header_bytes``, the fields to ``server.max_headers``, and the whole head to
  ``server.max_head_bytes``, counted on the raw bytes as they are fed (so llhttp's own
  buffers stay bounded too); a head not complete within ``server.head_timeout`` closes the
  connection.
* **No bodies.** The agent only reads: a request framed with a body (``Content-Length``
  other than 0, any ``Transfer-Encoding``) is answered and the connection closed without
  reading the body, so no byte of a body is ever taken for a request, and nothing of a
  trailer section is ever taken for a header. ``Upgrade`` and ``CONNECT`` likewise close
  after their answer.
* **Flow control.** Pipelined requests are answered in order, one at a time; at most
  :data:`PIPELINE_MAX` parsed requests wait, the rest of what was received stays unparsed
  and reading pauses; while the transport's buffer is over its high-water mark
  (``pause_writing``) nothing more is answered or read.
* **Connections are bounded.** At ``server.max_connections`` the oldest connection that
  never authenticated is closed to make room; with none, the new one is answered 503 and
  closed at once. Idle connections close after ``server.keepalive_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httptools

from kms_agent.errors import AgentError, BadRequest, TooManyConnections

if TYPE_CHECKING:
    from kms_agent.front import Front, _Memo

#: Parsed requests a connection holds before it stops parsing what it received.
PIPELINE_MAX = 32
#: Bytes fed to the parser at a time (the head budget is checked between slices).
SLICE = 4096
#: Headers the pipeline reads; others are counted and dropped. Token headers are added.
BASE_HEADERS = frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"forwarded",
        b"content-length",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits, from ``[server]``."""

    max_line: int = 8190
    max_field: int = 8190
    max_headers: int = 64
    max_head: int = 16384
    head_timeout: float = 10.0
    keepalive_timeout: float = 15.0


class Head:
    """One parsed request head: what the pipeline needs of it, nothing more."""

    __slots__ = ("close", "count", "error", "headers", "http11", "method", "target")

    def __init__(self) -> None:
        self.count = 0
        self.method = b""
        self.target = b""
        self.headers: dict[bytes, bytes] = {}
        self.http11 = True
        #: Close the connection after this request's answer.
        self.close = False
        #: A framing problem found by the protocol, answered instead of the request.
        self.error: AgentError | None = None


Answer = bytes | Awaitable[bytes]


class Connections:
    """Every open connection of the secrets listeners, and the limit on them."""

    def __init__(self, limit: Callable[[], int], on_close: Callable[[str], None]) -> None:
        self._limit = limit
        self._closed = on_close
        self.open: dict[Connection, None] = {}
        #: Connections that have not yet presented an accepted identity, oldest first.
        self.untrusted: dict[Connection, None] = {}
        self.closing = False

    def __len__(self) -> int:
        return len(self.open)

    def admit(self, conn: Connection) -> bool:
        """Register ``conn``; False if it must be refused (at the limit, nobody to evict)."""
        if self.closing:
            return False
        while len(self.open) >= self._limit():
            if not self.untrusted:
                self._closed("limit")
                return False
            victim = next(iter(self.untrusted))
            self.untrusted.pop(victim)
            self.open.pop(victim, None)
            self._closed("evicted")
            victim.abort()
        self.open[conn] = None
        self.untrusted[conn] = None
        return True

    def trust(self, conn: Connection) -> None:
        self.untrusted.pop(conn, None)

    def forget(self, conn: Connection) -> None:
        self.open.pop(conn, None)
        self.untrusted.pop(conn, None)

    def count_close(self, reason: str) -> None:
        self._closed(reason)

    def close_idle(self) -> None:
        """Shutdown: stop admitting; idle connections close now, busy ones after answering."""
        self.closing = True
        for conn in list(self.open):
            if conn.idle:
                conn.shut()

    async def wait_closed(self, timeout: float) -> None:
        """Until every connection has closed, or ``timeout``; then the rest are aborted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.open and loop.time() < deadline:
            tasks = [c.task for c in self.open if c.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=deadline - loop.time())
            else:
                await asyncio.sleep(0.01)
            for conn in list(self.open):
                if conn.idle:
                    conn.shut()
        for conn in list(self.open):
            conn.abort()


class Connection(asyncio.Protocol):
    """One caller's connection."""

    __slots__ = (
        "_begin_at",
        "_busy",
        "_fed",
        "_head",
        "_head_timer",
        "_idle_timer",
        "_in_head",
        "_parser",
        "_queue",
        "_read_paused",
        "_stop",
        "_unfed",
        "_write_paused",
        "connections",
        "front",
        "limits",
        "memo",
        "memo_key",
        "peer",
        "task",
        "transport",
    )

    def __init__(self, front: Front, connections: Connections, limits: Limits) -> None:
        self.front = front
        self.connections = connections
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._head = Head()
        self._queue: deque[Head] = deque()
        self._unfed = b""
        self._fed = 0
        self._begin_at = 0
        self._in_head = False
        self._busy = False
        self._stop = False
        self._read_paused = False
        self._write_paused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        #: The pipeline's per-connection memo of parsed targets, and what it was made under.
        self.memo: dict[bytes, _Memo] = {}
        self.memo_key: object = None
        self.task: asyncio.Task[None] | None = None
        self.peer: object = None

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast("asyncio.Transport", transport)
        if not self.connections.admit(self):
            # Refused at once: the socket is closed now, never held open.
            refusal = TooManyConnections(
                "the agent is at server.max_connections",
                hint="reuse keep-alive connections or raise server.max_connections",
            )
            transport.write(self.front.refusal(refusal))
            transport.close()
            self.transport = None
            return
        self.peer = transport.get_extra_info("peername")
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.forget(self)
        self.transport = None
        self._queue.clear()
        self._unfed = b""
        self._cancel_timers()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain()

    def data_received(self, data: bytes) -> None:
        if self._stop or self.transport is None:
            return  # after a request that closes the connection, nothing more is read
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._unfed = self._unfed + data if self._unfed else data
        self._feed()
        self._drain()

    def eof_received(self) -> bool | None:
        if self._in_head:
            self._cancel_timers()
        # Answer what was asked, then close (a half-closed caller still reads).
        self._stop = True
        if not self._queue and not self._busy and self.transport is not None:
            self.transport.close()
        return True

    # ------------------------------------------------------------------ parsing

    def _feed(self) -> None:
        """Feed what was received, a slice at a time, while few requests wait."""
        limits = self.limits
        while self._unfed and not self._stop and len(self._queue) < PIPELINE_MAX:
            chunk, self._unfed = self._unfed[:SLICE], self._unfed[SLICE:]
            start = self._fed
            self._fed += len(chunk)
            if not self._in_head:
                self._begin_at = start
            try:
                self._parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                self._stop = True  # CONNECT or Upgrade: its head is queued; nothing after it
            except httptools.HttpParserError as exc:
                self._refuse_framing(BadRequest(f"malformed request: {_reason(exc)}"))
                return
            if self._in_head and self._fed - self._begin_at > limits.max_head:
                self._refuse_framing(
                    BadRequest(
                        f"the request head is over {limits.max_head} bytes",
                        hint="server.max_head_bytes limits a request's line and headers",
                    )
                )
                return
        if self._unfed and not self._stop:
            self._pause_reading()  # resumed once the queue has drained

    def _refuse_framing(self, err: AgentError) -> None:
        head = self._head if self._in_head else Head()
        head.error = err
        head.close = True
        self._in_head = False
        self._queue.append(head)
        self._stop = True
        self._unfed = b""
        self._cancel_timers()

    def on_message_begin(self) -> None:
        if self._stop:
            return
        self._head = Head()
        self._in_head = True
        if self._head_timer is None and self.limits.head_timeout > 0:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self.limits.head_timeout, self._head_expired)

    def on_url(self, url: bytes) -> None:
        if self._stop:
            return
        head = self._head
        head.target += url
        if len(head.target) > self.limits.max_line:
            self._refuse_framing(
                BadRequest(f"the request target is over {self.limits.max_line} bytes")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._stop or not self._in_head:
            return  # a trailer section is never taken for headers
        head = self._head
        limits = self.limits
        if len(name) + len(value) + 2 > limits.max_field:
            self._refuse_framing(BadRequest(f"a header field is over {limits.max_field} bytes"))
            return
        head.count += 1
        key = name.lower()
        if key in self.front.interesting:
            if key in head.headers:
                self._refuse_framing(BadRequest(f"header {name.decode('latin-1')} is repeated"))
                return
            head.headers[key] = value
        if head.count > limits.max_headers:
            self._refuse_framing(BadRequest(f"more than {limits.max_headers} header fields"))

    def on_headers_complete(self) -> None:
        if self._stop:
            return
        parser = self._parser
        head = self._head
        headers = head.headers
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        head.method = parser.get_method()
        head.http11 = parser.get_http_version() == "1.1"
        length = headers.get(b"content-length")
        if (
            not parser.should_keep_alive()
            or b"transfer-encoding" in headers
            or (length is not None and length.strip() not in (b"0", b""))
            or b"upgrade" in headers
            or head.method == b"CONNECT"
        ):
            head.close = True
            self._stop = True  # no byte after this head is parsed: never a body, never a trailer
        if head.http11 and b"host" not in headers:
            head.error = BadRequest("HTTP/1.1 requests need a Host header")
            head.close = True
            self._stop = True
        self._queue.append(head)

    # ------------------------------------------------------------------ answering

    def _drain(self) -> None:
        """Answer queued requests in order while the transport takes them."""
        transport = self.transport
        while self._queue and not self._busy and not self._write_paused:
            if transport is None or transport.is_closing():
                self._queue.clear()
                return
            head = self._queue.popleft()
            try:
                answer = self.front.answer(head, self)
            except Exception:
                answer = self.front.crashed(head)
            if isinstance(answer, bytes):
                self._write(answer, head.close)
            else:
                self._busy = True
                self.task = asyncio.get_running_loop().create_task(self._later(answer, head))
                return
        if self._queue or self._busy or transport is None:
            return
        if self._unfed and not self._write_paused:
            self._feed()
            if self._queue:
                self._drain()
                return
        if not self._write_paused and self._read_paused and not self._unfed:
            self._read_paused = False
            transport.resume_reading()
        if self._stop:
            if not self._queue and not transport.is_closing():
                transport.close()
            return
        if not self._in_head:
            self._arm_idle()

    async def _later(self, answer: Awaitable[bytes], head: Head) -> None:
        try:
            data = await answer
        except Exception:
            data = self.front.crashed(head)
        self._busy = False
        self.task = None
        self._write(data, head.close)
        self._drain()

    def _write(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if close or self.connections.closing:
            self._stop = True
            self._queue.clear()
            self._unfed = b""
            transport.close()

    # ------------------------------------------------------------------ timers and closing

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def _arm_idle(self) -> None:
        timeout = self.limits.keepalive_timeout
        if timeout > 0 and self._idle_timer is None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.idle:
            self.connections.count_close("idle")
            self.shut()

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head:
            self.connections.count_close("head_timeout")
            self.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = None

    @property
    def idle(self) -> bool:
        """Between requests: nothing queued, nothing being answered, no head begun."""
        return not self._busy and not self._queue and not self._in_head

    def shut(self) -> None:
        transport = self.transport
        if transport is not None:
            self._stop = True
            transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            self._stop = True
            transport.abort()

    def trust(self) -> None:
        self.connections.trust(self)


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:120]
