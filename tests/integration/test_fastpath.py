"""The fast path in front of aiohttp: it answers exactly what the application would, and
leaves everything it should not answer to aiohttp, over the same connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import replace

import aiohttp
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


async def read_response(reader) -> tuple[bytes, bytes]:
    """One response's status code and body, by its Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return head.split(b" ", 2)[1], await reader.readexactly(length)


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
            status, body = await read_response(reader)
            out.append(status + b" " + body)
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


# --------------------------------------------------------------------------- differential fuzz


class FixedProvider(ScriptedProvider):
    """Scripted values with a fixed creation time, so two agents render identical bodies."""

    async def get(self, name, *, version_id=None, version_stage=None):
        record = await super().get(name, version_id=version_id, version_stage=version_stage)
        return replace(record, created=1_700_000_000.0)


_FAST_ANSWERS = [0]  # requests the fast path answered during the fuzz, across examples
#: Request ids (in headers and error bodies) and the Date header's value.
_VARYING = re.compile(rb"\b[0-9a-f]{8}-[0-9a-f]+\b|(?<=Date: )[^\r]*")


def responses(stream: bytes) -> list[tuple]:
    """The responses in a byte stream, without what differs by design (date, request id)."""
    out: list[tuple] = []
    # Blanked, not removed: lengths stay right, and a HEAD answer's stream parses as sent.
    stream = _VARYING.sub(lambda m: b"0" * len(m[0]), stream)

    class Collect:
        def on_message_begin(self):
            self.headers, self.body = [], b""

        def on_header(self, name, value):
            self.headers.append((name.lower(), value))

        def on_body(self, body):
            self.body += body

        def on_message_complete(self):
            out.append((parser.get_status_code(), sorted(self.headers), self.body))

    parser = httptools.HttpResponseParser(Collect())
    try:
        parser.feed_data(stream)
    except httptools.HttpParserError:
        out.append(("unparsable", stream[-200:]))
    return out


_TOKEN_HEADERS = [f"X-KMS-Token: {TOKEN}", f"x-kms-token: {TOKEN}", f"X-Vault-Token: {TOKEN}",
                  f"X-Aws-Parameters-Secrets-Token: {TOKEN}", "X-KMS-Token: wrong-token-0123456789"]
_OTHER_HEADERS = ["Host: x", "Connection: close", "Connection: keep-alive", "Connection: Upgrade",
                  "Upgrade: websocket", "Expect: 100-continue", "X-Forwarded-For: 10.0.0.1",
                  "Forwarded: for=1.2.3.4", "Content-Length: 0", "Accept: */*", "X-Long: " + "l" * 9000,
                  "Bad Header", "X-Fold: a\r\n b", f"X-KMS-Token:{TOKEN}", "Transfer-Encoding: chunked"]
_TARGETS = st.tuples(
    st.sampled_from(["/secrets/", "/v1/", "/secretsmanager/get?secretId=", "/secrets?prefix=", "/", "/healthz",
                     "http://x/secrets/", "//secrets/"]),
    st.sampled_from(["db", "aigw!secret-abc", "db/json", "missing", "long", ""]),
    st.sampled_from([""] * 6) | st.text(alphabet=list("%+#?&=;./!-_~ \x7fé"), max_size=6),
    st.lists(st.sampled_from(["format=raw", "format=json", "format=xml", "refresh=false", "refresh=true",
                              "refreshNow=0", "versionStage=AWSCURRENT", "version_id=v1", "field=password",
                              "x=1", "secretId=db", ""]), max_size=3),
).map(lambda t: t[0] + t[1] + t[2] + (("&" if "?" in t[0] + t[2] else "?") + "&".join(t[3]) if t[3] else ""))


#: Headers that must send a request to aiohttp: drawn more often than the rest.
_RISKY = ["X-Forwarded-For: 10.0.0.1", "Forwarded: for=1.2.3.4", "Connection: close",
          "Expect: 100-continue", "Content-Length: 0\r\nContent-Length: 0"]
_GOOD_TARGETS = st.tuples(
    st.sampled_from(["/secrets/", "/v1/", "/secretsmanager/get?secretId="]),
    st.sampled_from(["db", "aigw!secret-abc", "db/json", "long"]),
    st.sampled_from(["", "?format=raw", "?versionStage=AWSCURRENT", "?format=json&refresh=false"]),
).map(lambda t: t[0] + t[1] + (t[2].replace("?", "&") if "?" in t[0] else t[2]))
_MUTATIONS = ["method", "version", "token", "header", "target", "body"]


@st.composite
def raw_requests(draw) -> bytes:
    """A request the fast path would answer, with up to two things changed."""
    changes = draw(st.lists(st.sampled_from(_MUTATIONS), max_size=2))
    method, version, target = "GET", "HTTP/1.1", draw(_GOOD_TARGETS)
    headers = ["Host: x", draw(st.sampled_from(_TOKEN_HEADERS[:4]))]
    body = b""
    for change in changes:
        if change == "method":
            method = draw(st.sampled_from(["POST", "HEAD", "get", "G ET", "PUT"]))
        elif change == "version":
            version = draw(st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/1.1 x"]))
        elif change == "token":
            headers[1] = draw(st.sampled_from([*_TOKEN_HEADERS, "X-Other: 1"]))
        elif change == "header":
            headers.append(draw(st.sampled_from(_OTHER_HEADERS + _RISKY * 4)))
        elif change == "target":
            target = draw(_TARGETS)
        elif "Content-Length: 0" not in headers and not body:
            headers.append("Content-Length: 3")
            body = b"abc"
    if "Transfer-Encoding: chunked" in headers:
        body = b"0\r\n\r\n"
    headers = draw(st.permutations(headers))
    head = f"{method} {target} {version}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    return head.encode("utf-8") + body


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``; once something comes back, a closing /ping (sent with ``data`` it would
    make every request a pipelined one); everything the agent sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        try:  # a request still waiting for bytes gets no answer: go on after a while
            first = await asyncio.wait_for(reader.read(65536), 0.5)
            if first == _CONTINUE:  # the answer follows: read it before the /ping, which a
                first += await asyncio.wait_for(reader.read(65536), 0.5)  # closed one resets
        except TimeoutError:
            first = b""
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await writer.drain()
        return first + await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


@pytest.fixture(name="twin_servers")
async def _twin_servers(clock):
    """Two agents on identical providers: one with the fast path, one aiohttp only."""
    values = {"db": PLANTED, "aigw!secret-abc": PLANTED + "-aigw",
              "db/json": json.dumps({"password": PLANTED}), "long": PLANTED + "L" * 400}
    servers = []
    _FAST_ANSWERS[0] = 0
    for fast in (True, False):
        provider = FixedProvider()
        provider.values.update(values)
        state = make_state(provider, clock)
        set_fast(state, fast)
        server = AgentTestServer(create_app(state))
        await server.start_server()
        servers.append(server)
    yield servers
    for server in servers:
        await server.close()
    assert _FAST_ANSWERS[0] > 20, "the fuzz hardly reached the fast path"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=raw_requests(), second=st.one_of(st.none(), st.none(), raw_requests()))
async def test_fuzz_the_fast_path_answers_every_byte_stream_as_aiohttp_does(twin_servers, first, second):
    """Arbitrary (well-framed or not) requests, alone or pipelined, get the same responses,
    status for status and byte for byte (date and request ids aside), from the agent with
    the fast path as from aiohttp alone — and never a 5xx."""
    data = first + (second or b"")
    fast, slow = twin_servers
    before = fast.runner.server.served
    stream = await exchange(fast.port, data)
    _FAST_ANSWERS[0] += fast.runner.server.served - before
    assert responses(stream) == responses(await exchange(slow.port, data)), data
    assert re.search(rb"HTTP/1\.[01] 5\d\d ", stream) is None, stream


async def test_a_bug_while_loading_is_answered_by_aiohttp_not_left_hanging(provider, clock, monkeypatch):
    """If the cache itself fails unexpectedly during a fast load, the connection is handed
    to aiohttp, whose guard answers the JSON 500 with a request id; nothing hangs."""
    provider.values["db"] = PLANTED
    state = make_state(provider, clock)

    async def broken(key, *, force_refresh=False):
        raise RuntimeError("cache bug")

    monkeypatch.setattr(state.cache, "load", broken)
    async with serving(state) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/secrets/db?format=raw"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 500 ")
        writer.close()


async def test_repeated_request_bytes_skip_parsing_but_not_token_rotation_or_reload(provider, clock):
    """A connection that repeats a request byte for byte is answered without re-parsing;
    once the tokens rotate (or the config reloads) the same bytes are checked afresh: a
    removed token is refused, a new response shape is used."""
    from kms_agent.auth import load_tokens
    from kms_agent.config import AuthConfig

    provider.values["db"] = PLANTED
    state = make_state(provider, clock)
    async with serving(state) as server:
        fast_server = server.runner.server
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = get("/secretsmanager/get?secretId=db")

        async def once() -> tuple[bytes, bytes]:
            writer.write(request)
            return await read_response(reader)

        answers = [await once() for _ in range(3)]
        assert fast_server.served == 3
        assert all(status == b"200" and json.loads(body)["SecretString"] == PLANTED for status, body in answers)
        (conn,) = fast_server.fast
        assert len(conn._seen) == 1  # remembered once, reused twice
        state.config = replace(state.config, server=replace(state.config.server, response_type="kms"))
        status, body = await once()
        assert (status, json.loads(body)["SecretData"]) == (b"200", PLANTED)
        other = "rotated-token-" + "r" * 20
        state.auth.update(load_tokens(AuthConfig(), {"KMS_TOKEN": other}))
        status, body = await once()
        assert status == b"403"
        assert json.loads(body)["error"]["code"] == "Forbidden"
        assert fast_server.served == 4
        writer.close()


async def test_a_remembered_target_still_checks_every_requests_headers(provider, clock):
    """Requests that differ only in other headers (a trace id) reuse the checks of their
    URL, but each one's headers are checked: a forwarded request or a wrong token on a
    remembered URL goes to aiohttp and is refused; a reload forgets the URL."""
    provider.values["db"] = PLANTED
    state = make_state(provider, clock)
    async with serving(state) as server:
        fast_server = server.runner.server
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def ask(extra: dict[str, str], token: str = TOKEN) -> tuple[bytes, bytes]:
            lines = "".join(f"{k}: {v}\r\n" for k, v in {"X-KMS-Token": token, **extra}.items())
            writer.write(f"GET /secretsmanager/get?secretId=db HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
            return await read_response(reader)

        for n in range(3):
            status, body = await ask({"X-Trace": str(n)})
            assert (status, json.loads(body)["SecretString"]) == (b"200", PLANTED)
        (conn,) = fast_server.fast
        assert fast_server.served == 3 and len(conn._targets) == 1 and len(conn._seen) == 3
        state.config = replace(state.config, server=replace(state.config.server, response_type="kms"))
        status, body = await ask({"X-Trace": "after-reload"})
        assert (status, json.loads(body)["SecretData"]) == (b"200", PLANTED)
        assert fast_server.served == 4 and len(conn._targets) == 1
        status, body = await ask({"X-Trace": "4"}, token="w" * 32)
        assert status == b"403" and fast_server.served == 4
        writer.close()
    async with serving(state) as server:
        fast_server = server.runner.server
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert (await ask({"X-Trace": "a"}))[0] == b"200"
        status, _ = await ask({"X-Trace": "b", "X-Forwarded-For": "10.0.0.1"})
        assert status == b"400" and fast_server.served == 1
        writer.close()


def test_response_heads_are_shared_per_length_and_bounded():
    """A head is built once per content type and body length, and only so many are kept."""
    from kms_agent.fastpath import _HEADS_MAX, _Heads

    heads = _Heads(b"application/json")
    for size in range(2 * _HEADS_MAX + 1):
        assert heads[size].endswith(b"\r\nContent-Length: %d\r\nX-Request-Id: " % size)
        assert heads[size] is heads[size]
    assert 0 < len(heads) <= _HEADS_MAX
    assert heads[5].startswith(b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Type: application/json\r\n")
