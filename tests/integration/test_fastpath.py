"""The fast path in front of aiohttp: it answers exactly what the application would, and
leaves everything it should not answer to aiohttp, over the same connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace

import aiohttp
import pytest
from yarl import URL

from kms_agent.errors import Unavailable
from kms_agent.model import SecretRecord, SecretValue
from kms_agent.server import create_app
from tests.conftest import PLANTED, TOKEN, AgentTestServer, ScriptedProvider
from tests.integration.test_api import make_state

H = {"X-KMS-Token": TOKEN}
VARYING = {"date", "x-request-id"}


class MixedProvider(ScriptedProvider):
    """Text values as scripted, and one binary secret, ``blob``."""

    async def get(self, name, *, version_id=None, version_stage=None):
        if name == "blob":
            self.calls[name] += 1
            return SecretRecord(name, SecretValue(bytes(range(256))), "binary", "v1", ("ACSCurrent",), 0.0, self.name)
        return await super().get(name, version_id=version_id, version_stage=version_stage)


def set_fast(state, on: bool) -> None:
    state.config = replace(state.config, server=replace(state.config.server, fast_path=on))


@contextlib.asynccontextmanager
async def serving(state, **runner_kwargs):
    server = AgentTestServer(create_app(state))
    await server.start_server(**runner_kwargs)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def session_on(server, state, fast: bool, opener: str):
    """A client session whose one pooled connection was opened with the fast path on/off,
    by reading ``opener`` (a secret that exists: anything else would hand it to aiohttp)."""
    set_fast(state, fast)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.get(server.make_url(opener), headers=H) as resp:
            assert resp.status == 200
        set_fast(state, True)
        yield session


async def answer(session, server, path, headers=H):
    url = URL(f"http://127.0.0.1:{server.port}{path}", encoded=True)  # sent as written
    async with session.get(url, headers=headers) as resp:
        body = await resp.read()
        shown = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in VARYING}
        return resp.status, shown, body, resp.headers.get("X-Request-Id")


@pytest.fixture(name="mixed")
def _mixed():
    provider = MixedProvider()
    provider.values.update({
        "aigw!secret-abc": PLANTED + "-aigw",
        "db/json": json.dumps({"password": PLANTED}),
        "long": PLANTED + "k" * 1024,  # referenced by its bodies, not copied
        "long-quoted": '"' + PLANTED + "q" * 300 + '"',  # escaped in JSON: copied
        "x" * 200: "x" * 200,  # appears more than once in a body: copied
    })
    return provider


HITS = [
    "/secrets/aigw!secret-abc",
    "/secrets/aigw!secret-abc?format=raw",
    "/secrets/aigw!secret-abc?format=json&refresh=false",
    "/secrets/db/json",
    "/secrets/blob?format=raw",
    "/secrets/blob",
    "/secretsmanager/get?secretId=aigw!secret-abc",
    "/secretsmanager/get?secretId=blob&refreshNow=false",
    "/secretsmanager/get?secretId=aigw!secret-abc&versionStage=AWSPREVIOUS",
    "/v1/db/json",
    "/v1/aigw!secret-abc?versionId=v1",
    "/secrets/long",
    "/secrets/long?format=raw",
    "/secretsmanager/get?secretId=long",
    "/secrets/long-quoted",
    "/v1/long-quoted",
    "/secrets/" + "x" * 200,
    "/v1/" + "x" * 200,
]


@pytest.mark.parametrize("shape", ["aws", "kms", "vault"])
async def test_fast_answers_are_byte_for_byte_the_applications(mixed, clock, shape):
    """For every hit shape, the fast path's status, headers and body equal aiohttp's for the
    same request (Date and X-Request-Id aside), and the fast path did answer them."""
    state = make_state(mixed, clock, response_type=shape)
    async with serving(state) as server:
        fast_server = server.runner.server
        opener = "/secrets/aigw!secret-abc"
        async with session_on(server, state, True, opener) as fast, session_on(server, state, False, opener) as slow:
            for path in HITS:
                await answer(slow, server, path)  # the miss, on aiohttp
                before = fast_server.served
                got = await answer(fast, server, path)
                assert fast_server.served == before + 1, path
                want = await answer(slow, server, path)
                assert fast_server.served == before + 1, path
                assert got[:3] == want[:3], path
                assert got[0] == 200, path
                assert got[3] != want[3]  # each answer has its own request id


async def test_a_miss_on_a_fast_connection_is_loaded_once_and_answered_there(provider, clock, log_capture):
    """A cold read on a fast connection makes one provider call, is answered and logged as a
    miss, and the connection stays on the fast path for the hits after it."""
    provider.values.update({"cold": PLANTED, "opener": PLANTED})
    state = make_state(provider, clock)
    async with serving(state) as server, session_on(server, state, True, "/secrets/opener") as session:
        fast_server = server.runner.server
        before_log = len(log_capture.getvalue())
        first = await answer(session, server, "/secrets/cold?format=raw")
        second = await answer(session, server, "/secrets/cold?format=raw")
        assert first[0] == second[0] == 200
        assert first[2] == second[2] == PLANTED.encode()
        assert fast_server.served == 3
        assert provider.calls["cold"] == 1
        lines = [json.loads(x) for x in log_capture.getvalue()[before_log:].splitlines()]
        access = [(x["route"], x["cache"], x["request_id"]) for x in lines if x["event"] == "request"]
        assert access == [("/secrets/{name}", "miss", first[3])]
        assert state.hit_counts == {"/secrets/{name}": 1}
        assert state.metrics._hot.cache["miss"] == 2


async def test_failed_and_stale_loads_are_answered_by_aiohttp_without_a_second_fetch(provider, clock):
    """A load that fails, or gives a stale value, is handed to aiohttp with its outcome: the
    error (or stale value) is the application's answer and the provider is called once."""
    provider.values["db"] = PLANTED
    provider.failures["down"] = Unavailable("connection refused")
    state = make_state(provider, clock)
    async with serving(state) as server, session_on(server, state, True, "/secrets/db") as session:
        status, _, body, _ = await answer(session, server, "/secrets/down")
        assert status == 503
        assert json.loads(body)["error"]["code"] == "UpstreamUnavailable"
        assert provider.calls["down"] == 1
        assert not state.handed  # taken by aiohttp's lookup
    async with serving(state) as server, session_on(server, state, True, "/secrets/db") as session:
        clock.advance(400)
        provider.failures["db"] = Unavailable("connection refused")
        calls = provider.calls["db"]
        status, headers, body, _ = await answer(session, server, "/secrets/db")
        assert status == 200
        assert int(headers["age"]) >= 400
        assert json.loads(body)["stale"] is True
        assert provider.calls["db"] == calls + 1


LEFT_TO_AIOHTTP = [
    # (path, headers): requests the fast path must not answer, though the key is cached
    ("/secrets/aigw!secret-abc", {}),
    ("/secrets/aigw!secret-abc", {"X-KMS-Token": "wrong-token-wrong-token"}),
    ("/secrets/aigw!secret-abc", {**H, "X-Forwarded-For": "10.0.0.1"}),
    ("/secrets/aigw!secret-abc?refresh=true", H),
    ("/secrets/db/json?field=password", H),
    ("/secrets/aigw%21secret-abc", H),
    ("/secrets/aigw!secret-abc?format=raw&format=raw", H),
    ("/secrets/aigw!secret-abc?unknown=1", H),
    ("/secrets/aigw!secret-abc?format=xml", H),
    ("/secretsmanager/get?secretId=aigw!secret-abc&versionId=a%20b", H),
    ("/secretsmanager/get?secretId=aigw!secret-abc&versionId=" + "v" * 200, H),
    ("/secretsmanager/get?secretId=", H),
    ("/v1/aigw!secret-abc?refreshNow=true", H),
    ("/secrets", H),
    ("/nope", H),
]


@pytest.mark.parametrize(("path", "headers"), LEFT_TO_AIOHTTP)
async def test_what_the_fast_path_leaves_to_aiohttp(provider, clock, path, headers):
    """With the secret cached, these still get the application's own answer (checked against
    an aiohttp-only connection), not a fast one."""
    provider.values.update({"aigw!secret-abc": PLANTED, "db/json": json.dumps({"password": PLANTED})})
    state = make_state(provider, clock)
    async with serving(state) as server:
        async with session_on(server, state, False, "/secrets/aigw!secret-abc") as slow:
            await answer(slow, server, "/secrets/db/json")
            want = await answer(slow, server, path, headers)
        state.cache.settings = replace(state.cache.settings, refresh_min_interval=0)
        async with session_on(server, state, True, "/secrets/aigw!secret-abc") as fast:
            before = server.runner.server.served
            got = await answer(fast, server, path, headers)
            assert server.runner.server.served == before
    assert got[0] == want[0]
    if got[0] >= 400:
        assert json.loads(got[2])["error"]["code"] == json.loads(want[2])["error"]["code"]


async def raw_exchange(server, chunks: list[bytes], expect: int) -> list[bytes]:
    """Send ``chunks`` on one socket, each after the agent has buffered the one before;
    read ``expect`` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    fast = server.runner.server.fast
    try:
        for i, chunk in enumerate(chunks):
            writer.write(chunk)
            await writer.drain()
            if i < len(chunks) - 1:  # no event says "the peer read it": watch its buffer
                for _ in range(5000):
                    if any(conn._pending for conn in fast):
                        break
                    await asyncio.sleep(0.001)
                else:
                    pytest.fail("the first part never reached the agent")
        out = []
        for _ in range(expect):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            out.append(head.split(b" ", 2)[1] + b" " + await reader.readexactly(length))
        return out
    finally:
        writer.close()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nX-KMS-Token: {TOKEN}\r\n{extra}\r\n".encode()


async def test_pipelined_split_and_http10_requests(provider, clock):
    """Two requests in one segment go to aiohttp and both are answered in order; a request
    split across segments is still answered fast; HTTP/1.0 is aiohttp's."""
    provider.values.update({"a": PLANTED + "-a", "b": PLANTED + "-b"})
    state = make_state(provider, clock)
    async with serving(state) as server:
        fast_server = server.runner.server
        both = get("/secrets/a?format=raw") + get("/secrets/b?format=raw")
        assert await raw_exchange(server, [both], 2) == [b"200 " + PLANTED.encode() + b"-a", b"200 " + PLANTED.encode() + b"-b"]
        served = fast_server.served
        request = get("/secrets/a?format=raw")
        assert await raw_exchange(server, [request[:20], request[20:]], 1) == [b"200 " + PLANTED.encode() + b"-a"]
        assert fast_server.served == served + 1
        old = b"GET /secrets/a?format=raw HTTP/1.0\r\nX-KMS-Token: " + TOKEN.encode() + b"\r\n\r\n"
        assert await raw_exchange(server, [old], 1) == [b"200 " + PLANTED.encode() + b"-a"]
        assert fast_server.served == served + 1
        assert (await raw_exchange(server, [b"GET /secrets/a HTTP/1.1\r\nBad Header\r\n\r\n"], 1))[0].startswith(b"400 ")
        upgrade = get("/secrets/a?format=raw", "Connection: Upgrade\r\nUpgrade: websocket\r\n")
        assert await raw_exchange(server, [upgrade], 1) == [b"200 " + PLANTED.encode() + b"-a"]
        assert fast_server.served == served + 1


async def test_idle_fast_connections_close_after_the_keepalive_timeout(provider, clock):
    """An idle fast connection is closed after keepalive_timeout, as aiohttp closes its own."""
    provider.values["a"] = PLANTED
    state = make_state(provider, clock)
    async with serving(state, keepalive_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/secrets/a?format=raw"))
        await reader.readuntil(PLANTED.encode())
        assert await asyncio.wait_for(reader.read(), 5) == b""  # EOF: closed by the agent
        assert not server.runner.server.fast
        writer.close()


async def test_shutdown_finishes_a_loading_request_then_closes(provider, clock):
    """At shutdown idle fast connections close at once; one waiting on a load gets its
    answer first, then is closed."""
    provider.values.update({"a": PLANTED, "slow": PLANTED + "-slow"})
    state = make_state(provider, clock)
    server = AgentTestServer(create_app(state))
    await server.start_server()
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", server.port)
    idle_w.write(get("/secrets/a?format=raw"))
    await idle_r.readuntil(PLANTED.encode())
    provider.started.clear()
    provider.gate = asyncio.Event()
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", server.port)
    busy_w.write(get("/secrets/slow?format=raw"))
    await provider.started.wait()
    closing = asyncio.create_task(server.close())
    assert await asyncio.wait_for(idle_r.read(), 5) == b""
    provider.gate.set()
    assert (await asyncio.wait_for(busy_r.read(), 5)).endswith(PLANTED.encode() + b"-slow")  # then EOF
    await closing
    idle_w.close()
    busy_w.close()
