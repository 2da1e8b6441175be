"""The cache-hit fast path: hot GETs answered from the cache before aiohttp sees them.

A node agent spends most of its life answering cache hits, and aiohttp's request machinery
costs more per hit than everything the agent itself does. So each connection starts on a
small protocol that parses with llhttp (``httptools``) and answers, from bytes prebuilt per
cache entry, exactly the requests whose answer is a fresh value from the cache:

* one complete ``GET`` in HTTP/1.1 with keep-alive, no body, no ``Expect``, no forwarding
  headers, no repeated header, within the header limits;
* a token that the :class:`~kms_agent.auth.Authenticator` accepts;
* ``/secrets/{name}``, ``/secretsmanager/get`` or ``/v1/{name}`` with plain parameters
  (no percent-escapes, each ``key=value`` once, values that pass the same checks);
* no forced refresh and no ``field=``.

A fresh hit is answered at once. A miss is loaded through the cache (single flight, as
always); if that gives a fresh value it is answered the same way, so an application's
connection stays on the fast path after its first read of a secret. Anything else — an
error or a stale value from that load, a forced refresh, a pipelined request, a parse
error, any doubt — hands the connection over to aiohttp's own protocol with every byte of
the unanswered request (and the load's outcome, so nothing is fetched twice), and aiohttp
serves that connection from then on. Every answer but a fresh value therefore comes from
the aiohttp application, unchanged, and a fast answer carries the same status, headers and
body the application would have sent (a test compares them). Metrics and access lines go
through the same :func:`~kms_agent.server.account`. It never parses HTTP by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from email.utils import formatdate
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from kms_agent import render
from kms_agent.cache import Entry, Key, Outcome
from kms_agent.errors import AgentError
from kms_agent.model import NAME_RE
from kms_agent.server import (
    STATE,
    VERSION_RE,
    AgentState,
    Loaded,
    account,
    count_hit,
    rendered,
)

_REFUSED_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"expect"})
_NATIVE = frozenset({b"version_id", b"version_stage", b"refresh", b"format"})  # no field=
_COMPAT = frozenset({b"secretId", b"versionId", b"versionStage", b"refreshNow"})
_V1 = frozenset({b"versionId", b"versionStage", b"refreshNow"})
_FALSE = frozenset({b"false", b"0", b"False", b"FALSE"})
_SERVER = SERVER_SOFTWARE.encode()
#: Distinct body lengths whose head is kept, per content type.
_HEADS_MAX = 1024


class _Heads(dict[int, bytes]):
    """A fresh value's status line and fixed headers up to ``X-Request-Id:``, by body length,
    for one content type: built at a length's first use and shared by every entry of that
    length, not kept per entry. The request id, date and body follow. These are the headers
    aiohttp writes for the handler's response (the order of differently named fields
    carries no meaning)."""

    __slots__ = ("prefix",)

    def __init__(self, content_type: bytes) -> None:
        super().__init__()
        self.prefix = b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Type: %s\r\n" % (
            content_type
        )

    def __missing__(self, size: int) -> bytes:
        if len(self) >= _HEADS_MAX:
            self.clear()
        head = self[size] = b"%sContent-Length: %d\r\nX-Request-Id: " % (self.prefix, size)
        return head


_HEADS_JSON = _Heads(render.JSON_TYPE.encode())
_HEADS_TEXT = _Heads(b"text/plain; charset=utf-8")
_HEADS_BINARY = _Heads(b"application/octet-stream")
#: Load outcomes the fast path answers itself: a fresh value (stale ones go to aiohttp).
_ANSWERED = frozenset({Outcome.HIT, Outcome.MISS, Outcome.COALESCED})
#: Distinct request byte strings a connection remembers (most callers repeat one or two).
_SEEN_MAX = 8
#: Handed-over loads kept before those of closed connections are swept.
_HANDED_SWEEP = 64
#: Bytes of one unanswered request kept before handing over to aiohttp regardless.
_MAX_PENDING = 16384


class FastServer(web.Server):
    """aiohttp's server with the fast path in front of each new connection.

    It counts fast connections beside aiohttp's, closes them on shutdown as aiohttp closes
    its idle ones, and closes those idle past ``keepalive_timeout`` as aiohttp would.
    """

    def __init__(self, *args: Any, state: AgentState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = state
        self.fast: dict[FastConnection, None] = {}
        #: Requests answered by the fast path (read by tests and the bench).
        self.served = 0
        self.keepalive_timeout = float(kwargs.get("keepalive_timeout", 75.0))
        self.max_line = int(kwargs.get("max_line_size", 8190))
        self.max_field = int(kwargs.get("max_field_size", 8190))
        self.max_headers = int(kwargs.get("max_headers", 32))
        self._date_at = 0
        self._tail = b""
        self._sweep: asyncio.TimerHandle | None = None
        #: Misses being loaded for fast connections; awaited at shutdown.
        self.loading: set[asyncio.Task[None]] = set()
        self.closing = False

    def __call__(self) -> Any:
        if not self.state.config.server.fast_path:
            return super().__call__()
        return FastConnection(self)

    def handler(self) -> asyncio.Protocol:
        """A fresh aiohttp protocol, for a connection the fast path hands over."""
        return super().__call__()

    def open_connections(self) -> int:
        return len(self.connections) + len(self.fast)

    def pre_shutdown(self) -> None:
        # Idle connections close now; one loading a miss closes once it has answered.
        self.closing = True
        for conn in list(self.fast):
            if conn.idle:
                conn.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        """In-flight fast loads finish first (within ``timeout``), then aiohttp's."""
        if self.loading:
            await asyncio.wait(list(self.loading), timeout=timeout)
        await super().shutdown(timeout)

    def load(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.loading.add(task)
        task.add_done_callback(self.loading.discard)

    # ------------------------------------------------------------------ connections

    def opened(self, conn: FastConnection) -> None:
        self.fast[conn] = None
        if self._sweep is None and self.keepalive_timeout > 0:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(self.keepalive_timeout / 2, self._close_idle)

    def _close_idle(self) -> None:
        deadline = time.monotonic() - self.keepalive_timeout
        for conn in [c for c in self.fast if c.idle and c.last_active < deadline]:
            conn.close()
        self._sweep = None
        if self.fast:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(self.keepalive_timeout / 2, self._close_idle)

    def tail(self) -> bytes:
        """``Date`` and ``Server`` and the blank line, rebuilt once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._tail = b"\r\nDate: %s\r\nServer: %s\r\n\r\n" % (
                formatdate(now, usegmt=True).encode(),
                _SERVER,
            )
        return self._tail

    # ------------------------------------------------------------------ the answer

    def admits(self, headers: dict[bytes, bytes]) -> bool:
        """Whether these headers let the fast path answer: a token it accepts, nothing that
        aiohttp must refuse or log."""
        state = self.state
        if not _REFUSED_HEADERS.isdisjoint(headers) or state.config.logging.log_hits:
            return False
        auth = state.auth
        presented = None
        for name in auth.header_keys:
            presented = headers.get(name)
            if presented is not None:
                break
        return presented is not None and auth.accepts(presented)

    def target(self, url: bytes) -> tuple[str, Key, str] | None:
        """``(route, cache key, shape)`` of a request target the fast path answers, else
        None. Depends on the URL and the config alone."""
        state = self.state
        if not url.startswith(b"/") or b"%" in url or b"+" in url or b"#" in url:
            return None
        path, _, query = url.partition(b"?")
        if b"//" in path or b"/." in path:
            return None  # aiohttp normalises such paths: let it
        params = _params(query)
        if params is None:
            return None
        get = params.get
        if path.startswith(b"/secrets/"):
            route, name = "/secrets/{name}", path[9:]
            fmt = get(b"format", b"json")
            if (
                not params.keys() <= _NATIVE
                or get(b"refresh", b"false") not in _FALSE
                or fmt not in (b"json", b"raw")
            ):
                return None
            key = self._key(name, get(b"version_id"), get(b"version_stage"))
            shape = "raw" if fmt == b"raw" else "native"
        else:
            if path.startswith(b"/v1/"):
                route, allowed, name = "/v1/{name}", _V1, path[4:]
            elif path == b"/secretsmanager/get":
                route, allowed, name = "/secretsmanager/get", _COMPAT, get(b"secretId", b"")
            else:
                return None
            if not params.keys() <= allowed or get(b"refreshNow", b"false") not in _FALSE:
                return None
            key = self._key(name, get(b"versionId"), get(b"versionStage"))
            shape = state.config.server.response_type
        if key is None:
            return None
        return route, key, shape

    def _key(
        self, name_bytes: bytes, version_id: bytes | None, version_stage: bytes | None
    ) -> Key | None:
        """The cache key for this name and version, after the handlers' checks."""
        if not name_bytes.isascii():
            return None
        name = name_bytes.decode()
        if NAME_RE.fullmatch(name) is None:
            return None
        selectors: list[str | None] = []
        for part in (version_id, version_stage):
            if part is None:
                selectors.append(None)
                continue
            text = part.decode("latin-1")
            if VERSION_RE.fullmatch(text) is None:
                return None
            selectors.append(text)
        try:
            provider = self.state.router.route(name)
        except AgentError:
            return None
        return (provider.name, name, selectors[0], selectors[1])

    def response(
        self, route: str, entry: Entry, shape: str, start: float, outcome: str = "hit"
    ) -> bytes:
        """The whole 200 response for ``entry`` in ``shape``, accounted like the handlers'."""
        state = self.state
        body = rendered(entry, shape)
        record = entry.record
        if shape != "raw":
            heads = _HEADS_JSON
        else:
            heads = _HEADS_TEXT if record.data_type == "text" else _HEADS_BINARY
        before, after = body.before, body.after
        value = record.value.reveal()
        head = heads[body.length(value)]
        request_id = state.next_request_id()
        if after is None:
            response = b"".join((head, request_id.encode(), self.tail(), before))
        else:
            response = b"".join((head, request_id.encode(), self.tail(), before, value, after))
        elapsed = time.perf_counter() - start
        if outcome == "hit":  # admits() left requests with logging.log_hits to aiohttp
            count_hit(state, route, 200, elapsed)
        else:
            ctx = {"source": entry.key[0], "cache": outcome}
            account(state, route, request_id, "GET", entry.key[1], 200, elapsed, ctx)
        self.served += 1
        return response


def _params(query: bytes) -> dict[bytes, bytes] | None:
    """``k=v&k=v`` with each key once and nothing unusual, else None (aiohttp decides)."""
    out: dict[bytes, bytes] = {}
    if not query:
        return out
    for part in query.split(b"&"):
        key, eq, value = part.partition(b"=")
        if not key or not eq or key in out:
            return None
        out[key] = value
    return out


class FastConnection(asyncio.Protocol):
    """One client connection, on the fast path until a request needs aiohttp."""

    __slots__ = (
        "_begun",
        "_done",
        "_extra",
        "_headers",
        "_loading",
        "_odd",
        "_parser",
        "_pending",
        "_seen",
        "_seen_config",
        "_seen_tokens",
        "_server",
        "_targets",
        "_transport",
        "_url",
        "last_active",
    )

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._pending = b""
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._begun = 0
        self._done = 0
        self._odd = False
        self._loading = False
        self._extra = b""
        self._seen: dict[bytes, tuple[str, Key, str]] = {}
        self._targets: dict[bytes, tuple[str, Key, str]] = {}  # by URL: the same, re-checked
        self._seen_config: object = None  # the config and token set both were filled under
        self._seen_tokens: object = None
        self.last_active = time.monotonic()

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)  # uvloop's is no subclass
        self._server.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.fast.pop(self, None)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._loading:  # reading is paused; a transport may still deliver what it had
            self._extra += data
            return
        start = time.perf_counter()
        server = self._server
        if not self._pending and (hot := self._seen.get(data)) is not None:
            # The very bytes of a request this connection sent and had answered here before,
            # under the same config and tokens: same route, key and shape, so neither parse
            # nor check again (the parser is between messages either way). Per connection:
            # a caller's bytes are only ever compared with its own.
            state = server.state
            if self._seen_config is state.config and self._seen_tokens is state.auth.token_set:
                self._answer(hot, data, start)
                return
        pending = self._pending + data if self._pending else data
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_over(pending)  # aiohttp answers malformed and upgrade requests
            return
        if self._done == 0 and not self._odd and len(pending) <= _MAX_PENDING:
            self._pending = pending  # the rest of the request is still to come
            return
        hot = None
        if self._done == 1 and self._begun == 1 and not self._odd:
            try:
                hot = self._route()
            except Exception:  # never answer a request wrongly: aiohttp answers it instead
                hot = None
        if hot is None:
            self._hand_over(pending)
            return
        if pending is data:  # one request in one segment: remember it
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[data] = hot
        self._answer(hot, pending, start)

    def _route(self) -> tuple[str, Key, str] | None:
        """The parsed request's route, key and shape, or None. The headers are checked each
        time; a target URL this connection sent before reuses its checks (requests that
        differ only in other headers, such as a trace id, are common)."""
        server = self._server
        state = server.state
        config, tokens = state.config, state.auth.token_set
        if self._seen_config is not config or self._seen_tokens is not tokens:
            self._seen.clear()  # what either remembers was checked under the old ones
            self._targets.clear()
            self._seen_config, self._seen_tokens = config, tokens
        if not server.admits(self._headers):
            return None
        url = self._url
        hot = self._targets.get(url)
        if hot is None:
            hot = server.target(url)
            if hot is None:
                return None
            if len(self._targets) >= _SEEN_MAX:
                self._targets.clear()
            self._targets[url] = hot
        return hot

    def _answer(self, hot: tuple[str, Key, str], pending: bytes, start: float) -> None:
        server = self._server
        route, key, shape = hot
        entry = server.state.cache.fresh(key)
        if entry is None:
            self._pending = pending
            self._loading = True
            transport = self._transport
            assert transport is not None
            transport.pause_reading()
            server.load(self._load(route, key, shape, start))
            return
        self._answered(server.response(route, entry, shape, start))

    def _answered(self, response: bytes) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(response)
        self._pending = b""
        self._url = b""
        self._headers.clear()  # in place: a repeated request never filled it
        self._begun = self._done = 0
        self.last_active = time.monotonic()
        if self._server.closing:
            transport.close()

    async def _load(self, route: str, key: Key, shape: str, start: float) -> None:
        """A miss: load through the cache; answer a fresh value, hand over anything else."""
        state = self._server.state
        result: Entry | AgentError | None
        try:
            result, outcome = await state.cache.load(key)
        except AgentError as exc:
            result, outcome = exc, Outcome.MISS
        except Exception:  # a bug: aiohttp's handler meets it again and answers 500
            result, outcome = None, Outcome.MISS
        self._loading = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the caller left; the cache keeps what was loaded
        transport.resume_reading()
        extra, self._extra = self._extra, b""
        if isinstance(result, Entry) and outcome in _ANSWERED:
            self._answered(self._server.response(route, result, shape, start, outcome.value))
            if extra and not transport.is_closing():
                self.data_received(extra)
            return
        if result is not None:
            handed = state.handed
            if len(handed) >= _HANDED_SWEEP:  # requests aiohttp refused before its lookup
                for gone in [t for t in handed if cast("asyncio.Transport", t).is_closing()]:
                    del handed[gone]
            handed[transport] = Loaded(key, result, outcome)
        self._hand_over(self._pending + extra)

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._server.max_line:
            self._odd = True

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        headers = self._headers
        if (
            key in headers
            or len(headers) >= self._server.max_headers
            or len(name) + len(value) + 2 > self._server.max_field
        ):
            self._odd = True
        headers[key] = value

    def on_headers_complete(self) -> None:
        parser = self._parser
        if (
            parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
        ):
            self._odd = True

    def on_body(self, body: bytes) -> None:
        self._odd = True

    def on_message_complete(self) -> None:
        self._done += 1

    # ------------------------------------------------------------------ hand-over

    def _hand_over(self, pending: bytes) -> None:
        """aiohttp serves this connection from here on, starting with ``pending``."""
        transport = self._transport
        server = self._server
        server.fast.pop(self, None)
        if transport is None or transport.is_closing():
            return
        self._transport = None
        handler = server.handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if pending:
            handler.data_received(pending)

    @property
    def idle(self) -> bool:
        return not self._loading

    def close(self) -> None:
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()


class AgentRunner(web.AppRunner):
    """An AppRunner whose server is a :class:`FastServer`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return FastServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=asyncio.get_running_loop(),
            state=self.app[STATE],
            **self._kwargs,
        )
