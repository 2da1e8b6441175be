"""Credentials for cloud sources, and keeping them fresh.

A source (static keys, an OIDC exchange, instance metadata) fetches :class:`Credentials`;
:class:`Refreshing` holds the current ones, refreshes them ``stale_before`` seconds before
they expire in the background (callers keep using the current ones meanwhile), and only
makes callers wait when the credentials are missing or about to expire. One refresh runs at
a time: concurrent callers share it. A failed fetch is not repeated for a while (1 s,
doubling to 15 s): callers get the same error meanwhile, or the current credentials while
they have not expired, so a refusing STS or metadata service sees a trickle, not a flood.

Every source reads its files with :func:`read_secret_file` and its expiry times with
:func:`parse_time`; the blocks the clouds compose their sources of are in
:mod:`kms_agent.credentials.blocks`.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from kms_agent.errors import AgentError, BadCredentials, ConfigError

log = structlog.get_logger("kms_agent.credentials")

#: Refresh this long before expiry (Alibaba's and AWS's SDKs use 15 minutes).
STALE_BEFORE = 15 * 60
#: Past this close to expiry, callers wait for the refresh instead of using the old ones.
MUST_REFRESH_BEFORE = 60
#: Background refreshes are at least this far apart (short-lived credentials would
#: otherwise sit in their refresh window and be refreshed on every call).
MIN_REFRESH_INTERVAL = 60
#: After a failed fetch, the next is this long later, doubling per failure up to the cap.
FAILED_RETRY_BASE = 1.0
FAILED_RETRY_MAX = 15.0


def credential_kind(
    table: Mapping[str, Any], keys: AbstractSet[str], kinds: tuple[str, ...], where: str
) -> str:
    """Check a ``credentials`` table's keys and return its ``type`` (default "auto")."""
    unknown = set(table) - keys
    if unknown:
        allowed = ", ".join(sorted(keys))
        raise ConfigError(f"{where}.{min(unknown)}: unknown setting; allowed: {allowed}")
    kind = table.get("type", "auto")
    if kind not in kinds:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(kinds)}")
    return str(kind)


def read_secret_file(path: str | Path, what: str = "file", *, hint: str | None = None) -> str:
    """The text of a credential or token file (UTF-8, surrounding whitespace stripped),
    read anew on each call: kubelet and operators rotate these files in place.

    A failure is :class:`BadCredentials` naming ``what`` and the path and why (the error's
    type, or that the file is not UTF-8 text), never the content: a UnicodeDecodeError's
    own message quotes a byte of it.
    """
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        why = type(exc).__name__
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    raise BadCredentials(f"{what} {path} cannot be read ({why})", hint=hint)


def parse_time(text: object, what: str = "credentials") -> float:
    """Epoch seconds of an ISO 8601 time with ``Z`` or a UTC offset, the way the clouds
    write expirations (Alibaba and AWS ``2024-05-01T12:00:00Z``, Huawei
    ``2024-05-01T12:00:00.000000Z``). A time without a zone is refused rather than taken as
    local time; the refusal does not quote the text."""
    try:
        when = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        raise BadCredentials(
            f"the expiration of the {what} is not an ISO 8601 time with Z or a UTC offset"
        )
    return when.timestamp()


class StaleCredentials(BadCredentials):
    """The store refused temporary credentials that looked valid (expired early, revoked):
    the provider invalidates them, and the call is retried once with fresh ones."""

    transient = True


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    expiration: float | None = None  # epoch seconds; None = does not expire
    origin: str = "static"

    def __repr__(self) -> str:
        return (
            f"Credentials(access_key_id={self.access_key_id!r}, origin={self.origin!r}, "
            f"expiration={self.expiration!r}, secret=<redacted>)"
        )


Fetch = Callable[[], Awaitable[Credentials]]


@runtime_checkable
class Holding(Protocol):
    """A fetch that holds credentials of its own (a role chain's base credentials, kept
    fresh by a Refreshing of theirs): closed with the Refreshing that holds the fetch."""

    async def close(self) -> None: ...


class Refreshing:
    """The current credentials of one source, refreshed ahead of expiry."""

    def __init__(
        self,
        fetch: Fetch,
        name: str,
        *,
        stale_before: float = STALE_BEFORE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self.name = name
        self._stale_before = stale_before
        self._clock = clock
        self._current: Credentials | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._refreshed_at = -1e18
        #: The last fetch's failure (None after a success), how many in a row, and when the
        #: next fetch may run.
        self._failure: AgentError | None = None
        self._failures = 0
        self._retry_at = -1e18

    @property
    def current(self) -> Credentials | None:
        """The credentials held now (possibly about to be refreshed), if any."""
        return self._current

    @property
    def expiration(self) -> float | None:
        return self._current.expiration if self._current is not None else None

    def _windows(self, expiration: float) -> tuple[float, float]:
        """(refresh in the background after, block callers after): short-lived credentials
        get windows in proportion to their lifetime, not the fixed 15 and 1 minutes."""
        lifetime = max(1.0, expiration - self._refreshed_at)
        stale = min(self._stale_before, lifetime / 3)
        must = min(MUST_REFRESH_BEFORE, lifetime / 10)
        return expiration - stale, expiration - must

    async def get(self) -> Credentials:
        current = self._current
        now = self._clock()
        if current is None:
            return await self._refresh(current)
        if current.expiration is None:
            return current
        stale_at, must_at = self._windows(current.expiration)
        if now >= must_at:
            return await self._refresh(current)
        if (
            now >= stale_at
            and (self._background is None or self._background.done())
            and now - self._refreshed_at >= min(MIN_REFRESH_INTERVAL, current.expiration - stale_at)
        ):
            self._background = asyncio.get_running_loop().create_task(self._refresh_quietly())
        return current

    def invalidate(self, seen: Credentials) -> None:
        """The store rejected ``seen`` (expired token, revoked key): fetch anew next time."""
        if self._current is seen:
            self._current = None

    async def _refresh(self, seen: Credentials | None) -> Credentials:
        async with self._lock:
            if self._current is not seen and self._current is not None:
                return self._current  # someone refreshed while we waited for the lock
            now = self._clock()
            if self._failure is not None and now < self._retry_at:
                if seen is not None and (seen.expiration is None or now < seen.expiration):
                    return seen  # still valid: use it until the next attempt is due
                raise copy.copy(self._failure)
            try:
                fresh = await self._fetch()
            except AgentError as exc:
                self._failed(exc)
                raise
            except Exception as exc:
                err = BadCredentials(
                    f"credentials for {self.name} could not be obtained ({type(exc).__name__})"
                )
                self._failed(err)
                raise err from exc
            self._failure, self._failures = None, 0
            self._current = fresh
            self._refreshed_at = self._clock()
            log.info(
                "credentials_refreshed",
                source=self.name,
                origin=fresh.origin,
                access_key_id=fresh.access_key_id,
                expires_in=None
                if fresh.expiration is None
                else round(fresh.expiration - self._clock()),
            )
            return fresh

    def _failed(self, exc: AgentError) -> None:
        self._failure = exc
        self._failures += 1
        delay = min(FAILED_RETRY_MAX, FAILED_RETRY_BASE * 2.0 ** (self._failures - 1))
        self._retry_at = self._clock() + delay

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh(self._current)
        except AgentError as exc:
            log.warning(
                "credentials_refresh_failed", source=self.name, code=exc.code, message=exc.message
            )

    async def close(self) -> None:
        """Stop refreshing (and whatever the fetch holds, like a chain's base). Idempotent."""
        if self._background is not None:
            self._background.cancel()
        fetch: object = self._fetch  # a plain function, or a Holding callable
        if isinstance(fetch, Holding):
            await fetch.close()
