"""Keeping credentials fresh (:class:`kms_agent.credentials.Refreshing`) on a fake clock:
the background and must-refresh windows (fixed for long-lived credentials, in proportion
for short-lived ones), one fetch shared by concurrent callers, failures and their back-off,
and invalidation by the store."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from kms_agent.credentials import (
    FAILED_RETRY_BASE,
    FAILED_RETRY_MAX,
    MIN_REFRESH_INTERVAL,
    MUST_REFRESH_BEFORE,
    STALE_BEFORE,
    Credentials,
    Refreshing,
    credential_kind,
)
from kms_agent.errors import BadCredentials, ConfigError, Unavailable
from tests.conftest import PLANTED, FakeClock

#: Epoch seconds the fake clock starts at (Refreshing's clock is epoch time).
T0 = 1_700_000_000.0
HOUR = 3600.0


class Issuer:
    """A credential source: each fetch hands out new credentials living ``lifetime``
    seconds from the clock's now (or raises what the test queued), optionally held at a
    gate so callers pile up on it."""

    def __init__(self, clock: FakeClock, lifetime: float | None = HOUR) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.fetched_at: list[float] = []
        self.failures: list[BaseException] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self) -> Credentials:
        self.fetched_at.append(self.clock.now)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        n = len(self.fetched_at)
        expiration = None if self.lifetime is None else self.clock.now + self.lifetime
        return Credentials(f"AKID{n}", f"{PLANTED}-sk{n}", f"tok{n}", expiration, origin="test")

    @property
    def fetches(self) -> int:
        return len(self.fetched_at)


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock(start=T0)


@pytest.fixture(name="issuer")
def _issuer(clock: FakeClock) -> Issuer:
    return Issuer(clock)


@pytest.fixture(name="creds")
async def _creds(issuer: Issuer, clock: FakeClock):
    refreshing = Refreshing(issuer, "src", clock=clock)
    yield refreshing
    await refreshing.close()


async def background_done(creds: Refreshing) -> None:
    """Until the background refresh in flight, if any, has finished."""
    task = creds._background
    if task is not None:
        await task


# --------------------------------------------------------------------------- windows


async def test_credentials_are_fetched_once_and_reused_while_fresh(creds, issuer, clock):
    """The first caller fetches; later callers get the same credentials, with no fetch,
    until the refresh window opens."""
    first = await creds.get()
    for _ in range(5):
        clock.advance(60)
        assert await creds.get() is first
    assert issuer.fetches == 1
    assert creds.current is first
    assert creds.expiration == T0 + HOUR


async def test_credentials_that_never_expire_are_never_refreshed(clock):
    """Static keys (no expiration) are fetched once, however much time passes."""
    issuer = Issuer(clock, lifetime=None)
    creds = Refreshing(issuer, "src", clock=clock)
    first = await creds.get()
    clock.advance(365 * 24 * HOUR)
    assert await creds.get() is first
    assert issuer.fetches == 1
    assert creds.expiration is None


async def test_the_background_window_refreshes_without_making_callers_wait(creds, issuer, clock):
    """From STALE_BEFORE before expiry, a caller gets the current credentials at once and
    one refresh starts behind it; callers meanwhile do not start another; once it is done
    callers get the new credentials."""
    issuer.gate = asyncio.Event()
    issuer.gate.set()
    first = await creds.get()
    clock.advance(HOUR - STALE_BEFORE - 1)
    assert await creds.get() is first
    assert issuer.fetches == 1  # not yet in the window
    clock.advance(2)
    issuer.gate.clear()
    issuer.entered.clear()
    assert await creds.get() is first  # answered at once, the refresh runs behind
    await issuer.entered.wait()
    for _ in range(3):
        assert await creds.get() is first
    assert issuer.fetches == 2
    issuer.gate.set()
    await background_done(creds)
    second = await creds.get()
    assert second is not first
    assert second.access_key_id == "AKID2"
    assert issuer.fetched_at[1] == T0 + HOUR - STALE_BEFORE + 1


async def test_the_must_refresh_window_makes_callers_wait_for_fresh_ones(creds, issuer, clock):
    """Within MUST_REFRESH_BEFORE of expiry the old credentials are not handed out: the
    caller waits for the refresh and gets the new ones."""
    first = await creds.get()
    clock.advance(HOUR - MUST_REFRESH_BEFORE)
    issuer.gate = asyncio.Event()
    issuer.entered.clear()
    waiting = asyncio.create_task(creds.get())
    await issuer.entered.wait()
    await asyncio.sleep(0)
    assert not waiting.done()  # held until the fetch answers
    issuer.gate.set()
    second = await waiting
    assert second is not first
    assert second.expiration == clock.now + HOUR


@pytest.mark.parametrize("lifetime", [300.0, 30.0, 3.0])
async def test_short_lived_credentials_get_windows_in_proportion(clock, lifetime):
    """Credentials living less than the fixed windows (15 and 1 minutes) are refreshed in
    the background from a third of their lifetime before expiry and block callers only in
    the last tenth: they are neither refreshed on every call nor used until they expire."""
    issuer = Issuer(clock, lifetime=lifetime)
    creds = Refreshing(issuer, "src", clock=clock)
    first = await creds.get()
    clock.advance(lifetime * 2 / 3 - 0.01)
    assert await creds.get() is first
    assert issuer.fetches == 1  # not in the background window yet
    clock.advance(0.02)
    assert await creds.get() is first  # in it: answered at once, refreshed behind
    await background_done(creds)
    assert issuer.fetches == 2
    second = await creds.get()
    assert second is not first
    clock.advance(lifetime * 0.9 - 0.01)  # the second's own background window is open...
    assert await creds.get() is second  # ...but not its must-refresh window
    await background_done(creds)
    third = await creds.get()
    clock.advance(lifetime * 0.9 + 0.01)  # the third, in its last tenth: wait for a fourth
    assert (await creds.get()).access_key_id == "AKID4"
    assert third.access_key_id == "AKID3"
    await creds.close()


async def test_credentials_handed_out_unchanged_are_refetched_at_most_once_a_minute(clock):
    """A metadata service that keeps answering the same credentials (as IMDS does until
    shortly before they expire) is asked again at most once per MIN_REFRESH_INTERVAL
    while the credentials sit in their background window, not on every call."""
    same = Credentials("AKID", PLANTED, "tok", expiration=T0 + HOUR, origin="imds")
    fetched: list[float] = []

    async def fetch() -> Credentials:
        fetched.append(clock.now)
        return same

    creds = Refreshing(fetch, "src", clock=clock)
    await creds.get()
    clock.advance(HOUR - STALE_BEFORE)
    while clock.now < T0 + HOUR - MUST_REFRESH_BEFORE - 1:
        assert await creds.get() is same
        await background_done(creds)
        clock.advance(1)
    gaps = [b - a for a, b in itertools.pairwise(fetched[1:])]
    assert len(fetched) > 2
    assert all(gap >= MIN_REFRESH_INTERVAL for gap in gaps)
    assert len(fetched) - 1 <= STALE_BEFORE / MIN_REFRESH_INTERVAL
    await creds.close()


# --------------------------------------------------------------------------- the race


async def test_concurrent_callers_without_credentials_share_one_fetch(creds, issuer):
    """Fifty callers arriving before the first credentials exist wait on one fetch and
    all get its result."""
    issuer.gate = asyncio.Event()
    callers = [asyncio.create_task(creds.get()) for _ in range(50)]
    await issuer.entered.wait()
    issuer.gate.set()
    results = await asyncio.gather(*callers)
    assert issuer.fetches == 1
    assert all(r is results[0] for r in results)


async def test_concurrent_callers_in_the_must_window_share_one_fetch(creds, issuer, clock):
    """Callers piling up on expiring credentials trigger one refresh between them."""
    await creds.get()
    clock.advance(HOUR - 1)
    issuer.gate = asyncio.Event()
    issuer.entered.clear()
    callers = [asyncio.create_task(creds.get()) for _ in range(20)]
    await issuer.entered.wait()
    issuer.gate.set()
    results = await asyncio.gather(*callers)
    assert issuer.fetches == 2
    assert {r.access_key_id for r in results} == {"AKID2"}


async def test_a_caller_in_the_must_window_joins_the_background_refresh(creds, issuer, clock):
    """A background refresh in flight when the credentials reach the must-refresh window
    is the one the waiting caller gets: no second fetch."""
    await creds.get()
    clock.advance(HOUR - STALE_BEFORE + 1)
    issuer.gate = asyncio.Event()
    issuer.entered.clear()
    await creds.get()  # starts the background refresh, held at the gate
    await issuer.entered.wait()
    clock.advance(STALE_BEFORE - 2)  # now inside the must-refresh window
    waiting = asyncio.create_task(creds.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    issuer.gate.set()
    assert (await waiting).access_key_id == "AKID2"
    assert issuer.fetches == 2


# --------------------------------------------------------------------------- failures


async def test_failed_fetches_back_off_doubling_to_the_cap(creds, issuer, clock):
    """Fetches after consecutive failures are FAILED_RETRY_BASE apart, doubling each time
    up to FAILED_RETRY_MAX; every caller in between gets the same error, unfetched."""
    issuer.failures = [Unavailable("metadata service down") for _ in range(100)]
    for _ in range(80 * 8):  # 80 s of callers, eight a second
        with pytest.raises(Unavailable, match="metadata service down"):
            await creds.get()
        clock.advance(0.125)
    gaps = [b - a for a, b in itertools.pairwise(issuer.fetched_at)]
    expected = [min(FAILED_RETRY_MAX, FAILED_RETRY_BASE * 2**n) for n in range(len(gaps))]
    assert gaps == expected
    assert gaps.count(FAILED_RETRY_MAX) >= 3
    assert len(issuer.fetched_at) < 12


async def test_a_success_after_failures_resets_the_back_off(creds, issuer, clock):
    """After a fetch succeeds, the next failure is retried after the base delay again,
    not after the long one the earlier failures had reached."""
    issuer.lifetime = 10.0
    issuer.failures = [Unavailable("down") for _ in range(4)]
    for _ in range(4):
        with pytest.raises(Unavailable):
            await creds.get()
        clock.advance(FAILED_RETRY_MAX)
    good = await creds.get()
    assert good.access_key_id == "AKID5"
    issuer.failures = [Unavailable("down again"), Unavailable("down again")]
    clock.advance(10.0)  # expired: callers must wait for a fetch
    with pytest.raises(Unavailable, match="down again"):
        await creds.get()
    clock.advance(FAILED_RETRY_BASE)
    with pytest.raises(Unavailable, match="down again"):
        await creds.get()
    assert issuer.fetches == 7


async def test_a_crashing_fetch_becomes_bad_credentials_without_its_text(creds, issuer):
    """A fetch failing with something outside the vocabulary (a parse error on a
    surprising answer) is reported as BadCredentials naming the source and the
    exception type, never the exception's text, which may quote the answer."""
    issuer.failures = [KeyError(f"SecretAccessKey={PLANTED}")]
    with pytest.raises(BadCredentials) as caught:
        await creds.get()
    assert caught.value.message == "credentials for src could not be obtained (KeyError)"
    assert PLANTED not in caught.value.message
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(BadCredentials, match=r"\(KeyError\)"):  # backed off: the same error
        await creds.get()
    assert issuer.fetches == 1


async def test_expired_credentials_are_not_served_while_the_refresh_backs_off(creds, issuer, clock):
    """Once the current credentials have expired, a backed-off refresh answers with its
    error: expired credentials are never handed out."""
    first = await creds.get()
    issuer.failures = [Unavailable("STS down") for _ in range(3)]
    clock.advance(HOUR - 0.5)  # in the must-refresh window: the refresh fails
    with pytest.raises(Unavailable):
        await creds.get()
    clock.advance(0.25)
    assert await creds.get() is first  # still valid, backed off: served
    clock.advance(0.25)  # expired now, still backed off (for FAILED_RETRY_BASE)
    with pytest.raises(Unavailable, match="STS down"):
        await creds.get()
    assert issuer.fetches == 2


async def test_a_failed_background_refresh_keeps_the_current_credentials(
    creds, issuer, clock, log_capture
):
    """A background refresh that fails is logged (code and message, no secret) and
    callers keep the current credentials; it is tried again after the back-off."""
    first = await creds.get()
    issuer.failures = [Unavailable("STS down"), Unavailable("STS down")]
    clock.advance(HOUR - STALE_BEFORE + 1)
    mark = len(log_capture.getvalue())
    assert await creds.get() is first
    await background_done(creds)
    logged = log_capture.getvalue()[mark:]
    assert "credentials_refresh_failed" in logged
    assert "UpstreamUnavailable" in logged
    assert PLANTED not in logged
    for _ in range(5):  # within the back-off: no fetch, the current ones served
        assert await creds.get() is first
        await background_done(creds)
    assert issuer.fetches == 2
    clock.advance(FAILED_RETRY_BASE)
    assert await creds.get() is first
    await background_done(creds)
    assert issuer.fetches == 3


# --------------------------------------------------------------------------- invalidation


async def test_invalidated_credentials_are_replaced_on_the_next_call(creds, issuer):
    """When the store refuses the credentials (revoked, expired early), invalidating them
    makes the next caller wait for new ones, even though they had not expired."""
    first = await creds.get()
    creds.invalidate(first)
    assert creds.current is None
    second = await creds.get()
    assert second is not first
    assert issuer.fetches == 2


async def test_invalidating_credentials_already_replaced_changes_nothing(creds, issuer):
    """A late refusal of old credentials (a call that started before a refresh) does not
    throw away the new ones: no extra fetch."""
    first = await creds.get()
    creds.invalidate(first)
    second = await creds.get()
    creds.invalidate(first)
    assert await creds.get() is second
    assert issuer.fetches == 2


async def test_close_cancels_a_refresh_in_flight(creds, issuer, clock):
    """Closing the source stops its background refresh."""
    await creds.get()
    clock.advance(HOUR - STALE_BEFORE + 1)
    issuer.gate = asyncio.Event()
    issuer.entered.clear()
    await creds.get()
    await issuer.entered.wait()
    task = creds._background
    await creds.close()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- the types


def test_the_repr_of_credentials_never_shows_the_secret_or_token():
    """repr/str name the key id, origin and expiry, never the secret or session token."""
    creds = Credentials("AKIDEXAMPLE", PLANTED, "session-" + PLANTED, T0, origin="imds")
    for text in (repr(creds), str(creds), repr([creds])):
        assert PLANTED not in text
        assert "AKIDEXAMPLE" in text
        assert "imds" in text


def test_a_credentials_table_is_checked_for_unknown_keys_and_its_type():
    """credential_kind names an unknown key by its dotted path with the allowed keys, and
    refuses an unknown type; an absent type means auto."""
    keys = {"type", "profile"}
    kinds = ("auto", "shared_file")
    where = "sources.aws.credentials"
    assert credential_kind({}, keys, kinds, where) == "auto"
    assert credential_kind({"type": "shared_file"}, keys, kinds, where) == "shared_file"
    with pytest.raises(ConfigError, match=r"credentials\.profil: unknown setting; allowed: "):
        credential_kind({"profil": "x"}, keys, kinds, where)
    with pytest.raises(ConfigError, match=r"credentials\.type: 'sso' is not one of auto"):
        credential_kind({"type": "sso"}, keys, kinds, where)
