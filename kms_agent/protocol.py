"""The secrets listeners' HTTP/1.1 protocol: one llhttp parser per connection.

Every byte a caller sends on a secrets listener is parsed here, once, by llhttp
(``httptools``), and every request is answered by the pipeline (:mod:`kms_agent.front`) in
the order it was sent. Nothing else on the connection reads HTTP. The shape is uvicorn's
httptools protocol, with the limits a secrets agent needs for callers that never send a
token:

* **Heads are bounded.** The request line and each header field are limited to
  ``server.max_header_bytes``, the fields to ``server.max_headers``, and the whole head to
  ``server.max_head_bytes``, counted on what llhttp hands over (exact, even for a head
  that ends inside a fed slice) and on the raw bytes as they are fed (so llhttp's own
  buffers stay bounded too); a head not complete within ``server.head_timeout`` closes the
  connection.
* **No bodies.** The agent only reads: a request framed with a body (``Content-Length``
  other than 0, any ``Transfer-Encoding``) is answered and the connection closed without
  reading the body, so no byte of a body is ever taken for a request, and nothing of a
  trailer section is ever taken for a header. ``Upgrade`` and ``CONNECT`` likewise close
  after their answer. A close after an answer is a lingering one: our side is shut for
  writing and what the caller still sends is dropped (bounded), so that no reset destroys
  the answer before the caller reads it.
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
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httptools

from kms_agent import peers
from kms_agent.errors import AgentError, BadRequest, TooManyConnections

if TYPE_CHECKING:
    from kms_agent.front import Front, _Memo

#: Parsed requests a connection holds before it stops parsing what it received.
PIPELINE_MAX = 32
#: Bytes fed to the parser at a time (the raw head bound is checked between slices).
SLICE = 4096
#: After an answer that closes the connection, the caller's further bytes are read and
#: dropped for at most this long (and :data:`LINGER_BYTES`) with our side already shut for
#: writing: closing a socket with unread input sends a reset, which can destroy the answer
#: before the caller has read it (a pipelining caller would lose the 400 that explains
#: why). Bounded, so a caller that keeps sending gains nothing.
LINGER_SECONDS = 2.0
LINGER_BYTES = 65536
#: The request line's bytes besides its target: ``GET``, two spaces, ``HTTP/1.1``, CRLF.
_LINE_OVERHEAD = 15
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
        #: Set while no connection is open (shutdown waits on it).
        self.empty = asyncio.Event()
        self.empty.set()
        #: One timer for every connection's deadlines (head and keep-alive), not one per
        #: request: timers per request cost more than the rest of a cache hit.
        self._sweeper: asyncio.TimerHandle | None = None
        self._interval = 1.0

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
        self.empty.clear()
        if self._sweeper is None:
            limits = conn.limits
            shortest = min(t for t in (limits.head_timeout, limits.keepalive_timeout, 4.0) if t > 0)
            self._interval = min(1.0, max(0.02, shortest / 4))
            self._sweeper = asyncio.get_running_loop().call_later(self._interval, self._sweep)
        return True

    def _sweep(self) -> None:
        """Close connections past their head deadline or idle past the keep-alive timeout."""
        self._sweeper = None
        now = time.monotonic()
        for conn in list(self.open):
            conn.expire(now)
        if self.open:
            self._sweeper = asyncio.get_running_loop().call_later(self._interval, self._sweep)

    def trust(self, conn: Connection) -> None:
        self.untrusted.pop(conn, None)

    def forget(self, conn: Connection) -> None:
        self.open.pop(conn, None)
        self.untrusted.pop(conn, None)
        if not self.open:
            self.empty.set()
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None

    def count_close(self, reason: str) -> None:
        self._closed(reason)

    def close_idle(self) -> None:
        """Shutdown: stop admitting; idle connections close now, busy ones after answering."""
        self.closing = True
        for conn in list(self.open):
            if conn.idle:
                conn.shut()

    async def wait_closed(self, timeout: float) -> None:
        """Until every connection has closed, or ``timeout``; then the rest are aborted.
        A busy connection closes once it has answered (``closing`` is set)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.empty.wait(), timeout)
        for conn in list(self.open):
            conn.abort()


class Connection(asyncio.Protocol):
    """One caller's connection."""

    __slots__ = (
        "_begin_at",
        "_busy",
        "_eof",
        "_fed",
        "_head",
        "_head_at",
        "_head_bytes",
        "_in_head",
        "_linger_left",
        "_linger_until",
        "_parser",
        "_queue",
        "_read_paused",
        "_slice_at",
        "_stop",
        "_unfed",
        "_write_paused",
        "active_at",
        "connections",
        "front",
        "last",
        "limits",
        "memo",
        "memo_key",
        "peer",
        "peer_pid",
        "peer_principals",
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
        #: Where the slice being fed starts, and the slice a head began in (byte offsets).
        self._slice_at = 0
        self._begin_at = 0
        self._in_head = False
        self._busy = False
        self._eof = False
        self._stop = False
        self._read_paused = False
        self._write_paused = False
        self._head_at = 0.0
        #: The head's bytes as llhttp hands them over (line and fields, with their CRLFs
        #: and ": "): the budget is exact even when a head ends inside a fed slice.
        self._head_bytes = 0
        self._linger_until = 0.0
        self._linger_left = 0
        self.active_at = time.monotonic()
        #: The bytes of the last request that came alone in one read, and its head: the
        #: same bytes again parse to the same head, so llhttp is not run on them twice.
        self.last: tuple[bytes, Head] | None = None
        #: The pipeline's per-connection memo of parsed targets, and what it was made under.
        self.memo: dict[bytes, _Memo] = {}
        self.memo_key: object = None
        self.task: asyncio.Task[None] | None = None
        self.peer: object = None
        #: A Unix-socket peer's principals and pid, from the kernel (SO_PEERCRED); none
        #: over TCP.
        self.peer_principals: tuple[str, ...] = ()
        self.peer_pid: int | None = None

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
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            found = peers.credentials(sock)
            if found is not None:
                self.peer_pid, uid, gids = found
                self.peer_principals = peers.principals(uid, gids)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.forget(self)
        self.transport = None
        self._queue.clear()
        self._unfed = b""

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain()

    def data_received(self, data: bytes) -> None:
        if self._stop or self.transport is None:
            # After a request that closes the connection, nothing more is parsed; while
            # lingering, what arrives is dropped up to a bound.
            if self._linger_until:
                self._linger_left -= len(data)
                if self._linger_left < 0:
                    self._close_now()
            return
        last = self.last
        if (
            last is not None
            and last[0] == data
            and not self._unfed
            and not self._in_head
            and not self._queue
            and not self._busy
        ):
            # The very bytes of this connection's last lone request: the parser is between
            # messages either way, and would produce the same head.
            if self._write_paused:
                self._queue.append(last[1])
                return
            try:
                answer = self.front.answer(last[1], self)
            except Exception:
                answer = self.front.crashed(last[1])
            if isinstance(answer, bytes):
                self._write(answer, last[1].close)
            else:
                self._busy = True
                self.task = asyncio.get_running_loop().create_task(self._later(answer, last[1]))
            return
        if not self._unfed and not self._in_head and not self._queue:
            before = len(self._queue)
            self._unfed = data
            self._feed()
            if not self._in_head and not self._unfed and len(self._queue) == before + 1:
                head = self._queue[-1]
                if not head.close and head.error is None:
                    self.last = (data, head)
            self._drain()
            return
        self._unfed = self._unfed + data if self._unfed else data
        self._feed()
        self._drain()

    def eof_received(self) -> bool | None:
        # Answer what was asked, then close (a half-closed caller still reads).
        self._stop = True
        self._eof = True
        if self._linger_until:
            self._close_now()  # the caller has sent everything: nothing unread is left
        elif not self._queue and not self._busy and self.transport is not None:
            self.transport.close()
        return True

    # ------------------------------------------------------------------ parsing

    def _feed(self) -> None:
        """Feed what was received, a slice at a time, while few requests wait."""
        limits = self.limits
        while self._unfed and not self._stop and len(self._queue) < PIPELINE_MAX:
            if len(self._unfed) <= SLICE:
                chunk, self._unfed = self._unfed, b""
            else:
                chunk, self._unfed = self._unfed[:SLICE], self._unfed[SLICE:]
            self._slice_at = self._fed
            self._fed += len(chunk)
            try:
                self._parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                self._stop = True  # CONNECT or Upgrade: its head is queued; nothing after it
            except httptools.HttpParserError as exc:
                self._refuse_framing(BadRequest(f"malformed request: {_reason(exc)}"))
                return
            # The raw bound: the head began inside the slice fed from ``_begin_at``, so past
            # this it is over the budget whatever llhttp left out (whitespace); the exact
            # count is ``_head_bytes``.
            if self._in_head and self._fed - self._begin_at > limits.max_head + SLICE:
                self._refuse_head()
                return
        if self._unfed and not self._stop:
            self._pause_reading()  # resumed once the queue has drained

    def _refuse_head(self) -> None:
        self._refuse_framing(
            BadRequest(
                f"the request head is over {self.limits.max_head} bytes",
                hint="server.max_head_bytes limits a request's line and headers",
            )
        )

    def _refuse_framing(self, err: AgentError) -> None:
        head = self._head if self._in_head else Head()
        head.error = err
        head.close = True
        self._in_head = False
        self._queue.append(head)
        self._stop = True
        self._unfed = b""

    def on_message_begin(self) -> None:
        if self._stop:
            return
        self._head = Head()
        self._in_head = True
        self._head_at = time.monotonic()
        self._head_bytes = _LINE_OVERHEAD
        self._begin_at = self._slice_at

    def on_url(self, url: bytes) -> None:
        if self._stop:
            return
        head = self._head
        head.target += url
        self._head_bytes += len(url)
        if len(head.target) > self.limits.max_line:
            self._refuse_framing(
                BadRequest(f"the request target is over {self.limits.max_line} bytes")
            )
        elif self._head_bytes > self.limits.max_head:
            self._refuse_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._stop or not self._in_head:
            return  # a trailer section is never taken for headers
        head = self._head
        limits = self.limits
        if len(name) + len(value) + 2 > limits.max_field:
            self._refuse_framing(BadRequest(f"a header field is over {limits.max_field} bytes"))
            return
        head.count += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > limits.max_head:
            self._refuse_head()
            return
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
        if self._stop and not self._queue and not transport.is_closing():
            self._linger()

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
        self.active_at = time.monotonic()
        if close or self.connections.closing:
            self._stop = True
            self._queue.clear()
            self._unfed = b""
            self._linger()

    def _linger(self) -> None:
        """Close after the last answer without a reset: shut our side for writing (the
        answer is flushed first), drop what the caller still sends, close at its end of
        stream or after :data:`LINGER_SECONDS` / :data:`LINGER_BYTES`."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._linger_until:
            return
        if self._eof or self.connections.closing or not transport.can_write_eof():
            transport.close()
            return
        self._linger_until = time.monotonic() + LINGER_SECONDS
        self._linger_left = LINGER_BYTES
        transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _close_now(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    # ------------------------------------------------------------------ timers and closing

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def expire(self, now: float) -> None:
        """Close this connection if its head is late or it idled too long (the sweep)."""
        limits = self.limits
        if self._linger_until:
            if now > self._linger_until:
                self._close_now()
        elif self._in_head:
            if limits.head_timeout > 0 and now - self._head_at > limits.head_timeout:
                self.connections.count_close("head_timeout")
                self.abort()
        elif (
            self.idle
            and limits.keepalive_timeout > 0
            and now - self.active_at > limits.keepalive_timeout
        ):
            self.connections.count_close("idle")
            self.shut()

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
