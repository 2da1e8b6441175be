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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp

from kms_agent.errors import (
    AgentError,
    ConfigError,
    ConnectionDropped,
    HeldByLimiter,
    Unavailable,
    UpstreamTimeout,
)

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
