"""The quota limiter (:class:`TokenBucket`) and the retry policy (:func:`with_retries`),
on virtual time: a fake clock, and the module's sleeps replaced by timers that end when
the test moves that clock (each sleeper at its own moment, in order). One short check
runs on the real clock through a provider.

The deterministic QPS test here takes over the job of the wall-clock
``test_2000_rps_over_100_secrets_stays_under_the_configured_qps`` in
tests/integration/test_alibaba.py (that the limiter holds a source under its QPS).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import time
import types
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from kms_agent import upstream
from kms_agent.config import Config, source_config
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    ConfigError,
    HeldByLimiter,
    SecretNotFound,
    Throttled,
    Unavailable,
    UpstreamTimeout,
)
from kms_agent.providers.options import VaultOptions
from kms_agent.providers.vault import Provider as VaultProvider
from kms_agent.upstream import (
    ONE_ATTEMPT,
    TokenBucket,
    backoff_delays,
    check_endpoint,
    mapped_errors,
    with_retries,
)
from tests.conftest import FakeClock

#: Event-loop turns that let every task woken by a timer run to its next await.
_SETTLE_TURNS = 8


class VirtualTime:
    """Sleeps on a :class:`FakeClock`: ``sleep(d)`` ends when the test has moved the clock
    to the sleeper's wake-up time (``advance_to``), sleepers in wake-up order."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.slept: list[float] = []
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.clock.now + delay, next(self._order), woken))
        await woken

    async def settle(self) -> None:
        for _ in range(_SETTLE_TURNS):
            await asyncio.sleep(0)

    async def advance_to(self, moment: float) -> None:
        """Move the clock to ``moment``, waking each sleeper due by then at its own time."""
        await self.settle()
        while self._timers and self._timers[0][0] <= moment:
            due, _, woken = heapq.heappop(self._timers)
            self.clock.now = max(self.clock.now, due)
            woken.set_result(None)
            await self.settle()
        self.clock.now = max(self.clock.now, moment)
        await self.settle()

    async def run(self, awaitable: Awaitable[object]) -> object:
        """Await ``awaitable`` as a task, moving time forward whenever it sleeps."""
        task = asyncio.ensure_future(awaitable)
        await self.settle()
        while not task.done():
            assert self._timers, "the task is blocked on something other than a sleep"
            await self.advance_to(self._timers[0][0])
        return task.result()


@pytest.fixture(name="vtime")
def _vtime(monkeypatch: pytest.MonkeyPatch) -> VirtualTime:
    """Virtual time for kms_agent.upstream: its ``asyncio.sleep`` ends on the fake clock."""
    vtime = VirtualTime(FakeClock())
    monkeypatch.setattr(upstream, "asyncio", types.SimpleNamespace(sleep=vtime.sleep))
    return vtime


def max_in_window(times: list[float], width: float) -> int:
    """The most of ``times`` inside any half-open window ``[t, t + width)``."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


# --------------------------------------------------------------------------- TokenBucket


async def test_a_full_bucket_lets_a_burst_through_then_paces_at_the_rate(vtime):
    """A rested bucket grants ``burst`` calls at once; every call after that waits exactly
    one token's worth (1/rate) more than the one before it."""
    clock = vtime.clock
    bucket = TokenBucket(10, burst=3, clock=clock)
    granted: list[float] = []
    waited: list[bool] = []

    async def caller() -> None:
        waited.append(await bucket.acquire())
        granted.append(clock.now)

    start = clock.now
    tasks = [asyncio.create_task(caller()) for _ in range(8)]
    await vtime.advance_to(start + 10)
    await asyncio.gather(*tasks)
    assert waited == [False] * 3 + [True] * 5
    assert granted == pytest.approx([start] * 3 + [start + k / 10 for k in range(1, 6)])


async def test_the_bucket_refills_at_the_rate_up_to_the_burst(vtime):
    """Idle time refills one token per 1/rate seconds, never more than ``burst``: after a
    long rest only ``burst`` calls pass without waiting."""
    clock = vtime.clock
    bucket = TokenBucket(4, burst=2, clock=clock)
    assert [await bucket.acquire(), await bucket.acquire()] == [False, False]
    clock.advance(0.25)  # one token back
    assert await bucket.acquire() is False
    with pytest.raises(HeldByLimiter):  # none left: a call with no time to wait is refused
        await bucket.acquire(deadline=clock.now)
    clock.advance(3600)  # a long rest still holds only the burst
    passed = 0
    while not await vtime.run(bucket.acquire()):
        passed += 1
    assert passed == 2
    assert vtime.slept == [pytest.approx(0.25)]


def test_the_default_burst_is_a_tenth_of_the_rate_and_at_least_one():
    """Without an explicit burst, a bucket allows rate/10 at once (at least one call)."""
    clock = FakeClock()
    assert TokenBucket(450, clock=clock).burst == 45
    assert TokenBucket(5, clock=clock).burst == 1


async def test_waiting_callers_are_served_in_arrival_order(vtime):
    """Fair: callers that had to wait are granted in the order they arrived, each one
    token interval after the one before, however their arrivals were spread."""
    clock = vtime.clock
    bucket = TokenBucket(5, burst=1, clock=clock)
    order: list[tuple[int, float]] = []

    async def caller(i: int) -> None:
        await bucket.acquire()
        order.append((i, clock.now))

    start = clock.now
    tasks = []
    for i in range(6):  # arrivals 0.03 s apart, far faster than 5 a second
        tasks.append(asyncio.create_task(caller(i)))
        await vtime.advance_to(start + 0.03 * (i + 1))
    await vtime.advance_to(start + 5)
    await asyncio.gather(*tasks)
    assert [i for i, _ in order] == list(range(6))
    assert [t for _, t in order] == pytest.approx([start + k * 0.2 for k in range(6)])


async def test_a_wait_past_the_deadline_is_refused_at_once_and_costs_no_token(vtime):
    """When the wait would end after the caller's deadline, acquire raises HeldByLimiter
    without sleeping (the caller is answered now, not at its deadline), and the refused
    call takes no token: the next caller waits no longer than if it had not come."""
    clock = vtime.clock
    bucket = TokenBucket(2, burst=1, clock=clock)
    assert await bucket.acquire() is False
    with pytest.raises(HeldByLimiter) as held:
        await bucket.acquire(deadline=clock.now + 0.4)  # needs 0.5 s
    assert vtime.slept == []
    assert isinstance(held.value, UpstreamTimeout)
    assert held.value.status == 504
    assert not held.value.from_source  # the source said nothing: the breaker ignores it
    assert "0.50 s" in held.value.message
    assert "rate_limit_qps" in (held.value.hint or "")
    start = clock.now
    assert await vtime.run(bucket.acquire(deadline=clock.now + 0.5)) is True  # exactly fits
    assert clock.now == pytest.approx(start + 0.5)


async def test_the_limiter_holds_a_source_under_its_qps_whatever_the_offered_load(vtime):
    """2,000 calls a second for 3 s at a 50/s, burst-5 bucket (each with a 5 s deadline):
    in no window of w seconds do more than 50·w + 5 calls pass, and the bucket is not
    idle meanwhile (it passes at its rate); the rest are refused by their deadline, at
    once. Deterministic: the job of the 9.7 s wall-clock test in test_alibaba.py."""
    clock = vtime.clock
    bucket = TokenBucket(50, burst=5, clock=clock)
    sent: list[float] = []
    refused: list[float] = []

    async def caller(deadline: float) -> None:
        asked = clock.now
        try:
            await bucket.acquire(deadline)
        except HeldByLimiter:
            refused.append(clock.now - asked)
            return
        sent.append(clock.now)

    start = clock.now
    tasks: list[asyncio.Task[None]] = []
    for tick in range(60):  # 20 ticks a second, 100 callers a tick
        tasks += [asyncio.create_task(caller(clock.now + 5)) for _ in range(100)]
        await vtime.advance_to(start + (tick + 1) / 20)
    await vtime.advance_to(start + 10)
    await asyncio.gather(*tasks)
    assert len(sent) + len(refused) == 6000
    for width in (0.5, 1.0, 2.0, 5.0):
        assert max_in_window(sent, width) <= 50 * width + 5
    assert max_in_window(sent, 2.0) >= 2 * 50  # the limit held it back, not idleness
    assert set(refused) == {0}
    # Busy at the rate until the last deadline (arrival 2.95 s + 5 s): the burst, then
    # one call each 1/50 s up to 7.95 s.
    assert len(sent) == 5 + int(7.95 * 50)
    assert max(sent) - start == pytest.approx(7.94)


async def test_the_limiter_paces_a_provider_in_real_time(aiohttp_server):
    """On the real clock, through a provider: 22 concurrent reads with rate_limit_qps=20
    (burst 2) reach the upstream no faster than the rate allows (the last one at least
    1 s after the first was asked for), and the held ones are counted."""
    arrivals: list[float] = []

    async def kv(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        meta = {"version": 1, "created_time": "2024-01-01T00:00:00Z"}
        return web.json_response({"data": {"data": {"k": "v"}, "metadata": meta}})

    app = web.Application()
    app.router.add_get("/v1/secret/data/{name}", kv)
    server = await aiohttp_server(app, host="127.0.0.1")
    source = source_config(
        "v",
        "vault",
        {
            "address": str(server.make_url("")).rstrip("/"),
            "token": "t" * 16,
            "rate_limit_qps": 20,
            "verify_answers": False,
        },
    )
    provider = VaultProvider(source, Config(), environ={})
    try:
        start = time.monotonic()
        records = await asyncio.gather(*(provider.get(f"s{i}") for i in range(22)))
    finally:
        await provider.close()
    assert len(records) == 22
    assert len(arrivals) == 22
    assert max(arrivals) - start >= (22 - 2) / 20
    assert max(arrivals) - start < 5  # paced, not stuck
    assert provider.stats.rate_limited == 20


# --------------------------------------------------------------------------- with_retries


class Script:
    """An upstream call that fails with the scripted errors, then answers "ok"; it
    records the clock and the remaining seconds it was given at each attempt."""

    def __init__(self, clock: FakeClock, *errors: AgentError, takes: float = 0.0) -> None:
        self.clock = clock
        self.errors = list(errors)
        self.takes = takes
        self.attempts: list[tuple[float, float]] = []

    async def __call__(self, remaining: float) -> str:
        self.attempts.append((self.clock.now, remaining))
        self.clock.advance(self.takes)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture(name="widest_jitter")
def _widest_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full jitter drawn at its upper bound, so backoff delays are exact."""
    monkeypatch.setattr("kms_agent.upstream.random.uniform", lambda low, high: high)


async def test_a_success_is_returned_with_the_remaining_time_given_to_the_call(vtime):
    """The call is told how long it has left before the deadline, and its answer is
    returned without retries or sleeps."""
    clock = vtime.clock
    call = Script(clock)
    result = await vtime.run(with_retries(call, deadline=clock.now + 7, attempts=3, clock=clock))
    assert result == "ok"
    assert call.attempts == [(clock.now, 7)]
    assert vtime.slept == []


async def test_transient_errors_are_retried_with_doubling_backoff(vtime, widest_jitter):
    """Throttling and unavailability are retried after base·2ⁿ (full jitter at its top),
    each attempt told the time it has left, until one succeeds."""
    clock = vtime.clock
    start = clock.now
    call = Script(clock, Throttled("slow down"), Unavailable("503"), Unavailable("503"))
    result = await vtime.run(
        with_retries(call, deadline=start + 10, attempts=4, base=0.1, cap=2.0, clock=clock)
    )
    assert result == "ok"
    assert vtime.slept == pytest.approx([0.1, 0.2, 0.4])
    assert [at - start for at, _ in call.attempts] == pytest.approx([0, 0.1, 0.3, 0.7])
    assert [left for _, left in call.attempts] == pytest.approx([10, 9.9, 9.7, 9.3])


async def test_the_last_error_is_raised_when_the_attempts_run_out(vtime, widest_jitter):
    """After ``attempts`` transient failures the last one is raised, with no sleep after
    the final attempt."""
    clock = vtime.clock
    call = Script(clock, Unavailable("first"), Unavailable("second"), Unavailable("third"))
    with pytest.raises(Unavailable, match="third"):
        await vtime.run(with_retries(call, deadline=clock.now + 10, attempts=3, clock=clock))
    assert len(call.attempts) == 3
    assert len(vtime.slept) == 2


@pytest.mark.parametrize(
    "error", [SecretNotFound("no such secret"), AccessDenied("denied"), ConfigError("bad")]
)
async def test_errors_that_are_not_transient_are_not_retried(vtime, error):
    """A definite answer (not found, access denied, anything not transient) is raised
    after the first attempt: retrying it would only cost quota."""
    clock = vtime.clock
    call = Script(clock, error)
    with pytest.raises(type(error)):
        await vtime.run(with_retries(call, deadline=clock.now + 10, attempts=5, clock=clock))
    assert len(call.attempts) == 1
    assert vtime.slept == []


async def test_the_retryable_rule_is_the_callers(vtime):
    """A caller's ``retryable`` decides: here a transient error it refuses is not
    retried, and a non-transient one it accepts is."""
    clock = vtime.clock
    call = Script(clock, SecretNotFound("eventually consistent"))
    result = await vtime.run(
        with_retries(
            call,
            deadline=clock.now + 10,
            attempts=3,
            retryable=lambda e: isinstance(e, SecretNotFound),
            clock=clock,
        )
    )
    assert (result, len(call.attempts)) == ("ok", 2)
    never = Script(clock, Throttled("slow down"))
    with pytest.raises(Throttled):
        await vtime.run(
            with_retries(
                never, deadline=clock.now + 10, attempts=3, retryable=lambda e: False, clock=clock
            )
        )
    assert len(never.attempts) == 1


async def test_a_backoff_that_would_reach_the_deadline_is_not_slept(vtime, widest_jitter):
    """Backoff stays inside the deadline: when the next delay would end at or past it,
    the error is raised at once instead of sleeping into a timeout."""
    clock = vtime.clock
    start = clock.now
    call = Script(clock, *(Unavailable(f"down {i}") for i in range(10)))
    with pytest.raises(Unavailable, match="down 1"):
        await vtime.run(with_retries(call, deadline=start + 2.5, attempts=10, base=1, clock=clock))
    assert vtime.slept == [1]  # the next delay (2 s) would end at 3 s, past 2.5 s
    assert clock.now == start + 1


async def test_backoff_delays_are_full_jitter_below_a_doubling_cap():
    """Each delay is drawn from [0, min(cap, base·2ⁿ)]: under the bound, and spread over
    all of it (not the bound itself, nor only its upper half)."""
    draws = [list(itertools.islice(backoff_delays(0.1, 1.0), 8)) for _ in range(200)]
    bounds = [min(1.0, 0.1 * 2**n) for n in range(8)]
    delays_by_attempt = list(zip(*draws, strict=True))
    assert all(0 <= d <= b for row in draws for d, b in zip(row, bounds, strict=True))
    assert all(len(set(column)) > 100 for column in delays_by_attempt)
    assert all(  # full jitter reaches down to zero (not only the upper half)
        min(column) < bound / 4 for column, bound in zip(delays_by_attempt, bounds, strict=True)
    )
    assert max(delays_by_attempt[7]) > 0.9  # capped at 1.0, not 12.8


async def test_a_call_that_overran_the_deadline_is_not_retried(vtime, widest_jitter):
    """An attempt that itself used up the time left ends the retries with the error."""
    clock = vtime.clock
    call = Script(clock, Unavailable("slow and down"), takes=3.0)
    with pytest.raises(Unavailable, match="slow and down"):
        await vtime.run(with_retries(call, deadline=clock.now + 2, attempts=4, clock=clock))
    assert len(call.attempts) == 1
    assert vtime.slept == []


async def test_no_attempt_is_made_past_the_deadline(vtime):
    """A call whose deadline has already passed is answered UpstreamTimeout unsent."""
    clock = vtime.clock
    call = Script(clock)
    with pytest.raises(UpstreamTimeout, match="within the deadline"):
        await vtime.run(with_retries(call, deadline=clock.now, attempts=3, clock=clock))
    assert call.attempts == []


async def test_a_probe_makes_one_attempt_and_sleeps_not(vtime):
    """With ONE_ATTEMPT set (the cache probing a failing source) a transient failure is
    raised after one attempt and no backoff; the setting ends with its context, so the
    same call outside it is retried again."""
    clock = vtime.clock
    probe = Script(clock, Unavailable("still down"))

    async def probing() -> str:
        ONE_ATTEMPT.set(True)
        return await with_retries(probe, deadline=clock.now + 10, attempts=4, clock=clock)

    with pytest.raises(Unavailable):
        await vtime.run(asyncio.create_task(probing()))  # its own context, as a probe runs
    assert (len(probe.attempts), vtime.slept) == (1, [])
    assert ONE_ATTEMPT.get() is False
    normal = Script(clock, Unavailable("down"))
    assert await vtime.run(with_retries(normal, deadline=clock.now + 10, attempts=4, clock=clock))
    assert len(normal.attempts) == 2


# --------------------------------------------------------------------------- the boundary


def _raises(exc: BaseException) -> Callable[[], None]:
    def run() -> None:
        raise exc

    return run


@pytest.mark.parametrize(
    ("raised", "mapped", "says"),
    [
        (TimeoutError(), UpstreamTimeout, "did not answer in time"),
        (aiohttp.ServerTimeoutError("read"), UpstreamTimeout, "did not answer in time"),
        (
            aiohttp.ClientConnectorError(
                aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None),
                ConnectionRefusedError(111, "refused"),
            ),
            Unavailable,
            "cannot connect to the store (ClientConnectorError)",
        ),
        (aiohttp.ClientPayloadError("cut"), Unavailable, "broken response (ClientPayloadError)"),
        (json.JSONDecodeError("x", "<html>", 0), Unavailable, "broken response (JSONDecodeError)"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), Unavailable, "UnicodeDecodeError"),
    ],
)
def test_transport_failures_are_mapped_onto_the_vocabulary(raised, mapped, says):
    """Timeouts, refused connections and broken bodies become UpstreamTimeout or
    Unavailable naming what failed (the exception type, never its text or a body)."""
    with pytest.raises(mapped) as caught, mapped_errors("the store"):
        _raises(raised)()
    assert says in caught.value.message
    assert caught.value.__cause__ is raised
    assert "<html>" not in caught.value.message


def test_errors_of_the_vocabulary_pass_the_boundary_unchanged():
    """An AgentError raised inside the boundary is not re-mapped."""
    original = SecretNotFound("no such secret")
    with pytest.raises(SecretNotFound) as caught, mapped_errors("the store"):
        _raises(original)()
    assert caught.value is original


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://kms.example.com/", "https://kms.example.com"),
        ("http://127.0.0.1:8200/", "http://127.0.0.1:8200"),
        ("http://[::1]:8200", "http://[::1]:8200"),
        ("http://localhost:1234", "http://localhost:1234"),
        ("http://kms.example.com", None),
        ("http://10.0.0.1", None),
        ("ftp://127.0.0.1", None),
        ("kms.example.com", None),
    ],
)
def test_endpoints_are_https_or_loopback_http(url, accepted):
    """Plain http only to a loopback host; anything else not https is a config error
    naming the key."""
    if accepted is None:
        with pytest.raises(ConfigError, match=r"^sources\.x\.endpoint: "):
            check_endpoint(url, "sources.x.endpoint")
    else:
        assert check_endpoint(url, "sources.x.endpoint") == accepted


def test_source_options_are_typed_with_the_dotted_key_in_errors() -> None:
    """A source's provider settings are built from their declared types: given values
    converted, the rest defaulted, and a wrong type (a bool is not a number) refused with
    the setting's dotted key."""
    table = {"address": "https://vault.example", "timeout_seconds": 3}
    opts = VaultOptions.of(source_config("v", "vault", table).options)
    assert opts.timeout_seconds == 3.0
    assert (opts.mount, opts.qps, opts.endpoints) == ("secret", 100, None)
    with pytest.raises(ConfigError, match=r"^sources\.v\.mount: 5 is not a string"):
        source_config("v", "vault", {"mount": 5})
    with pytest.raises(ConfigError, match=r"^sources\.v\.rate_limit_qps: True is not a number"):
        source_config("v", "vault", {"rate_limit_qps": True})
