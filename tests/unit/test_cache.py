"""The cache's semantics, against a scripted provider and a hand-moved clock."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms_agent.cache import BREAKER_FAILURES, BREAKER_FIRST_WAIT, BREAKER_MAX_WAIT, Cache, Outcome
from kms_agent.config import CacheConfig
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    BadCredentials,
    HeldByLimiter,
    PendingDeletion,
    SecretNotFound,
    SourceFailing,
    Unavailable,
)
from kms_agent.upstream import ONE_ATTEMPT
from tests.conftest import PLANTED, FakeClock, ScriptedProvider

NO_JITTER = CacheConfig(jitter=0.0)


def key(name: str) -> tuple[str, str, None, None]:
    return ("scripted", name, None, None)


def make_cache(provider: ScriptedProvider, clock: FakeClock, **settings_: object) -> Cache:
    cfg = CacheConfig(**{"jitter": 0.0, **settings_})  # type: ignore[arg-type]
    return Cache(provider.fetch, cfg, clock=clock, rng=lambda: 0.5)


async def test_miss_then_hit_calls_upstream_once(provider, clock):
    """A second read within the TTL is a hit and does not call the provider."""
    provider.values["db"] = PLANTED + "-a"
    cache = make_cache(provider, clock)
    entry, outcome = await cache.get(key("db"))
    assert outcome is Outcome.MISS
    assert entry.record.text() == PLANTED + "-a"
    entry2, outcome2 = await cache.get(key("db"))
    assert outcome2 is Outcome.HIT
    assert entry2 is entry
    assert provider.calls["db"] == 1
    assert entry.key[1] is entry.record.name  # one name string per entry, not two


async def test_a_load_that_runs_after_the_fetch_landed_is_a_hit(provider, clock):
    """A caller that found nothing fresh and loads later (as the fast path's task does) gets
    the entry a concurrent fetch stored meanwhile, not a second upstream call."""
    provider.values["db"] = PLANTED
    cache = make_cache(provider, clock)
    assert cache.fresh(key("db")) is None  # this caller looks, and will load later
    first, _ = await cache.get(key("db"))  # another caller's fetch lands first
    entry, outcome = await cache.load(key("db"))
    assert (entry, outcome) == (first, Outcome.HIT)
    assert provider.calls["db"] == 1


async def test_expired_entry_is_fetched_again(provider, clock):
    """After the TTL the next read goes upstream and sees the new value."""
    provider.values["db"] = "one"
    cache = make_cache(provider, clock, ttl=10)
    await cache.get(key("db"))
    provider.values["db"] = "two"
    clock.advance(10.01)
    entry, outcome = await cache.get(key("db"))
    assert outcome is Outcome.MISS
    assert entry.record.text() == "two"


async def test_jitter_spreads_expiry_within_ten_percent(provider, clock):
    """TTL jitter stays within +/-10 % at the extremes of the random source."""
    provider.values["db"] = "v"
    for rnd, expected in ((0.0, 270.0), (1.0, 330.0)):

        def draw(r: float = rnd) -> float:
            return r

        cache = Cache(provider.fetch, CacheConfig(ttl=300, jitter=0.1), clock=clock, rng=draw)
        entry, _ = await cache.get(key("db"))
        assert entry.expires_at - entry.fetched_at == pytest.approx(expected)


async def test_ttl_zero_disables_caching(provider, clock):
    """With ttl = 0 every read calls the provider."""
    provider.values["db"] = "v"
    cache = make_cache(provider, clock, ttl=0)
    for _ in range(3):
        _, outcome = await cache.get(key("db"))
        assert outcome is Outcome.MISS
    assert provider.calls["db"] == 3
    assert len(cache) == 0


async def test_herd_of_1000_cold_requests_makes_one_call(provider, clock):
    """1,000 concurrent misses on one key share a single provider call."""
    provider.values["db"] = PLANTED
    provider.gate = asyncio.Event()
    cache = make_cache(provider, clock)
    tasks = [asyncio.create_task(cache.get(key("db"))) for _ in range(1000)]
    await provider.started.wait()
    provider.gate.set()
    results = await asyncio.gather(*tasks)
    assert provider.calls["db"] == 1
    outcomes = [outcome for _, outcome in results]
    assert outcomes.count(Outcome.MISS) == 1
    assert outcomes.count(Outcome.COALESCED) == 999
    assert {entry.record.text() for entry, _ in results} == {PLANTED}


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(provider, clock):
    """A caller that gives up does not abort the fetch the others wait on."""
    provider.values["db"] = "v"
    provider.gate = asyncio.Event()
    cache = make_cache(provider, clock)
    first = asyncio.create_task(cache.get(key("db")))
    second = asyncio.create_task(cache.get(key("db")))
    await provider.started.wait()
    first.cancel()
    provider.gate.set()
    entry, _ = await second
    assert entry.record.text() == "v"
    assert provider.calls["db"] == 1


async def test_not_found_is_cached_briefly(provider, clock):
    """A not-found answer is remembered for negative_ttl, then asked again."""
    cache = make_cache(provider, clock, negative_ttl=5)
    for _ in range(3):
        with pytest.raises(SecretNotFound):
            await cache.get(key("nope"))
    assert provider.calls["nope"] == 1
    clock.advance(5.01)
    provider.values["nope"] = "now here"
    entry, _ = await cache.get(key("nope"))
    assert entry.record.text() == "now here"


async def test_transient_failure_serves_stale_within_max_stale(provider, clock):
    """An upstream outage after expiry serves the last good value, marked stale."""
    provider.values["db"] = "good"
    cache = make_cache(provider, clock, ttl=10, max_stale=60)
    await cache.get(key("db"))
    provider.failures["db"] = Unavailable("upstream down")
    clock.advance(11)
    entry, outcome = await cache.get(key("db"))
    assert outcome is Outcome.STALE
    assert entry.record.text() == "good"
    calls = provider.calls["db"]
    # Right after a failure the cache backs off: the next read does not wait on upstream.
    _, outcome = await cache.get(key("db"))
    assert outcome is Outcome.STALE
    assert provider.calls["db"] == calls
    # Past max_stale the error reaches the caller.
    clock.advance(60)
    with pytest.raises(Unavailable):
        await cache.get(key("db"))


async def test_a_reloaded_max_stale_applies_to_entries_already_cached(provider, clock):
    """An entry's stale life ends at its expiry plus the max_stale in force now: an operator
    who shortens it on reload stops stale values at once, not one TTL later."""
    provider.values["db"] = "good"
    cache = make_cache(provider, clock, ttl=10, max_stale=3600)
    await cache.get(key("db"))
    provider.failures["db"] = Unavailable("upstream down")
    clock.advance(70)
    _, outcome = await cache.get(key("db"))
    assert outcome is Outcome.STALE
    cache.reconfigure(CacheConfig(jitter=0.0, ttl=10, max_stale=30))
    clock.advance(2)  # past the failure's back-off, 72 s after the fetch: 62 past expiry
    with pytest.raises(Unavailable):
        await cache.get(key("db"))
    cache.refresh_due()
    assert cache.peek(key("db")) is None  # and the sweep drops it


async def test_recovery_after_outage_replaces_stale_value(provider, clock):
    """Once the upstream answers again the fresh value replaces the stale one."""
    provider.values["db"] = "old"
    cache = make_cache(provider, clock, ttl=10, max_stale=600)
    await cache.get(key("db"))
    provider.failures["db"] = Unavailable("down")
    clock.advance(11)
    await cache.get(key("db"))
    del provider.failures["db"]
    provider.values["db"] = "new"
    clock.advance(31)  # past the longest retry back-off
    entry, outcome = await cache.get(key("db"))
    assert (entry.record.text(), outcome) == ("old", Outcome.STALE)  # at once, retry behind
    await asyncio.gather(*cache._inflight.values())
    entry, outcome = await cache.get(key("db"))
    assert (entry.record.text(), outcome) == ("new", Outcome.HIT)


@pytest.mark.parametrize(
    "error",
    [AccessDenied("revoked"), SecretNotFound("gone"), PendingDeletion("scheduled")],
    ids=["access-denied", "not-found", "pending-deletion"],
)
async def test_permanent_failure_drops_the_entry_at_once(provider, clock, error):
    """Revoked access, deletion or scheduled deletion drop a cached value immediately."""
    provider.values["db"] = "secret"
    cache = make_cache(provider, clock, ttl=10, max_stale=600)
    await cache.get(key("db"))
    provider.failures["db"] = error
    clock.advance(11)
    with pytest.raises(type(error)):
        await cache.get(key("db"))
    assert cache.peek(key("db")) is None


async def test_refresh_ahead_in_background_for_read_entries(provider, clock):
    """A read entry inside its refresh window is refetched while callers keep hitting."""
    provider.values["db"] = "one"
    cache = make_cache(provider, clock, ttl=100, refresh_window=0.2)
    await cache.get(key("db"))
    provider.values["db"] = "two"
    clock.advance(81)
    entry, outcome = await cache.get(key("db"))  # a hit; it starts the refresh
    assert outcome is Outcome.HIT
    assert entry.record.text() == "one"
    await asyncio.gather(*cache._inflight.values())
    entry, outcome = await cache.get(key("db"))
    assert outcome is Outcome.HIT
    assert entry.record.text() == "two"


async def test_maintenance_refreshes_entries_read_during_their_life(provider, clock):
    """refresh_due refreshes entries that were read, and leaves unread ones to expire."""
    provider.values.update({"read": "r1", "unread": "u1"})
    cache = make_cache(provider, clock, ttl=100, refresh_window=0.2)
    await cache.get(key("read"))
    await cache.get(key("unread"))
    clock.advance(10)
    await cache.get(key("read"))  # a hit marks it read
    clock.advance(75)
    assert cache.refresh_due() == 1
    await asyncio.gather(*cache._inflight.values())
    assert provider.calls == {"read": 2, "unread": 1}


async def test_forced_refresh_coalesces_within_the_interval(provider, clock):
    """A forced refresh within refresh_min_interval of the key's last upstream read is
    answered with that read (never an error); concurrent ones share one fetch; one after
    the interval goes upstream."""
    provider.values.update({"a": "1", "b": "1"})
    cache = make_cache(provider, clock, refresh_min_interval=2)
    await cache.get(key("a"))
    _, outcome = await cache.get(key("a"), force_refresh=True)
    assert outcome is Outcome.REFRESH_COALESCED
    assert provider.calls == {"a": 1}
    clock.advance(2)
    provider.gate = asyncio.Event()
    many = [asyncio.create_task(cache.get(key("a"), force_refresh=True)) for _ in range(5)]
    await provider.wait_calls(2)
    provider.gate.set()
    outcomes = {o for _, o in await asyncio.gather(*many)}
    assert outcomes == {Outcome.REFRESH_FORCED}
    assert provider.calls == {"a": 2}
    await cache.get(key("b"), force_refresh=True)  # another key has its own interval
    assert provider.calls == {"a": 2, "b": 1}


async def test_forced_refresh_failure_leaves_the_entry_as_it_was(provider, clock):
    """A forced refresh that fails transiently raises; the entry keeps serving hits with
    no back-off recorded, and a failed read is itself the answer within the interval."""
    provider.values["a"] = "1"
    cache = make_cache(provider, clock, refresh_min_interval=2)
    await cache.get(key("a"))
    clock.advance(3)
    provider.failures["a"] = Unavailable("down")
    with pytest.raises(Unavailable):
        await cache.get(key("a"), force_refresh=True)
    entry = cache.fresh(key("a"))
    assert entry is not None and entry.failures == 0 and entry.retry_at == 0
    with pytest.raises(Unavailable):
        await cache.get(key("a"), force_refresh=True)
    assert provider.calls == {"a": 2}


async def test_a_cached_not_found_does_not_grow_with_each_hit(provider, clock):
    """Each answer from the negative cache is its own exception: the cached one's traceback
    never grows (a flood for one missing name stays bounded)."""
    cache = make_cache(provider, clock, negative_ttl=5)
    raised = []
    for _ in range(50):
        with pytest.raises(SecretNotFound) as info:
            await cache.get(key("missing"))
        raised.append(info.value)
    assert provider.calls == {"missing": 1}
    assert len({id(e) for e in raised}) == 50
    depth = [len(list(__import__("traceback").walk_tb(e.__traceback__))) for e in raised]
    assert max(depth) == min(depth)


async def test_refresh_ahead_respects_the_retry_backoff(provider, clock):
    """An entry in its refresh window whose refresh just failed is not refreshed again on
    every hit: the back-off spaces the attempts."""
    provider.values["a"] = "1"
    cache = make_cache(provider, clock, ttl=100, refresh_window=0.5)
    await cache.get(key("a"))
    clock.advance(60)
    provider.failures["a"] = Unavailable("down")
    assert cache.fresh(key("a")) is not None  # starts the refresh, which fails
    await asyncio.gather(*cache._inflight.values())
    for _ in range(20):
        assert cache.fresh(key("a")) is not None
        await asyncio.sleep(0)
    assert provider.calls == {"a": 2}


async def test_entry_bound_evicts_least_recently_used(provider, clock):
    """Past max_entries the least recently read entry goes first."""
    evicted: list[str] = []
    provider.values.update({n: n for n in "abc"})
    cache = Cache(
        provider.fetch,
        CacheConfig(jitter=0, max_entries=2),
        clock=clock,
        on_evict=lambda reason, n: evicted.append(reason),
    )
    await cache.get(key("a"))
    await cache.get(key("b"))
    await cache.get(key("a"))  # b is now least recently used
    await cache.get(key("c"))
    assert cache.peek(key("b")) is None
    assert cache.peek(key("a")) is not None
    assert evicted == ["capacity"]


async def test_byte_bound_and_oversized_values(provider, clock):
    """The byte bound holds; a value larger than the bound is served but not cached."""
    provider.values.update({"small": "x" * 100, "huge": "y" * 5000})
    cache = make_cache(provider, clock, max_bytes=4096)
    entry, _ = await cache.get(key("huge"))
    assert entry.record.text() == "y" * 5000
    assert cache.peek(key("huge")) is None
    await cache.get(key("small"))
    assert 0 < cache.bytes <= 4096


async def test_invalidate_drops_named_entries_and_ignores_inflight_results(provider, clock):
    """invalidate() drops matching entries; a fetch racing with it is not stored."""
    provider.values.update({"a": "1", "b": "1"})
    cache = make_cache(provider, clock)
    await cache.get(key("a"))
    await cache.get(key("b"))
    assert cache.invalidate("scripted", lambda n: n == "a") == 1
    assert cache.peek(key("a")) is None
    assert cache.peek(key("b")) is not None
    provider.gate = asyncio.Event()
    provider.started.clear()
    pending = asyncio.create_task(cache.get(key("a")))
    await provider.started.wait()
    cache.invalidate("scripted")
    provider.gate.set()
    await pending
    assert cache.peek(key("a")) is None


async def test_provider_bug_becomes_an_upstream_error(provider, clock):
    """A provider raising a non-AgentError is reported as a 502, and the agent lives."""
    provider.failures["db"] = RuntimeError("boom")
    cache = make_cache(provider, clock)
    with pytest.raises(Exception) as info:
        await cache.get(key("db"))
    assert getattr(info.value, "status", None) == 502


# --------------------------------------------------------------------------- properties

_names = st.sampled_from(["a", "b", "c", "d", "e", "f"])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), _names),
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=40)),
        st.tuples(st.just("rotate"), _names),
        st.tuples(st.just("maintain"), st.just("")),
    ),
    max_size=60,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_ops, max_entries=st.integers(min_value=1, max_value=4))
async def test_property_never_serves_another_keys_value_and_respects_bounds(ops, max_entries):
    """Whatever the sequence of reads, rotations and time, a key never gets another key's
    value, no value older than the last rotation is served once its TTL passed, and the
    entry and byte bounds always hold."""
    clock = FakeClock()
    provider = ScriptedProvider()
    generation: dict[str, int] = {}
    rotated_at: dict[str, float] = {}
    for n in "abcdef":
        provider.values[n] = f"{n}:0"
        generation[n] = 0
    cache = Cache(
        provider.fetch,
        CacheConfig(ttl=30, jitter=0.1, max_entries=max_entries, max_bytes=3000),
        clock=clock,
    )
    for op, arg in ops:
        if op == "get":
            entry, _ = await cache.get(key(arg))
            name, gen = entry.record.text().split(":")
            assert name == arg
            if clock.now - rotated_at.get(arg, -1e9) > 33:
                assert int(gen) == generation[arg]
        elif op == "advance":
            clock.advance(arg)
        elif op == "rotate":
            generation[arg] += 1
            rotated_at[arg] = clock.now
            provider.values[arg] = f"{arg}:{generation[arg]}"
        else:
            cache.refresh_due()
            await asyncio.gather(*cache._inflight.values())
        assert len(cache) <= max_entries
        assert cache.bytes <= 3000
        assert cache.bytes == sum(e.size for e in cache.entries())


@settings(max_examples=40, deadline=None)
@given(
    waves=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=5),
    names=st.lists(_names, min_size=1, max_size=4, unique=True),
)
async def test_property_one_upstream_call_per_key_under_a_herd(waves, names):
    """However many concurrent callers arrive while a fetch is in flight, each key is
    fetched exactly once."""
    provider = ScriptedProvider()
    provider.values.update({n: n for n in names})
    provider.gate = asyncio.Event()
    cache = Cache(provider.fetch, CacheConfig(jitter=0), clock=FakeClock())
    tasks = []
    for size in waves:
        for i in range(size):
            tasks.append(asyncio.create_task(cache.get(key(names[i % len(names)]))))
        await asyncio.sleep(0)  # let this wave join the in-flight fetches
    provider.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(entry.record.text() == entry.key[1] for entry, _ in results)
    assert dict(provider.calls) == {n: 1 for n in names if any(t[0].key[1] == n for t in results)}


async def test_stale_is_served_at_once_while_the_retry_runs_in_the_background(provider, clock):
    """Once a refresh has failed, a read after the back-off gets the stale value at once;
    the retry runs behind it, and its success ends the outage for later reads."""
    provider.values["a"] = "1"
    cache = make_cache(provider, clock, ttl=10, max_stale=100)
    await cache.get(key("a"))
    clock.advance(11)
    provider.failures["a"] = Unavailable("down")
    _, outcome = await cache.get(key("a"))  # waits for this first failure
    assert outcome is Outcome.STALE
    clock.advance(60)  # past any back-off
    provider.gate = asyncio.Event()  # the upstream now hangs
    entry, outcome = await asyncio.wait_for(cache.get(key("a")), 1)
    assert (entry.record.value.reveal(), outcome) == (b"1", Outcome.STALE)
    await provider.wait_calls(3)  # the retry is under way, in the background
    del provider.failures["a"]
    provider.values["a"] = "2"
    provider.gate.set()
    await asyncio.gather(*cache._inflight.values())
    entry, outcome = await cache.get(key("a"))
    assert (entry.record.value.reveal(), outcome) == (b"2", Outcome.HIT)


@pytest.mark.parametrize(
    "error",
    [AccessDenied("revoked"), BadCredentials("refused"), SecretNotFound("gone")],
    ids=["access-denied", "bad-credentials", "not-found"],
)
async def test_permanent_refusals_are_remembered_briefly(provider, clock, error):
    """A flood of callers for a secret the source refuses for good (denied, bad
    credentials, not found) makes one upstream call per negative_ttl, not one each."""
    provider.failures["a"] = error
    cache = make_cache(provider, clock, negative_ttl=5)
    for _ in range(20):
        with pytest.raises(type(error)):
            await cache.get(key("a"))
    assert provider.calls == {"a": 1}
    clock.advance(6)
    with pytest.raises(type(error)):
        await cache.get(key("a"))
    assert provider.calls == {"a": 2}


async def _fail_cold(cache: Cache, names: list[str]) -> list[BaseException]:
    """Read each cold name once, in order; collect what each raised."""
    errors: list[BaseException] = []
    for name in names:
        with pytest.raises(AgentError) as info:
            await cache.get(key(name))
        errors.append(info.value)
    return errors


async def test_breaker_opens_after_repeated_failures_and_fails_cold_keys_fast(provider, clock):
    """After BREAKER_FAILURES transient failures in a row, cold keys of the source are
    answered SourceFailing at once (no upstream call), naming the last error and when to
    try again; one probe goes out when due, and its success closes the breaker."""
    names = [f"k{i}" for i in range(BREAKER_FAILURES + 10)]
    for name in names:
        provider.failures[name] = Unavailable("HTTP 500 from the store")
        provider.values[name] = name
    cache = make_cache(provider, clock)
    errors = await _fail_cold(cache, names)
    assert all(type(e) is Unavailable for e in errors[:BREAKER_FAILURES])
    assert all(isinstance(e, SourceFailing) for e in errors[BREAKER_FAILURES:])
    assert sum(provider.calls.values()) == BREAKER_FAILURES  # the rest were never sent
    refused = errors[-1]
    assert isinstance(refused, SourceFailing)
    assert refused.status == 503
    assert "HTTP 500 from the store" in refused.message
    assert refused.retry_after is not None and refused.retry_after >= 1
    clock.advance(BREAKER_FIRST_WAIT)  # the first probe is due (rng 0.5: 3/4 of the wait)
    provider.failures.clear()
    entry, outcome = await cache.get(key("k0"))  # this read is the probe
    assert (entry.record.text(), outcome) == ("k0", Outcome.MISS)
    entry, outcome = await cache.get(key("k1"))  # closed again: an ordinary miss
    assert outcome is Outcome.MISS


async def test_open_breaker_sends_one_probe_at_a_time_spaced_by_its_backoff(provider, clock):
    """While the source stays down, the open breaker lets one probe out per wait, the
    wait doubling up to BREAKER_MAX_WAIT: a flood of callers is a trickle upstream."""
    provider.failures.update({f"k{i}": Unavailable("down") for i in range(200)})
    cache = make_cache(provider, clock)
    await _fail_cold(cache, [f"k{i}" for i in range(BREAKER_FAILURES)])
    sent = []
    for step in range(120):  # 60 s of callers, 2 per 0.5 s
        for i in range(2):
            with pytest.raises(AgentError):
                await cache.get(key(f"k{(step * 2 + i) % 200}"))
        sent.append(sum(provider.calls.values()))
        clock.advance(0.5)
    probes = sent[-1] - BREAKER_FAILURES
    # waits 0.5, 1, 2, 4, 4, ... (x 3/4 with rng 0.5): about 60 / 3 probes in 60 s
    assert 10 <= probes <= 25
    last_10s = sent[-1] - sent[-21]
    assert last_10s <= 10 / (BREAKER_MAX_WAIT * 0.5) + 1


async def test_probe_success_ends_every_entrys_backoff_for_the_source(provider, clock):
    """Recovery follows the upstream: once a probe succeeds, entries that were backing
    off after a long outage refresh on their next read instead of at their own retry_at."""
    names = [f"k{i}" for i in range(20)]
    for name in names:
        provider.values[name] = name + "-old"
    cache = make_cache(provider, clock, ttl=10, max_stale=1000)
    for name in names:
        await cache.get(key(name))
    clock.advance(11)
    for name in names:
        provider.failures[name] = Unavailable("down")
    for _ in range(60):  # a long outage: read everything once a second
        for name in names:
            entry, outcome = await cache.get(key(name))
            assert outcome is Outcome.STALE
        await asyncio.gather(*cache._inflight.values())
        clock.advance(1)
    assert max(e.retry_at for e in cache.entries()) > clock.now + 1  # backed off
    for name in names:
        del provider.failures[name]
        provider.values[name] = name + "-new"
    clock.advance(BREAKER_MAX_WAIT)  # the next probe is due
    for _ in range(2):
        for name in names:
            await cache.get(key(name))
        await asyncio.gather(*cache._inflight.values())
    for name in names:
        entry, outcome = await cache.get(key(name))
        assert (entry.record.text(), outcome) == (name + "-new", Outcome.HIT)


async def test_limiter_holds_do_not_open_the_breaker(provider, clock):
    """A call our own limiter held back says nothing about the source's health."""
    provider.failures.update({f"k{i}": HeldByLimiter("held") for i in range(20)})
    cache = make_cache(provider, clock)
    errors = await _fail_cold(cache, [f"k{i}" for i in range(20)])
    assert all(type(e) is HeldByLimiter for e in errors)
    assert sum(provider.calls.values()) == 20


async def test_refresh_ahead_sends_nothing_while_the_breaker_is_open(provider, clock):
    """The maintenance tick's refresh-ahead obeys the breaker like callers do: with the
    source down, read entries in their refresh window are not each refreshed every tick."""
    names = [f"k{i}" for i in range(20)]
    for name in names:
        provider.values[name] = name
    cache = make_cache(provider, clock, ttl=10, max_stale=1000)
    for name in names:
        await cache.get(key(name))
    for name in names:
        provider.failures[name] = Unavailable("down")
    clock.advance(9)  # every entry is in its refresh window
    for name in names[:BREAKER_FAILURES]:
        await cache.get(key(name))  # read: starts its refresh-ahead, which fails
    await asyncio.gather(*cache._inflight.values())
    for name in names[BREAKER_FAILURES:]:
        await cache.get(key(name))  # read, but the breaker is open: no refresh yet
    before = sum(provider.calls.values())
    for _ in range(10):  # 10 ticks within BREAKER_FIRST_WAIT: the breaker is open
        clock.advance(BREAKER_FIRST_WAIT / 20)
        cache.refresh_due()
        await asyncio.gather(*cache._inflight.values())
    assert sum(provider.calls.values()) - before <= 1


async def test_a_probe_is_one_attempt(provider, clock):
    """The open breaker's probe asks once: the provider runs it with ONE_ATTEMPT set (no
    retries), while ordinary fetches may retry."""
    seen: list[bool] = []
    fetch = provider.fetch

    async def recording(k):
        seen.append(ONE_ATTEMPT.get())
        return await fetch(k)

    provider.failures.update({f"k{i}": Unavailable("down") for i in range(BREAKER_FAILURES + 1)})
    cache = Cache(recording, CacheConfig(jitter=0.0), clock=clock, rng=lambda: 0.5)
    await _fail_cold(cache, [f"k{i}" for i in range(BREAKER_FAILURES)])
    clock.advance(BREAKER_FIRST_WAIT)
    await _fail_cold(cache, [f"k{BREAKER_FAILURES}"])
    assert seen == [False] * BREAKER_FAILURES + [True]


async def test_refresh_ahead_waits_out_a_permanent_refusal(provider, clock):
    """A secret the source refuses for good (bad credentials keep the entry until it
    expires) is not refreshed again on every read of its refresh window: the negative
    cache spaces the refresh-ahead too."""
    provider.values["a"] = "1"
    cache = make_cache(provider, clock, ttl=10, negative_ttl=5)
    await cache.get(key("a"))
    provider.failures["a"] = BadCredentials("refused")
    clock.advance(8.5)  # in the refresh window
    for _ in range(20):
        _entry, outcome = await cache.get(key("a"))
        assert outcome is Outcome.HIT
        await asyncio.gather(*cache._inflight.values())
        clock.advance(0.05)
    assert provider.calls["a"] == 2  # the first read and one refresh
