"""Every attempt on the wire is the agent's own: no re-sends by the HTTP client, failed
credential fetches backed off, and a call held by the limiter reports the source's error."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from aiohttp import web

from kms_agent.config import Config, source_config
from kms_agent.credentials import FAILED_RETRY_BASE, FAILED_RETRY_MAX, Credentials, Refreshing
from kms_agent.errors import (
    BadCredentials,
    ConnectionDropped,
    HeldByLimiter,
    Unavailable,
    UpstreamTimeout,
)
from kms_agent.providers.vault import Provider as VaultProvider
from kms_agent.upstream import ONE_ATTEMPT, with_retries
from tests.conftest import FakeClock


def vault(address: str, **options: object) -> VaultProvider:
    source = source_config("v", "vault", {"address": address, "token": "t" * 16, **options})
    return VaultProvider(source, Config(), environ={})


async def test_a_reset_get_is_not_resent_by_the_http_client(aiohttp_server):
    """A GET whose connection is reset reaches the upstream once per attempt of the
    agent's own retry policy: aiohttp's silent re-send of idempotent requests (which
    doubled Huawei's and Vault's load, outside the limiter) is off."""
    seen = 0

    async def reset(request: web.Request) -> web.StreamResponse:
        nonlocal seen
        seen += 1
        assert request.transport is not None
        request.transport.abort()
        return web.Response()  # never sent

    app = web.Application()
    app.router.add_get("/{tail:.*}", reset)
    server = await aiohttp_server(app)
    provider = vault(str(server.make_url("")).rstrip("/"), max_attempts=1, verify_answers=False)
    try:
        with pytest.raises(Unavailable):
            await provider.get("db")
    finally:
        await provider.close()
    assert seen == 1


def _failing_fetch(calls: list[float], clock: FakeClock):
    async def fetch() -> Credentials:
        calls.append(clock.now)
        raise BadCredentials("the STS refused the role")

    return fetch


async def test_failed_credential_fetches_are_backed_off():
    """A refusing STS or metadata service sees one fetch per back-off (1 s doubling to
    15 s), not one per caller; callers get the same error meanwhile."""
    clock = FakeClock()
    calls: list[float] = []
    creds = Refreshing(_failing_fetch(calls, clock), "src", clock=clock)
    for _ in range(30):  # 30 s of callers, 10 per second
        for _ in range(10):
            with pytest.raises(BadCredentials, match="refused the role"):
                await creds.get()
        clock.advance(1)
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) <= 6  # at 0, 1, 3, 7, 15, 30 at most
    assert gaps[0] >= FAILED_RETRY_BASE
    assert all(g <= FAILED_RETRY_MAX + 1 for g in gaps)
    assert gaps == sorted(gaps)


async def test_valid_credentials_are_used_while_a_refresh_is_backed_off():
    """Credentials that have not expired keep serving while the refresh of them fails
    and backs off; a success afterwards resets the back-off."""
    clock = FakeClock(start=time.time())
    calls: list[float] = []
    good = Credentials("AK", "SK", expiration=clock.now + 100)
    answers: list[Credentials | None] = [good]

    async def fetch() -> Credentials:
        calls.append(clock.now)
        answer = answers.pop(0) if answers else None
        if answer is None:
            raise BadCredentials("metadata service refused")
        return answer

    creds = Refreshing(fetch, "src", clock=clock)
    assert await creds.get() is good
    clock.advance(95)  # inside the must-refresh window: the refresh fails
    with pytest.raises(BadCredentials):
        await creds.get()
    for _ in range(3):  # backed off: the still-valid credentials answer
        assert await creds.get() is good
    assert len(calls) == 2
    fresh = Credentials("AK2", "SK2", expiration=clock.now + 1000)
    answers.append(fresh)
    clock.advance(FAILED_RETRY_BASE)
    assert await creds.get() is fresh


async def test_a_call_held_by_the_limiter_reports_what_the_source_said(aiohttp_server):
    """During an outage the limiter fills with retries; a call it holds past the deadline
    is answered at once (not retried) with the source's own last error (said to be held),
    not only 'rate limit'."""

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"errors": ["storage backend down"]}, status=500)

    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    server = await aiohttp_server(app)
    provider = vault(
        str(server.make_url("")).rstrip("/"),
        rate_limit_qps=1,
        timeout_seconds=0.5,
        verify_answers=False,
    )
    try:
        with pytest.raises(Unavailable):  # the outage is under way: the source answers 500
            await provider.get("first")
        results = await asyncio.gather(
            *(provider.get(f"s{i}") for i in range(6)), return_exceptions=True
        )
    finally:
        await provider.close()
    assert all(isinstance(r, Unavailable | UpstreamTimeout) for r in results)
    held = [r for r in results if isinstance(r, Unavailable) and "not sent" in r.message]
    assert held, results
    assert all("storage backend down" in r.message for r in held)
    assert not any(type(r) is HeldByLimiter for r in results)


async def test_with_retries_makes_one_attempt_in_a_probe():
    """Inside a probe (ONE_ATTEMPT set), a transient failure is not retried."""
    calls = 0

    async def failing(remaining: float) -> None:
        nonlocal calls
        calls += 1
        raise Unavailable("down")

    for probe, expected in ((False, 3), (True, 1)):
        calls = 0
        token = ONE_ATTEMPT.set(probe)
        try:
            with pytest.raises(Unavailable):
                await with_retries(failing, deadline=time.monotonic() + 5, attempts=3, base=0.001)
        finally:
            ONE_ATTEMPT.reset(token)
        assert calls == expected


async def test_a_probe_retries_once_a_connection_dropped_before_any_answer():
    """A connection that closed before any answer (a pooled one the server closed while
    idle looks the same) gets one more try even in a probe; any other failure none."""
    calls = 0

    async def dropped(remaining: float) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionDropped("closed before answering")
        return "ok"

    token = ONE_ATTEMPT.set(True)
    try:
        assert await with_retries(dropped, deadline=time.monotonic() + 5, attempts=4) == "ok"
    finally:
        ONE_ATTEMPT.reset(token)
    assert calls == 2
