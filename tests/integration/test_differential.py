"""Differential fuzz: the listener against the grammar's own answer, byte stream by stream.

Hypothesis builds streams of pipelined requests, well-formed ones (targets, parameters,
methods and token headers drawn from what the grammar knows, and what it refuses) and,
somewhere, perhaps a malformed one, and cuts each stream into writes at random points.
The oracle computes each well-formed request's status from :mod:`kms_agent.grammar`
(``split_target``, ``Routes.find``, ``parse``), the state's token check and the
responder's status for an error, in the pipeline's documented order. The listener must
answer exactly one response per request, in order, with that status, never a 5xx; at the
first malformed request it answers 400 and closes, and nothing after it is answered.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms_agent import grammar, respond
from kms_agent.errors import (
    AgentError,
    FieldNotFound,
    MethodNotAllowed,
    ProxiedRequest,
    RoleNotAllowed,
    RouteNotFound,
    SecretNotFound,
    SecretNotJson,
)
from kms_agent.grammar import Dialect, Kind
from kms_agent.state import AgentState
from tests.conftest import PLANTED, TOKEN, FakeClock, ScriptedProvider
from tests.integration.test_api import make_state
from tests.integration.test_protocol import Response, read_one

VALUES = {
    "a": PLANTED + "-a",
    "db/json": json.dumps({"password": PLANTED, "port": 5432}),
    "x!y": PLANTED + "-xy",
}
NAMES = ["a", "db/json", "x!y", "x%21y", "missing", "bad%zz", "..", "a/../b", "%C3%28", ""]
NATIVE_QUERIES = [
    "",
    "format=raw",
    "format=json",
    "format=xml",
    "field=password",
    "field=port&format=raw",
    "field=",
    "field=nope",
    "refresh=true",
    "refresh=maybe",
    "version_stage=ACSCurrent",
    "version_stage=AWSCURRENT",
    "version_stage=bad%20stage",
    "unknown=1",
    "format=raw&format=raw",
]
AWS_QUERIES = ["", "versionStage=AWSCURRENT", "refreshNow=false", "refreshNow=2", "roleArn=x",
               "roleArn=arn:aws:iam::123456789012:role/r", "bogus=1"]  # fmt: skip
TOKENS = [
    b"X-KMS-Token: " + TOKEN.encode(),
    b"X-Aws-Parameters-Secrets-Token: " + TOKEN.encode(),
    b"X-Vault-Token: wrong-token-0000",
    b"X-KMS-Token: " + TOKEN.encode()[:-1],
]
EXTRAS = [b"User-Agent: fuzz", b"Accept: */*", b"X-Forwarded-For: 10.0.0.1",
          b"Forwarded: for=10.0.0.1", b"Content-Length: 0", b"Connection: keep-alive",
          b"Expect: 100-continue", b"X-Note: a b c"]  # fmt: skip
#: Framing errors: each is answered 400 (whatever its token) and ends the connection.
MALFORMED = [
    b"GET /secrets/a HTTP/1.1\nHost: agent\n\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: agent\r\nX-Note: a\x00b\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: agent\r\nX-Note: a\r\n b\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost : agent\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHo st: agent\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: agent\r\nHost: agent\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nX-KMS-Token: " + TOKEN.encode() + b"\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: a\r\nX-KMS-Token: x\r\nX-KMS-Token: y\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
    b"GET /secrets/a HTTP/1.2\r\nHost: agent\r\n\r\n",
    b"G\x01T /secrets/a HTTP/1.1\r\nHost: agent\r\n\r\n",
    b"GET /secrets/a\x7f HTTP/1.1\r\nHost: agent\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /secrets/a HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
]


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["native", "native", "aws-get", "aws-v1", "other"]))
    if kind == "native":
        query = draw(st.sampled_from(NATIVE_QUERIES))
        path = "/secrets/" + draw(st.sampled_from(NAMES))
    elif kind == "aws-get":
        query = "&".join(
            [*(f"secretId={n}" for n in draw(st.lists(st.sampled_from(NAMES), max_size=2))),
             draw(st.sampled_from(AWS_QUERIES))]
        ).strip("&")  # fmt: skip
        path = "/secretsmanager/get"
    elif kind == "aws-v1":
        query = draw(st.sampled_from(AWS_QUERIES))
        path = "/v1/" + draw(st.sampled_from(NAMES))
    else:
        query = draw(st.sampled_from(["", "x=1", "prefix=a", "prefix=%01"]))
        path = draw(
            st.sampled_from(
                ["/ping", "/healthz", "/readyz", "/secrets", "/nope", "/secrets/", "*",
                 "http://agent/secrets/a", "/secrets/a#frag", "//secrets/a"]
            )
        )  # fmt: skip
    return (path + ("?" + query if query else "")).encode()


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, dict[bytes, bytes], bytes]:
    """A well-formed request: (method, target, interesting headers, its bytes)."""
    method = draw(st.sampled_from([b"GET"] * 6 + [b"POST", b"DELETE", b"PUT"]))
    target = draw(targets())
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0"]))
    lines = [b"Host: agent"] if version == b"HTTP/1.1" or draw(st.booleans()) else []
    token = draw(st.sampled_from([None, *TOKENS]))
    if token is not None:
        lines.append(token)
    extras = draw(st.lists(st.sampled_from(EXTRAS), max_size=3, unique=True))
    lines += extras
    if version == b"HTTP/1.0" and b"Connection: keep-alive" not in lines:
        lines.append(b"Connection: keep-alive")  # so the pipeline goes on
    lines = draw(st.permutations(lines))
    headers = {}
    for line in lines:
        name, _, text = line.partition(b": ")
        headers[name.lower()] = text
    data = b"%s %s %s\r\n%s\r\n" % (method, target, version, b"".join(x + b"\r\n" for x in lines))
    return method, target, headers, data


def oracle(state: AgentState, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> int:
    """The status the pipeline's documented order gives, from the grammar and the state."""
    routes = grammar.routes(Dialect.NATIVE, state.config.server.response_type)
    dialect = Dialect.NATIVE
    try:
        target_error: AgentError | None = None
        try:
            path, query = grammar.split_target(target)
        except AgentError as err:  # refused after the token and method checks
            target_error, path, query = err, None, b""
        found = routes.find(path) if path is not None else None
        if found is not None:
            dialect = found[0].dialect
        if b"x-forwarded-for" in headers or b"forwarded" in headers:
            raise ProxiedRequest("forwarded")
        if found is None or not found[0].public:
            state.auth.check_raw(headers)
        if method != b"GET":
            raise MethodNotAllowed("method")
        if target_error is not None:
            raise target_error
        if found is None:
            raise RouteNotFound("route")
        request = grammar.parse(found, query, state.router.route)
        if request.route.kind is Kind.SECRET:
            if request.role_arn is not None:
                raise RoleNotAllowed("role")
            if request.name not in VALUES:
                raise SecretNotFound("missing")
            if request.field is not None:
                try:
                    data = json.loads(VALUES[request.name])
                except ValueError:
                    raise SecretNotJson("not json") from None
                if request.field not in data:
                    raise FieldNotFound("field")
    except AgentError as err:
        return respond.error(err, dialect, "oracle")[1]
    return 200


@pytest.fixture(name="listener")
async def _listener(serve):
    provider = ScriptedProvider()
    provider.values.update(VALUES)
    state = make_state(provider, FakeClock())
    client = await serve(state)
    return state, client.port


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    good=st.lists(requests(), min_size=1, max_size=8),
    bad=st.one_of(st.none(), st.sampled_from(MALFORMED)),
    after=st.lists(requests(), max_size=2),
    data=st.data(),
)
async def test_every_stream_gets_the_grammars_answers(listener, good, bad, after, data):
    """One response per request, in order, each with the oracle's status and never a 5xx;
    a malformed request is answered 400, then the connection closes and nothing after it
    is answered; a stream without one is answered whole, then closed at the caller's end."""
    state, port = listener
    stream = b"".join(r[3] for r in good)
    if bad is not None:
        stream += bad + b"".join(r[3] for r in after)
    cuts = sorted(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=6, unique=True)))
    parts = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    expected = [oracle(state, m, t, h) for m, t, h, _ in good]
    if bad is not None:
        expected.append(400)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        if bad is None:
            writer.write_eof()
        got: list[Response] = []
        for _ in expected:
            resp = await read_one(reader)
            assert resp is not None, f"closed after {len(got)} answers; expected {expected}"
            got.append(resp)
        assert await read_one(reader) is None, "an answer past the last request it should"
    finally:
        writer.close()
    assert [r.status for r in got] == expected, [r.body[:120] for r in got]
    assert all(r.status < 500 for r in got)
    for resp, status in zip(got, expected, strict=True):
        if status != 200:
            assert PLANTED.encode() not in resp.body
    if bad is not None:
        assert got[-1].headers.get("connection") == "close"
