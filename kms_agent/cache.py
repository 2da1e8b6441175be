"""The secret cache.

* Key: ``(source, name, version_id, version_stage)``; ``None, None`` is "the current version".
* TTL with +/- jitter; 0 turns caching off (concurrent misses still share one fetch).
* Bounded by entries and by bytes, least recently used evicted first.
* Single flight: one upstream call per key at a time; concurrent misses await it.
* Refresh-ahead: an entry read during its life is refetched in the background once it
  enters the last ``refresh_window`` of its TTL, so hot secrets never wait on the upstream.
* Stale-if-error: a transient failure (timeout, 5xx, throttling, connection error) keeps the
  last good value for up to ``max_stale`` past expiry (the setting in force, reloads
  included), served marked stale, with retries backed off and run in the background (no
  caller waits on a failing source while a stale value is at hand); a permanent one (not
  found, denied, pending deletion) drops the entry at once.
* Permanent refusals (not found, denied, bad credentials) are cached for ``negative_ttl``.
* Forced refreshes coalesce: concurrent ones share one fetch, and one within
  ``refresh_min_interval`` of the key's last upstream read is answered with that read.
* A breaker per source: after ``BREAKER_FAILURES`` transient failures in a row from a
  source, no call is sent to it but one probe at a time (the first due after 0.5 s,
  doubling to ``BREAKER_MAX_WAIT``); meanwhile cold keys fail at once with
  :class:`SourceFailing` (the last error, ``Retry-After``) and cached ones are served
  stale. The probe's success closes the breaker and ends every entry's back-off for that
  source, so recovery follows the upstream's within one probe interval.

The fetch function and the clock are injected: the cache knows nothing of providers.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from kms_agent.config import CacheConfig
from kms_agent.errors import (
    AgentError,
    SourceFailing,
    UpstreamError,
)
from kms_agent.model import SecretRecord
from kms_agent.upstream import ONE_ATTEMPT

log = structlog.get_logger("kms_agent.cache")

Key = tuple[str, str, str | None, str | None]
Fetch = Callable[[Key], Awaitable[SecretRecord]]

#: Bytes an entry costs beyond its value: the record, the key, the rendered bodies' frames.
ENTRY_OVERHEAD = 768
#: An entry's value is held once raw and, at worst (values the shapes escape or encode), in
#: two rendered bodies besides; long plain values are referenced by them, not copied.
VALUE_COPIES = 3
#: Back-off after a failed refresh: 1 s doubling to this, jittered.
MAX_RETRY_BACKOFF = 30.0
#: Failed reads remembered for forced refreshes (swept each maintenance tick).
MAX_FAILED = 4096
#: Transient failures in a row from one source that open its breaker.
BREAKER_FAILURES = 5
#: The open breaker's first probe is this long after it opened, doubling per failed
#: probe up to the cap (jittered down to half, so agents of a fleet do not probe in step).
BREAKER_FIRST_WAIT = 0.5
BREAKER_MAX_WAIT = 4.0


class Outcome(enum.Enum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    COALESCED = "coalesced"
    REFRESH_FORCED = "refresh_forced"
    #: A forced refresh answered by a read at most ``refresh_min_interval`` old.
    REFRESH_COALESCED = "refresh_coalesced"


def entry_size(record: SecretRecord) -> int:
    """The bytes an entry of ``record`` counts against ``cache.max_bytes``."""
    return ENTRY_OVERHEAD + len(record.name) + VALUE_COPIES * len(record.value)


@dataclass(slots=True, eq=False)
class Entry:
    """One cached record. Kept small: a cache holds thousands (``bench/entry_memory.py``
    measures one), so what can be derived (its size, the end of its stale life) is."""

    key: Key
    record: SecretRecord
    fetched_at: float
    expires_at: float
    refresh_at: float
    read: bool = False
    failures: int = 0
    retry_at: float = 0.0
    #: Opaque to the cache: what the front door derives from the record and keeps with it
    #: (its rendered bodies), dropped with the entry.
    memo: object = None

    @property
    def size(self) -> int:
        return entry_size(self.record)

    def __repr__(self) -> str:
        return f"Entry({self.key!r}, version={self.record.version_id!r}, size={self.size})"


@dataclass(slots=True)
class _Negative:
    error: AgentError
    until: float


@dataclass(slots=True)
class _Health:
    """One source's breaker: transient failures in a row, and while open when the next
    probe is due and whether one is out."""

    failures: int = 0
    last: AgentError | None = None
    probe_at: float = 0.0
    probing: bool = False

    @property
    def open(self) -> bool:
        return self.failures >= BREAKER_FAILURES


class Cache:
    def __init__(
        self,
        fetch: Fetch,
        settings: CacheConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        on_evict: Callable[[str, int], None] | None = None,
        on_refresh: Callable[[str], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self.settings = settings
        self._clock = clock
        self._rng = rng
        self._on_evict = on_evict
        self._on_refresh = on_refresh
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._negatives: dict[Key, _Negative] = {}
        self._inflight: dict[Key, asyncio.Task[Entry | AgentError]] = {}
        #: Failed upstream reads by key, for forced refreshes within the interval.
        self._failed: dict[Key, tuple[float, AgentError]] = {}
        self._generation = 0
        self.bytes = 0
        #: Sources that failed lately, by name (a healthy source has no entry).
        self._health: dict[str, _Health] = {}

    # ------------------------------------------------------------------ reads

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        return self._clock()

    def peek(self, key: Key) -> Entry | None:
        return self._entries.get(key)

    def fresh(self, key: Key) -> Entry | None:
        """The hot path: the entry if it is within its TTL (a hit), else None. Synchronous,
        so a hit costs no coroutine; starts the background refresh when one is due."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            return None
        self._entries.move_to_end(key)
        entry.read = True
        if now >= entry.refresh_at and self._refresh_allowed(key, entry, now):
            self._start(key, background=True)
        return entry

    def _refresh_allowed(self, key: Key, entry: Entry, now: float) -> bool:
        """Whether a refresh-ahead of ``entry`` may go out now: not while one runs, its
        back-off lasts, the source refused it for good lately (the negative cache), or the
        source's breaker holds it."""
        if now < entry.retry_at or key in self._inflight:
            return False
        negative = self._negatives.get(key)
        if negative is not None and now < negative.until:
            return False
        return self._may_call(key[0], now)

    async def get(self, key: Key, *, force_refresh: bool = False) -> tuple[Entry, Outcome]:
        """The entry for ``key`` and how it was obtained; raises AgentError on failure."""
        return await self.load(key, force_refresh=force_refresh)

    async def load(self, key: Key, *, force_refresh: bool = False) -> tuple[Entry, Outcome]:
        """A fresh hit, else stale after a recent failure, the negative cache, or a (shared)
        fetch. Callers on the hot path try :meth:`fresh` first; the check is repeated here
        because a caller that found nothing may run later (a task), after a fetch landed."""
        if force_refresh:
            return await self._refresh(key)
        if (hit := self.fresh(key)) is not None:
            return hit, Outcome.HIT
        now = self._clock()
        entry = self._entries.get(key)
        usable = entry is not None and now < entry.expires_at + self.settings.max_stale
        if entry is not None and usable and (now < entry.retry_at or entry.failures):
            # The source is failing for this entry: serve stale without making the caller
            # wait; once the back-off is over, the retry runs in the background.
            if now >= entry.retry_at and key not in self._inflight and self._may_call(key[0], now):
                self._start(key, background=True)
            self._entries.move_to_end(key)
            return entry, Outcome.STALE
        if (negative := self._negatives.get(key)) is not None:
            if now < negative.until:
                raise copy.copy(negative.error)  # a fresh traceback each time, never a longer one
            del self._negatives[key]
        task = self._inflight.get(key)
        outcome = Outcome.MISS
        if task is None:
            if not self._may_call(key[0], now):
                if entry is not None and usable:
                    self._entries.move_to_end(key)
                    return entry, Outcome.STALE
                raise self._failing(key[0], now)
            task = self._start(key, background=False)
        else:
            outcome = Outcome.COALESCED
        result = await asyncio.shield(task)
        if isinstance(result, Entry):
            return result, outcome
        stale = self._entries.get(key)
        if (
            result.transient
            and stale is not None
            and self._clock() < stale.expires_at + self.settings.max_stale
        ):
            return stale, Outcome.STALE
        raise copy.copy(result)

    async def _refresh(self, key: Key) -> tuple[Entry, Outcome]:
        """A forced refresh: never a rate-limit error. One already running is joined; within
        ``refresh_min_interval`` of the last upstream read its result is the answer (it is at
        most that old). A failure is raised as it is, the cached entry kept as it was."""
        task = self._inflight.get(key)
        if task is None:
            now = self._clock()
            interval = self.settings.refresh_min_interval
            entry = self._entries.get(key)
            if entry is not None and now - entry.fetched_at < interval:
                self._entries.move_to_end(key)
                return entry, Outcome.REFRESH_COALESCED
            failed = self._failed.get(key)
            if failed is not None and now - failed[0] < interval:
                raise copy.copy(failed[1])
            if not self._may_call(key[0], now):
                raise self._failing(key[0], now)
            task = self._start(key, background=False, forced=True)
        result = await asyncio.shield(task)
        if isinstance(result, Entry):
            return result, Outcome.REFRESH_FORCED
        raise copy.copy(result)

    # ------------------------------------------------------------------ the breaker

    def _may_call(self, source: str, now: float) -> bool:
        """Whether a call may be sent to ``source`` now; with its breaker open, only the
        one probe when due (taking it counts as sending it)."""
        health = self._health.get(source)
        if health is None or not health.open:
            return True
        if health.probing or now < health.probe_at:
            return False
        health.probing = True
        return True

    def _failing(self, source: str, now: float) -> SourceFailing:
        health = self._health[source]
        last = health.last
        said = last.message if last is not None else "it failed"
        err = SourceFailing(
            f"source {source!r} is failing, so this call was not sent; its last error: {said}",
            hint="the agent probes it and resumes at once when it answers; "
            "cached secrets are served stale meanwhile",
            retry_after=max(1, round(health.probe_at - now + 0.5)),
        )
        if last is not None and last.upstream_status is not None:
            err.upstream(last.upstream_status, last.upstream_code or "", last.upstream_message)
        return err

    def _source_failed(self, source: str, exc: AgentError, now: float) -> None:
        health = self._health.get(source)
        if health is None:
            health = self._health[source] = _Health()
        health.failures += 1
        health.last = exc
        health.probing = False
        if health.open:
            wait = min(
                BREAKER_MAX_WAIT, BREAKER_FIRST_WAIT * 2.0 ** (health.failures - BREAKER_FAILURES)
            )
            health.probe_at = now + wait * (0.5 + self._rng() / 2)
            if health.failures == BREAKER_FAILURES:
                log.warning(
                    "source_failing", source=source, code=exc.code, failures=health.failures
                )

    def _source_answered(self, source: str) -> None:
        """``source`` answered (a value or a permanent refusal): it is healthy. If its
        breaker was open, every entry's back-off for it ends: they refresh on their next
        read instead of waiting out back-offs grown during the outage."""
        health = self._health.pop(source, None)
        if health is None or not health.open:
            return
        resumed = 0
        for key, entry in self._entries.items():
            if key[0] == source and entry.failures:
                entry.retry_at = 0.0
                resumed += 1
        log.info("source_recovered", source=source, failures=health.failures, entries=resumed)

    # ------------------------------------------------------------------ fetching

    def _start(
        self, key: Key, *, background: bool, forced: bool = False
    ) -> asyncio.Task[Entry | AgentError]:
        health = self._health.get(key[0])
        # With the breaker open, a fetch started is its probe (_may_call let it out): one
        # attempt, no retries. The task takes a copy of this context when created.
        probe = ONE_ATTEMPT.set(True) if health is not None and health.open else None
        try:
            task = asyncio.get_running_loop().create_task(self._run_fetch(key, background, forced))
        finally:
            if probe is not None:
                ONE_ATTEMPT.reset(probe)
        self._inflight[key] = task
        return task

    async def _run_fetch(
        self, key: Key, background: bool, forced: bool = False
    ) -> Entry | AgentError:
        """Fetch, store and return the entry, or return (never raise) the error."""
        generation = self._generation
        try:
            record = await self._fetch(key)
        except AgentError as exc:
            self._after_failure(key, exc, background, forced)
            return exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a provider bug must not take the agent down
            log.error("provider_failed", source=key[0], error_type=type(exc).__name__)
            err = UpstreamError(f"source {key[0]!r} failed unexpectedly ({type(exc).__name__})")
            self._after_failure(key, err, background, forced)
            return err
        finally:
            self._inflight.pop(key, None)
        self._source_answered(key[0])
        if background and self._on_refresh is not None:
            self._on_refresh("success")
        return self._store(key, record, cacheable=generation == self._generation)

    def _after_failure(
        self, key: Key, exc: AgentError, background: bool, forced: bool = False
    ) -> None:
        if background and self._on_refresh is not None:
            self._on_refresh("error")
        now = self._clock()
        if exc.transient and exc.from_source:
            self._source_failed(key[0], exc, now)
        elif not exc.transient:
            self._source_answered(key[0])
        elif (health := self._health.get(key[0])) is not None:
            health.probing = False  # not sent (our limiter): says nothing of the source
        if len(self._failed) >= MAX_FAILED:
            self._failed.clear()  # swept every second; a flood of failing names is bounded
        self._failed[key] = (now, exc)
        entry = self._entries.get(key)
        if exc.drops_cache and entry is not None:
            self._drop(key, "revoked")
        ttl = self.settings.negative_ttl
        if (
            isinstance(exc, UpstreamError)
            and not exc.transient
            and ttl > 0
            and self.settings.ttl > 0
        ):
            # Permanent refusals (not found, denied, bad credentials) are remembered
            # briefly, so a flood of callers is not a flood of upstream calls.
            if len(self._negatives) >= MAX_FAILED:
                self._negatives.clear()
            self._negatives[key] = _Negative(exc, now + ttl)
        elif entry is not None and exc.transient and not forced:
            entry.failures += 1
            backoff = min(MAX_RETRY_BACKOFF, 2.0 ** (entry.failures - 1))
            entry.retry_at = now + backoff * (0.5 + self._rng() / 2)
        if background:
            log.warning("refresh_failed", source=key[0], name=key[1], code=exc.code)

    def _store(self, key: Key, record: SecretRecord, *, cacheable: bool) -> Entry:
        now = self._clock()
        cfg = self.settings
        ttl = cfg.ttl * (1.0 + cfg.jitter * (2.0 * self._rng() - 1.0))
        size = entry_size(record)
        if record.name == key[1]:  # one name string for the key and the record, not two
            key = (key[0], record.name, key[2], key[3])
        entry = Entry(
            key=key,
            record=record,
            fetched_at=now,
            expires_at=now + ttl,
            refresh_at=now + ttl * (1.0 - cfg.refresh_window),
        )
        self._negatives.pop(key, None)
        self._failed.pop(key, None)
        if cfg.ttl <= 0 or not cacheable or size > cfg.max_bytes:
            return entry
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = entry
        self.bytes += size
        while len(self._entries) > cfg.max_entries:
            self._drop(next(iter(self._entries)), "capacity")
        while self.bytes > cfg.max_bytes:
            self._drop(next(iter(self._entries)), "bytes")
        return entry

    def _drop(self, key: Key, reason: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= entry.size
        if self._on_evict is not None:
            self._on_evict(reason, 1)

    # ------------------------------------------------------------------ maintenance

    def refresh_due(self) -> int:
        """Start background refreshes of read entries in their window; sweep dead ones.

        Called periodically by :meth:`run_maintenance` and directly by tests.
        Returns how many refreshes it started.
        """
        now = self._clock()
        max_stale = self.settings.max_stale
        started = 0
        dead: list[Key] = []
        for key, entry in self._entries.items():
            if now >= entry.expires_at + max_stale:
                dead.append(key)
            elif key in self._inflight:
                continue
            elif entry.read and now >= entry.refresh_at and self._refresh_allowed(key, entry, now):
                self._start(key, background=True)
                started += 1
        for key in dead:
            self._drop(key, "expired")
        for key in [k for k, n in self._negatives.items() if now >= n.until]:
            del self._negatives[key]
        interval = self.settings.refresh_min_interval
        for key in [k for k, (t, _) in self._failed.items() if now - t >= interval]:
            del self._failed[key]
        return started

    async def run_maintenance(self, interval: float = 1.0) -> None:
        """The background loop: refresh-ahead and sweeping, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.refresh_due()
            except Exception:
                log.exception("cache_maintenance_failed")

    def invalidate(self, source: str, names: Callable[[str], bool] | None = None) -> int:
        """Drop the entries of ``source`` whose name satisfies ``names`` (all if None).

        Fetches in flight when this is called will answer their waiters but not be stored.
        """
        self._generation += 1
        keys = [k for k in self._entries if k[0] == source and (names is None or names(k[1]))]
        for key in keys:
            self._drop(key, "invalidated")
        for key in [
            k for k in self._negatives if k[0] == source and (names is None or names(k[1]))
        ]:
            del self._negatives[key]
        return len(keys)

    def reconfigure(self, settings: CacheConfig) -> None:
        """New TTLs apply to the next fetch; new bounds apply at once."""
        self.settings = settings
        while len(self._entries) > settings.max_entries:
            self._drop(next(iter(self._entries)), "capacity")
        while self._entries and self.bytes > settings.max_bytes:
            self._drop(next(iter(self._entries)), "bytes")

    def entries(self) -> Iterable[Entry]:
        return self._entries.values()

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
