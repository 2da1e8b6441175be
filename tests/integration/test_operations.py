"""Operating the agent: metrics, drain on SIGTERM, reload, connection limits.

The agent runs in this process on real loopback listeners, with a scripted provider that
can hold requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from unittest.mock import ANY

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kms_agent.agent import Agent
from kms_agent.config import load, source_config
from kms_agent.errors import Unavailable
from kms_agent.providers.local import Provider as LocalProvider
from tests.conftest import PLANTED, TOKEN, ScriptedProvider, read_response, running_agent

H = {"X-KMS-Token": TOKEN}


def agent_config(tmp_path: Path, text: str = "", **env: str) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "kms.toml"
    path.write_text(text)
    environ = {
        "KMS_TOKEN": TOKEN,
        "KMS_AGENT_SERVER_LISTEN": "127.0.0.1:0",
        "KMS_AGENT_METRICS_LISTEN": "127.0.0.1:0",
        "KMS_AGENT_DATA_DIR": str(tmp_path / "data"),
        **env,
    }
    return path, environ


def running(tmp_path: Path, provider: ScriptedProvider, text: str = "", **env: str):
    """The agent in process with ``provider`` behind every name, reloadable from ``text``."""
    return running_agent(tmp_path, text, env, sources=[(("*",), provider)], loader=True)


def url(agent: Agent, path: str) -> str:
    return f"http://{agent.addresses[0]}{path}"


async def scrape(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    metrics_url = f"http://{agent.metrics_addresses[0]}/metrics"
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as resp:
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_counters_move_exactly_as_the_requests_made(tmp_path, provider):
    """Acceptance 1: after a scripted run the scrape shows exactly those requests."""
    provider.values["db"] = PLANTED
    async with running(tmp_path, provider, "[cache]\nttl = 300\n") as agent:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                assert (await s.get(url(agent, "/secrets/db"), headers=H)).status == 200
            assert (await s.get(url(agent, "/secrets/nope"), headers=H)).status == 404
            assert (await s.get(url(agent, "/secrets/db"))).status == 401
            assert (
                await s.get(url(agent, "/secrets/db"), headers={"X-KMS-Token": "x" * 20})
            ).status == 403
            assert (
                await s.get(url(agent, "/secrets/db"), headers={**H, "Forwarded": "for=1.2.3.4"})
            ).status == 400
            provider.failures["db"] = Unavailable("down")
            agent.state.cache.peek(
                ("scripted", "db", None, None)
            ).expires_at = agent.state.cache.now()
            stale = await s.get(url(agent, "/secrets/db"), headers=H)
            assert stale.status == 200
            assert "Age" in stale.headers
        m = await scrape(agent)
    route = "/secrets/{name}"
    assert m[("kms_agent_requests_total", (("code", "200"), ("route", route)))] == 4
    assert m[("kms_agent_requests_total", (("code", "404"), ("route", route)))] == 1
    assert m[("kms_agent_requests_total", (("code", "401"), ("route", route)))] == 1
    assert m[("kms_agent_requests_total", (("code", "403"), ("route", route)))] == 1
    assert m[("kms_agent_requests_total", (("code", "400"), ("route", route)))] == 1
    assert m[("kms_agent_request_duration_seconds_count", (("route", route),))] == 8
    assert m[("kms_agent_cache_requests_total", (("outcome", "miss"),))] == 1
    assert m[("kms_agent_cache_requests_total", (("outcome", "hit"),))] == 2
    assert m[("kms_agent_cache_requests_total", (("outcome", "stale"),))] == 1
    assert m[("kms_agent_auth_failures_total", (("reason", "missing_token"),))] == 1
    assert m[("kms_agent_auth_failures_total", (("reason", "invalid_token"),))] == 1
    assert m[("kms_agent_auth_failures_total", (("reason", "forwarded"),))] == 1
    up = "kms_agent_upstream_requests_total"
    assert m[(up, (("operation", "get"), ("outcome", "success"), ("source", "scripted")))] == 1
    assert (
        m[(up, (("operation", "get"), ("outcome", "SecretNotFound"), ("source", "scripted")))] == 1
    )
    assert (
        m[(up, (("operation", "get"), ("outcome", "UpstreamUnavailable"), ("source", "scripted")))]
        == 1
    )
    assert m[("kms_agent_cache_entries", ())] == 1
    assert m[("kms_agent_cache_bytes", ())] > len(PLANTED)
    assert m[("kms_agent_ready", ())] == 1
    for name, labels in m:
        assert all(PLANTED not in v and v != "db" for _, v in labels), (name, labels)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian prometheus)")
async def test_promtool_accepts_a_live_scrape(tmp_path, provider):
    """`promtool check metrics` reports nothing on a live scrape."""
    provider.values["db"] = PLANTED
    async with running(tmp_path, provider) as agent, aiohttp.ClientSession() as s:
        await s.get(url(agent, "/secrets/db"), headers=H)
        async with s.get(f"http://{agent.metrics_addresses[0]}/metrics") as resp:
            text = await resp.read()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == ""
    assert result.stderr.decode().strip() == ""


async def test_sigterm_with_200_requests_in_flight_loses_none(tmp_path, provider):
    """Acceptance 2: SIGTERM while 200 requests wait on the upstream: readiness turns 503
    while the listener still answers, all 200 complete with 200, run() returns cleanly."""
    for i in range(200):
        provider.values[f"s{i}"] = f"{PLANTED}-{i}"
    provider.gate = asyncio.Event()
    path, environ = agent_config(tmp_path, "[server]\ndrain_delay = 0.5\nshutdown_grace = 20\n")
    agent = Agent(load(path, environ=environ), environ=environ, sources=[(("*",), provider)])
    runner = asyncio.create_task(agent.run())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await agent.ready_event.wait()

        async def one(i: int) -> tuple[int, str]:
            async with s.get(url(agent, f"/secrets/s{i}?format=raw"), headers=H) as resp:
                return resp.status, await resp.text()

        tasks = [asyncio.create_task(one(i)) for i in range(200)]
        await provider.wait_calls(200)  # all 200 are inside the agent, waiting upstream
        os.kill(os.getpid(), signal.SIGTERM)
        await agent.stopping.wait()
        # A new connection: the listener is still open during the drain delay.
        async with aiohttp.ClientSession() as probe, probe.get(url(agent, "/readyz")) as resp:
            assert resp.status == 503
            assert (await resp.json())["reason"] == "draining"
        provider.gate.set()
        results = await asyncio.gather(*tasks)
    await runner
    assert results == [(200, f"{PLANTED}-{i}") for i in range(200)]
    with socket.socket() as sock:  # and now the listener is closed
        assert sock.connect_ex(tuple_address(agent.addresses[0])) != 0


def tuple_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def test_token_rotation_under_continuous_requests(tmp_path, provider):
    """Acceptance 3: a client loops with the old token, then the new one, while the token
    file is rotated; no request fails, and the old token is refused once removed."""
    provider.values["db"] = PLANTED
    old, new = "old-token-" + "o" * 20, "new-token-" + "n" * 20
    tokens = tmp_path / "tokens"
    tokens.write_text(old + "\n")
    tokens.chmod(0o640)
    text = f'[auth]\ntoken_files = ["{tokens}"]\n'
    async with running(tmp_path, provider, text, KMS_TOKEN="") as agent:
        current = old
        failures: list[int] = []
        done = asyncio.Event()
        count = 0

        async def client() -> None:
            nonlocal count
            async with aiohttp.ClientSession() as s:
                while not done.is_set():
                    async with s.get(
                        url(agent, "/secrets/db"), headers={"X-KMS-Token": current}
                    ) as r:
                        count += 1
                        if r.status != 200:
                            failures.append(r.status)

        loop_task = asyncio.create_task(client())
        auth = agent.state.auth
        async with agent.reloaded:
            tokens.write_text(f"{old}\n{new}\n")  # the watcher reloads the file
            await agent.reloaded.wait_for(lambda: len(auth.token_set.tokens) == 2)
        current = new  # the app reads the new token
        async with agent.reloaded:
            tokens.write_text(new + "\n")
            await agent.reloaded.wait_for(lambda: len(auth.token_set.tokens) == 1)
        done.set()
        await loop_task
        assert failures == []
        assert count > 10
        async with aiohttp.ClientSession() as s:
            assert (
                await s.get(url(agent, "/secrets/db"), headers={"X-KMS-Token": old})
            ).status == 403
            assert (
                await s.get(url(agent, "/secrets/db"), headers={"X-KMS-Token": new})
            ).status == 200


async def test_invalid_reload_keeps_serving_and_is_counted(tmp_path, provider):
    """A config change that fails validation keeps the old config and is counted; a valid
    one applies TTLs live and names the settings that need a restart."""
    provider.values["db"] = PLANTED
    async with running(tmp_path, provider, "[cache]\nttl = 300\n") as agent:
        path = Path(agent.config.path)
        path.write_text("[cache]\nttl = 'soon'\n")
        assert await agent.reload("test") is False
        assert agent.state.config.cache.ttl == 300
        async with aiohttp.ClientSession() as s:
            assert (await s.get(url(agent, "/secrets/db"), headers=H)).status == 200
        path.write_text('[cache]\nttl = 60\n[server]\nlisten = "127.0.0.1:1"\n')
        assert await agent.reload("test") is True
        assert agent.state.cache.settings.ttl == 60
        m = await scrape(agent)
    assert m[("kms_agent_config_reloads_total", (("result", "error"),))] == 1
    assert m[("kms_agent_config_reloads_total", (("result", "success"),))] == 1


async def test_reload_reports_restart_required(tmp_path, provider, log_capture):
    """Changing a start-time setting on reload is logged as needing a restart, and still
    is on every later reload until the agent restarts (it compares with what runs)."""
    async with running(tmp_path, provider) as agent:
        before = len(log_capture.getvalue())
        Path(agent.config.path).write_text("[server]\nkeepalive_timeout = 5\n")
        assert await agent.reload("test")
        first = log_capture.getvalue()[before:]
        before = len(log_capture.getvalue())
        assert await agent.reload("again")
        second = log_capture.getvalue()[before:]
    assert '"restart_required": ["server.keepalive_timeout"]' in first
    assert '"restart_required": ["server.keepalive_timeout"]' in second


async def test_connections_over_the_limit_get_503(tmp_path, provider):
    """server.max_connections: with every connection authenticated, the next one is
    answered 503 and closed at once (never held open)."""
    provider.values["db"] = PLANTED
    async with running(tmp_path, provider, "[server]\nmax_connections = 2\n") as agent:
        host, port = tuple_address(agent.addresses[0])
        held = [await asyncio.open_connection(host, port) for _ in range(2)]
        for _, writer in held:
            writer.write(
                f"GET /secrets/db HTTP/1.1\r\nHost: x\r\nX-KMS-Token: {TOKEN}\r\n\r\n".encode()
            )
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection(host, port)
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:  # the 503 and the close may race the client's bytes
            answer = b"HTTP/1.1 503 (reset)"
        assert answer.startswith(b"HTTP/1.1 503")
        assert answer.endswith(b"(reset)") or b"TooManyConnections" in answer
        assert len(agent.listeners.connections) == 2
        writer.close()
        for _, w in held:
            w.close()
        registry = agent.state.metrics.registry
        assert (
            registry.get_sample_value("kms_agent_connections_closed_total", {"reason": "limit"})
            == 1
        )


async def test_at_the_limit_an_unauthenticated_connection_makes_room(tmp_path, provider):
    """Connections that never authenticated are the first to go when the agent is at its
    limit: a caller with a token gets in even while others hold every slot idle."""
    provider.values["db"] = PLANTED
    async with running(tmp_path, provider, "[server]\nmax_connections = 3\n") as agent:
        host, port = tuple_address(agent.addresses[0])
        good_r, good_w = await asyncio.open_connection(host, port)
        good_w.write(
            f"GET /secrets/db HTTP/1.1\r\nHost: x\r\nX-KMS-Token: {TOKEN}\r\n\r\n".encode()
        )
        assert (await read_response(good_r))[0] == 200
        idle = [await asyncio.open_connection(host, port) for _ in range(2)]
        for _, w in idle:
            w.write(b"GET /secrets/db HTTP/1.1\r\nHo")  # a head begun, never finished
            await w.drain()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"GET /secrets/db?format=raw HTTP/1.1\r\nHost: x\r\nX-KMS-Token: {TOKEN}\r\n\r\n".encode()
        )
        assert await read_response(reader) == (200, ANY, PLANTED.encode())
        # the oldest unauthenticated connection was closed to make room
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
        registry = agent.state.metrics.registry
        assert (
            registry.get_sample_value("kms_agent_connections_closed_total", {"reason": "evicted"})
            == 1
        )
        # the authenticated one is untouched
        good_w.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(good_r))[2] == b"healthy"
        for w in (good_w, writer, idle[0][1], idle[1][1]):
            w.close()


async def test_oversized_headers_are_refused(tmp_path, provider):
    """A header past server.max_header_bytes is refused with 400, and the agent lives on."""
    provider.values["db"] = PLANTED
    async with running(tmp_path, provider) as agent, aiohttp.ClientSession() as s:
        big = await s.get(url(agent, "/secrets/db"), headers={**H, "X-Big": "x" * 9000})
        assert big.status == 400
        assert (await s.get(url(agent, "/secrets/db"), headers=H)).status == 200


async def test_exposed_store_key_is_warned_and_counted(tmp_path, provider):
    """A group-readable store key file shows in the log and the metric."""
    path, environ = agent_config(tmp_path)
    cfg = load(path, environ=environ)
    local = LocalProvider(source_config("local", "local"), cfg)
    local.store.init()
    local.store.key_path.chmod(0o640)
    agent = Agent(cfg, environ=environ, sources=[(("*",), local)])
    await agent.start()
    try:
        m = await scrape(agent)
    finally:
        await agent.stop()
    assert m[("kms_agent_file_permission_warnings_total", (("kind", "store_key"),))] == 1


async def test_not_ready_until_the_source_check_passes(tmp_path, provider):
    """A source failing its check at start: the agent serves /readyz 503 naming the source
    and the reason, retries, and turns ready once the source answers."""
    failing = {"on": True}

    async def check() -> None:
        if failing["on"]:
            raise Unavailable("connection refused", hint="is the endpoint reachable from here?")

    provider.check = check
    async with running(tmp_path, provider) as agent:
        async with aiohttp.ClientSession() as s, s.get(url(agent, "/readyz")) as resp:
            assert resp.status == 503
            reason = (await resp.json())["reason"]
        assert reason == "source scripted: UpstreamUnavailable: connection refused"
        failing["on"] = False
        await agent.ready_event.wait()  # the retry loop finds the source healthy
        async with aiohttp.ClientSession() as s, s.get(url(agent, "/readyz")) as resp:
            assert resp.status == 200


async def test_hit_summary_line(tmp_path, provider, log_capture):
    """Hits not logged one by one come out as one cache_hits line with counts per route."""
    provider.values["db"] = PLANTED
    async with running(tmp_path, provider) as agent:
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                assert (await s.get(url(agent, "/secrets/db"), headers=H)).status == 200
            assert (await s.get(url(agent, "/v1/db"), headers=H)).status == 200
        before = len(log_capture.getvalue())
        agent.log_hit_summary()
        summary = [json.loads(x) for x in log_capture.getvalue()[before:].splitlines()]
    assert summary[0]["event"] == "cache_hits"
    assert summary[0]["hits"] == {"/secrets/{name}": 3, "/v1/{name}": 1}
    assert summary[0]["total"] == 4
