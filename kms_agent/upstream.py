"""What every cloud provider shares: one session, a quota limiter, retries, error mapping.

Lower-layer (aiohttp, JSON) failures are mapped onto the error vocabulary in exactly one
place, :func:`mapped_errors`, the way httpx maps transport errors at its boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import yarl

from kms_agent.errors import (
    AgentError,
    ConfigError,
    ConnectionDropped,
    HeldByLimiter,
    Unavailable,
    UpstreamTimeout,
)
from kms_agent.signing import Request, Signer

if TYPE_CHECKING:
    from kms_agent.credentials import Credentials

_T = TypeVar("_T")

#: Set (by the cache) in a call that probes a failing source: one attempt, no retries —
#: a probe asks whether the source is back, and a failed first attempt answers that.
ONE_ATTEMPT: contextvars.ContextVar[bool] = contextvars.ContextVar("one_attempt", default=False)


@dataclass(slots=True)
class UpstreamStats:
    """Counters a provider keeps; the metrics collector reads them at scrape time."""

    throttled: int = 0
    rate_limited: int = 0
    #: Calls answered, by the endpoint (host) that answered them.
    answered_by: dict[str, int] = field(default_factory=dict)


#: Failing over: an endpoint that failed is skipped for 1 s, doubling to this.
ENDPOINT_MAX_BACKOFF = 30.0


@dataclass(slots=True, eq=False)
class Endpoint:
    url: str
    host: str
    failures: int = 0
    down_until: float = 0.0


class Endpoints:
    """A source's endpoints in order of preference. A call goes to the first that is not
    backing off; a connection error, a timeout or a 5xx puts it out for 1 s, doubling to
    :data:`ENDPOINT_MAX_BACKOFF`, so the retry inside the same deadline goes to the next;
    once its back-off is over it is tried again first, and an answer restores it."""

    def __init__(self, urls: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.all = [Endpoint(url, urlsplit(url).netloc) for url in urls]
        self._clock = clock

    @property
    def primary(self) -> Endpoint:
        return self.all[0]

    def pick(self) -> Endpoint:
        now = self._clock()
        for endpoint in self.all:
            if endpoint.down_until <= now:
                return endpoint
        return min(self.all, key=lambda e: e.down_until)  # all out: the soonest back

    def failed(self, endpoint: Endpoint) -> None:
        if len(self.all) > 1:
            endpoint.failures += 1
            wait = min(ENDPOINT_MAX_BACKOFF, 2.0 ** (endpoint.failures - 1))
            endpoint.down_until = self._clock() + wait

    def answered(self, endpoint: Endpoint) -> None:
        endpoint.failures, endpoint.down_until = 0, 0.0


#: The endpoint the current attempt goes to (set by the provider's limited call).
CURRENT_ENDPOINT: contextvars.ContextVar[Endpoint | None] = contextvars.ContextVar(
    "current_endpoint", default=None
)


class TokenBucket:
    """Keeps calls under ``rate`` per second with bursts up to ``burst``. Fair: callers are
    served in arrival order, each waiting only as long as the bucket needs to refill."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()
        self._next_free = 0.0  # when the last queued caller's token becomes available

    async def acquire(self, deadline: float | None = None) -> bool:
        """Take one token, waiting if needed. Returns whether the caller had to wait.

        Raises HeldByLimiter if the wait would end past ``deadline`` (a clock() value).
        """
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return False
        # Reserve the next token: debt makes later callers queue behind this one.
        self._tokens -= 1
        wait = -self._tokens / self.rate
        if deadline is not None and now + wait > deadline:
            self._tokens += 1
            raise HeldByLimiter(
                f"the source's rate limit would hold this call {wait:.2f} s, past its deadline",
                hint="raise rate_limit_qps (staying under the store's quota) or cache.ttl",
            )
        await asyncio.sleep(wait)
        return True


def backoff_delays(base: float, cap: float) -> Iterator[float]:
    """Full jitter: uniform in [0, min(cap, base * 2**n)]."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * 2**attempt))  # noqa: S311 (jitter, not crypto)
        attempt += 1


async def with_retries(
    call: Callable[[float], Awaitable[_T]],
    *,
    deadline: float,
    attempts: int,
    base: float = 0.1,
    cap: float = 2.0,
    retryable: Callable[[AgentError], bool] = lambda e: e.transient,
    clock: Callable[[], float] = time.monotonic,
) -> _T:
    """Run ``call(remaining_seconds)``; retry retryable errors with backoff, inside the
    deadline (no retries in a probe, see :data:`ONE_ATTEMPT`)."""
    if ONE_ATTEMPT.get():
        # A probe asks once; only a connection that closed before any answer (perhaps a
        # pooled one the server had closed while idle) is worth one more try.
        attempts = 2
        retryable = _dropped
    delays = backoff_delays(base, cap)
    for attempt in range(1, attempts + 1):
        remaining = deadline - clock()
        if remaining <= 0:
            raise UpstreamTimeout("the source did not answer within the deadline")
        try:
            return await call(remaining)
        except AgentError as exc:
            if attempt == attempts or not retryable(exc):
                raise
            delay = next(delays)
            if clock() + delay >= deadline:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _dropped(exc: AgentError) -> bool:
    return isinstance(exc, ConnectionDropped)


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Map transport and decoding failures onto the vocabulary; never leak a body."""
    try:
        yield
    except AgentError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(
            f"{what} did not answer in time", hint="is the endpoint reachable from this network?"
        ) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise ConnectionDropped(f"{what} closed the connection before answering") from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise Unavailable(
            f"{what} presented a TLS certificate the configured CA does not sign",
            hint="check ca_file: it must be the CA of this endpoint (a KMS instance's own CA "
            "for a dedicated gateway)",
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise Unavailable(
            f"cannot connect to {what} ({type(exc).__name__})",
            hint="check the endpoint, DNS and network path (VPC endpoints resolve only inside "
            "their VPC)",
        ) from exc
    except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise Unavailable(f"{what} answered with a broken response ({type(exc).__name__})") from exc


#: The largest answer read from an upstream: a secret is at most 64 KiB in every store
#: (Vault's KV default request limit is 32 MiB, but nothing sane keeps that in a secret);
#: a bigger answer is a broken or hostile upstream and is not read into memory.
MAX_ANSWER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """What an upstream answered: its status, headers and (bounded) body."""

    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    request: Request,
    *,
    what: str,
    timeout: float | None = None,
    signer: Signer | None = None,
    credentials: Credentials | None = None,
) -> Answer:
    """The one way a request goes upstream: addressed to ``base_url``'s host, signed by
    ``signer`` with ``credentials`` (when both are given), sent exactly as signed, and read
    within ``timeout`` (else the session's) and :data:`MAX_ANSWER_BYTES`; transport
    failures are mapped by :func:`mapped_errors` (``what`` names the upstream in them), and
    a redirect is Unavailable (never followed: the signed request, tokens included, would
    go to a host nobody configured, outside the limiter)."""
    request = request.to(urlsplit(base_url).netloc)
    if signer is not None and credentials is not None:
        headers = signer.sign(request, credentials, time.time())
    else:
        headers = dict(request.headers)
    url = yarl.URL(base_url + request.target, encoded=True)
    with mapped_errors(what):
        async with session.request(
            request.method,
            url,
            headers=headers,
            data=request.body or None,  # no body: no Content-Length or Content-Type either
            timeout=_within(session.timeout, timeout),
            allow_redirects=False,
        ) as resp:
            if 300 <= resp.status < 400:
                raise Unavailable(
                    f"{what} answered a redirect (HTTP {resp.status}), which the agent does "
                    "not follow",
                    hint="set the endpoint to the URL the store really answers at",
                )
            if (resp.content_length or 0) > MAX_ANSWER_BYTES:
                raise _too_big(what)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise _too_big(what)
    return Answer(resp.status, resp.headers, bytes(body))


async def send_to(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    what: str,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """:func:`send` of an unsigned request to a whole ``url`` (a metadata service's)."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = Request(method, path, headers=dict(headers or {}))
    return await send(session, f"{parts.scheme}://{parts.netloc}", request, what=what)


def _within(session: aiohttp.ClientTimeout, total: float | None) -> aiohttp.ClientTimeout:
    """The session's timeouts (its short connect timeout: a blackholed endpoint fails fast
    and the retry goes to the next) with the call's remaining deadline as the total."""
    if total is None:
        return session
    return aiohttp.ClientTimeout(
        total=total,
        connect=session.connect,
        sock_connect=session.sock_connect,
        sock_read=session.sock_read,
    )


def _too_big(what: str) -> Unavailable:
    return Unavailable(f"{what} answered more than {MAX_ANSWER_BYTES // 1024 // 1024} MiB")


def json_object(body: bytes, what: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """A JSON object answer; anything else is the upstream's failure (Unavailable)."""
    if empty_ok and not body.strip():
        return {}
    parsed = _json(body)
    if parsed is None:
        raise Unavailable(f"{what} answered with a body that is not a JSON object")
    return parsed


def object_or_none(body: bytes) -> dict[str, Any] | None:
    """The JSON object in ``body``, or None: a refusal may be a proxy's HTML page, empty,
    or not JSON at all (then it is not the store's own), a metadata answer anything."""
    return _json(body)


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


#: The last second a rendered time can show (9999-12-31T23:59:59Z).
LATEST_TIME = 253402300799.0


def answer_time(value: Any) -> float:
    """A time in an answer, as epoch seconds: ISO 8601 text (Alibaba, Vault; any offset),
    or epoch seconds or milliseconds (Huawei); 0.0 when absent or unreadable (a creation
    time is shown, never acted on)."""
    if value is None or value == "" or isinstance(value, bool):
        return 0.0
    try:
        if isinstance(value, int | float):
            seconds = value / 1000 if value > 1e11 else float(value)
        else:
            seconds = datetime.fromisoformat(str(value)).timestamp()
    except (ValueError, ArithmeticError):
        return 0.0
    return seconds if 0 <= seconds <= LATEST_TIME else 0.0  # nan and inf fail too


def check_endpoint(url: str, key: str) -> str:
    """An https URL, or http only to a loopback host (for tests and local emulators)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: {url!r} is not an http(s) URL")
    if parts.scheme == "http":
        host = parts.hostname
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if not loopback:
            raise ConfigError(f"{key}: plain http is allowed only to a loopback host; use https")
    return url.rstrip("/")


def new_session(
    *, connect_timeout: float, total_timeout: float, ca_file: str | None = None, limit: int = 64
) -> aiohttp.ClientSession:
    """One keep-alive session per source, TLS verified (against ``ca_file`` if given)."""
    context = ssl.create_default_context(cafile=ca_file)
    connector = aiohttp.TCPConnector(limit=limit, ssl=context, keepalive_timeout=30)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=total_timeout, sock_connect=connect_timeout),
        raise_for_status=False,
        trust_env=False,
    )
    # aiohttp re-sends an idempotent request (GET: Huawei, Vault) by itself after a reset,
    # outside the limiter and the retry policy, doubling the load on a failing upstream.
    # Every attempt on the wire must be one of ours; aiohttp's own test client turns it
    # off the same way (there is no public switch).
    session._retry_connection = False  # noqa: SLF001
    return session
