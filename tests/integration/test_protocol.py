"""The smuggling battery: the secrets listener over raw sockets, one hostile stream each.

Every case is sent to the real listener (the llhttp protocol and the pipeline over a test
state) on 127.0.0.1, whole and split across writes, and read with a deadline. What each
case proves, beyond its own expected answers:

* no token check is bypassed: a token anywhere but in a request's own head (a trailer, a
  body, a folded line, a request hidden in another's body) never unlocks a secret, and a
  planted secret value never appears in the answer to a refused request;
* never a response for the wrong request: exactly one response per answered request, in
  order (each secret's value names the request it answers);
* never a 5xx, never a hang: every read is under a deadline; a connection the case leaves
  open is proved in step by a last request answered on it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from kms_agent.config import ServerConfig
from tests.conftest import PLANTED, TOKEN, FakeClock, ScriptedProvider
from tests.integration.test_api import make_state

#: Seconds any one read may take before the case counts as a hang.
DEADLINE = 5.0
T = TOKEN.encode()
SERVER = ServerConfig()
#: Secrets the cases read: each value names its secret, so a body says which request it
#: answers.
NAMES = ("a", "b", "c", "d")


def value(name: str) -> bytes:
    return f"{PLANTED}-{name}".encode()


def get(name: str, *extra: bytes, version: bytes = b"HTTP/1.1", token: bool = True) -> bytes:
    """A well-formed read of secret ``name`` (raw), with ``extra`` header lines."""
    lines = [b"GET /secrets/" + name.encode() + b"?format=raw " + version, b"Host: agent"]
    if token:
        lines.append(b"X-KMS-Token: " + T)
    lines += extra
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_one(reader: asyncio.StreamReader, *, head: bool = False) -> Response | None:
    """One response, or None at a clean end of stream before any byte of it. A reset fails
    the test: an answer followed by a close must reach the caller whole.
    ``head``: the answer to a HEAD request (its Content-Length is not followed by a body)."""
    partial = b""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    except asyncio.IncompleteReadError as exc:
        partial = exc.partial
        raw = b""
    if not raw:
        assert partial == b"", f"a truncated response: {partial!r}"
        return None
    lines = raw.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, text = line.partition(":")
            key = name.strip().lower()
            assert key not in headers, f"header {key} written twice"
            headers[key] = text.strip()
    size = 0 if head else int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(size), DEADLINE)
    return Response(int(status), headers, body)


async def converse(port: int, parts: list[bytes], answers: int, *, closes: bool) -> list[Response]:
    """Send ``parts`` (one write each), read ``answers`` responses; then either the
    connection must close (``closes``) or a last request on it must be answered in step."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        out: list[Response] = []
        for i in range(answers):
            resp = await read_one(reader, head=i == 0 and parts[0].startswith(b"HEAD "))
            assert resp is not None, f"closed after {len(out)} of {answers} answers: {out}"
            out.append(resp)
        if closes:
            rest = await read_one(reader)
            assert rest is None, f"an answer past the last expected one: {rest}"
            assert out[-1].headers.get("connection") == "close"
            return out
        assert all(r.headers.get("connection") != "close" for r in out)
        writer.write(get("d", b"Connection: close"))
        await writer.drain()
        last = await read_one(reader)
        assert last is not None, "the connection did not answer a request after the case"
        assert (last.status, last.body) == (200, value("d")), "the connection is out of step"
        assert await read_one(reader) is None
        return out
    finally:
        writer.close()


def splits(data: bytes) -> list[list[bytes]]:
    """The stream whole, and cut into pieces at awkward places (inside tokens, CRLFs)."""
    thirds = [data[: len(data) // 3], data[len(data) // 3 : 2 * len(data) // 3]]
    thirds.append(data[2 * len(data) // 3 :])
    small = [data[i : i + 7] for i in range(0, len(data), 7)] if len(data) < 2048 else thirds
    return [[data], thirds, small]


@pytest.fixture(name="port")
async def _port(serve):
    provider = ScriptedProvider()
    provider.values.update({n: value(n).decode() for n in NAMES})
    client = await serve(make_state(provider, FakeClock()))
    return client.port


def check(responses: list[Response], expected: list[int | tuple[int, str]]) -> None:
    """Statuses in order; a 200 carries the value of the secret it answers; a refusal
    never carries a planted value; nothing is a 5xx."""
    assert [r.status for r in responses] == [e[0] if isinstance(e, tuple) else e for e in expected]
    for resp, want in zip(responses, expected, strict=True):
        assert resp.status < 500
        if isinstance(want, tuple):
            assert resp.body == value(want[1])
        else:
            assert PLANTED.encode() not in resp.body
            assert PLANTED not in str(resp.headers)


# ---------------------------------------------------------------------------- the cases


def fill(total: int) -> list[bytes]:
    """Header lines that make ``get("a", ...)``'s head ``total`` bytes long, each line
    under the field limit."""
    room = total - len(get("a"))
    lines: list[bytes] = []
    while room > 0:
        size = min(room, 4000)
        line = b"X-Fill-%02d: " % len(lines)
        lines.append(line + b"f" * max(0, size - len(line) - 2))
        room -= size
    return lines


CL = b"Content-Length: "
TE = b"Transfer-Encoding: "
HIDDEN = get("b")

#: id → (stream, expected answers in order, whether the connection closes after them).
#: A 200 is written ``(200, name)``: it must carry that secret's value.
CASES: dict[str, tuple[bytes, list[int | tuple[int, str]], bool]] = {
    # Content-Length and Transfer-Encoding: never a body, never the next request in one.
    "duplicate-cl": (get("a", CL + b"0", CL + b"0") + HIDDEN, [400], True),
    "conflicting-cl": (get("a", CL + b"0", CL + b"%d" % len(HIDDEN)) + HIDDEN, [400], True),
    "cl-and-te": (get("a", CL + b"5", TE + b"chunked") + b"0\r\n\r\n" + HIDDEN, [400], True),
    "te-chunked": (get("a", TE + b"chunked") + b"0\r\n\r\n" + HIDDEN, [400], True),
    "te-chunked-identity": (get("a", TE + b"chunked, identity") + b"0\r\n\r\n", [400], True),
    "te-leading-space": (get("a", TE + b" chunked") + b"0\r\n\r\n" + HIDDEN, [400], True),
    "te-space-before-colon": (get("a", b"Transfer-Encoding : chunked") + b"0\r\n\r\n", [400], True),
    "te-gzip": (get("a", TE + b"gzip") + HIDDEN, [400], True),
    "cl-plus": (get("a", CL + b"+0") + HIDDEN, [400], True),
    "cl-negative": (get("a", CL + b"-1") + HIDDEN, [400], True),
    "cl-leading-zero": (get("a", CL + b"00") + HIDDEN, [400], True),
    "body-on-get": (get("a", CL + b"%d" % len(HIDDEN)) + HIDDEN, [400], True),
    "request-in-body": (
        get("a", CL + b"%d" % len(HIDDEN)) + HIDDEN + get("c"),
        [400],
        True,
    ),
    "zero-cl-then-next": (get("a", CL + b"0") + get("b"), [(200, "a"), (200, "b")], False),
    # The token only in a chunked trailer section: trailers are never headers.
    "token-in-trailer": (
        get("a", TE + b"chunked", token=False) + b"0\r\nX-KMS-Token: " + T + b"\r\n\r\n",
        [401],
        True,
    ),
    "token-in-trailer-after-chunk": (
        get("a", TE + b"chunked", token=False)
        + b"5\r\nhello\r\n0\r\nX-KMS-Token: "
        + T
        + b"\r\n\r\n"
        + HIDDEN,
        [401],
        True,
    ),
    "token-in-body": (
        get("a", CL + b"%d" % (len(T) + 13), token=False) + b"X-KMS-Token: " + T,
        [401],
        True,
    ),
    # Line syntax: obs-fold, bare LF, NUL and control bytes, whitespace before a colon.
    "obs-fold": (get("a", b"X-Note: one", b" two") + HIDDEN, [400], True),
    "obs-fold-token": (get("a", b"X-KMS-Token: x", b" " + T, token=False), [400], True),
    "bare-lf": (get("a").replace(b"\r\n", b"\n") + HIDDEN, [400], True),
    "bare-lf-one-line": (get("a").replace(b"Host: agent\r\n", b"Host: agent\n"), [400], True),
    "bare-cr": (get("a").replace(b"Host: agent\r\n", b"Host: agent\r"), [400], True),
    "nul-in-target": (get("a").replace(b"/secrets/a", b"/secrets/a\x00b"), [400], True),
    "control-in-target": (get("a").replace(b"/secrets/a", b"/secrets/a\x01b"), [400], True),
    "del-in-target": (get("a").replace(b"/secrets/a", b"/secrets/a\x7fb"), [400], True),
    "tab-in-target": (get("a").replace(b"/secrets/a", b"/secrets/a\tb"), [400], True),
    "nul-in-header": (get("a", b"X-Note: a\x00b") + HIDDEN, [400], True),
    "control-in-header": (get("a", b"X-Note: a\x01b") + HIDDEN, [400], True),
    "nul-in-token": (
        get("a", b"X-KMS-Token: " + T[:4] + b"\x00" + T[4:], token=False),
        [400],
        True,
    ),
    "space-before-colon": (get("a", b"X-KMS-Token : " + T, token=False), [400], True),
    "nul-in-name": (get("a", b"X-No\x00te: a"), [400], True),
    "lower-case-method": (get("a").replace(b"GET", b"get", 1), [400], True),
    # Pipelining: earlier requests answered in order, the malformed one 400, then close.
    "pipelined-then-malformed": (
        get("a") + get("b") + b"GET /secrets/c HTTP/1.1\r\nHo st: x\r\n\r\n" + get("c"),
        [(200, "a"), (200, "b"), 400],
        True,
    ),
    "pipelined-then-no-host": (
        get("c") + b"GET /secrets/a HTTP/1.1\r\nX-KMS-Token: " + T + b"\r\n\r\n" + get("b"),
        [(200, "c"), 400],
        True,
    ),
    "pipelined-refused-then-good": (
        get("a", token=False) + get("b") + get("c", b"X-KMS-Token: wrong-token", token=False),
        [401, (200, "b"), 403],
        False,
    ),
    # Target forms: only origin-form; absolute- and asterisk-form refused, in step.
    "absolute-form": (get("a").replace(b"/secrets/a", b"http://agent/secrets/a"), [400], False),
    "absolute-form-other-host": (
        get("a").replace(b"/secrets/a", b"http://evil.example/secrets/a"),
        [400],
        False,
    ),
    "asterisk-form": (  # OPTIONS is refused as a method (405) before its target
        b"OPTIONS * HTTP/1.1\r\nHost: agent\r\nX-KMS-Token: " + T + b"\r\n\r\n",
        [405],
        False,
    ),
    "asterisk-get": (get("a").replace(b"/secrets/a?format=raw", b"*"), [400], False),
    "connect": (  # the method is refused in its place, before the authority-form target
        b"CONNECT agent:443 HTTP/1.1\r\nHost: agent:443\r\nX-KMS-Token: "
        + T
        + b"\r\n\r\n"
        + HIDDEN,
        [405],
        True,
    ),
    "connect-origin-form": (
        b"CONNECT /secrets/a HTTP/1.1\r\nHost: agent\r\nX-KMS-Token: " + T + b"\r\n\r\n" + HIDDEN,
        [405],
        True,
    ),
    # Expect: no interim 100 is ever sent; with a body announced, refused and closed.
    "expect-100-no-body": (get("a", b"Expect: 100-continue"), [(200, "a")], False),
    "expect-100-with-body": (get("a", b"Expect: 100-continue", CL + b"10"), [400], True),
    # Upgrade: answered as HTTP/1.1, then closed; nothing after it in the write is answered.
    "upgrade-h2c": (
        get(
            "a",
            b"Connection: Upgrade, HTTP2-Settings",
            b"Upgrade: h2c",
            b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
        )
        + HIDDEN,
        [(200, "a")],
        True,
    ),
    "upgrade-without-connection": (get("a", b"Upgrade: h2c") + HIDDEN, [(200, "a")], True),
    "upgrade-websocket": (
        get("a", b"Connection: upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13")
        + HIDDEN,
        [(200, "a")],
        True,
    ),
    "upgrade-unauthenticated": (
        get("a", b"Connection: Upgrade", b"Upgrade: h2c", token=False) + HIDDEN,
        [401],
        True,
    ),
    "h2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + HIDDEN, [400], True),
    # Versions and Host.
    "http10": (get("a", version=b"HTTP/1.0") + HIDDEN, [(200, "a")], True),
    "http10-keep-alive": (
        get("a", b"Connection: keep-alive", version=b"HTTP/1.0")
        + get("b", b"Connection: close", version=b"HTTP/1.0"),
        [(200, "a"), (200, "b")],
        True,
    ),
    "http11-no-host": (
        b"GET /secrets/a?format=raw HTTP/1.1\r\nX-KMS-Token: " + T + b"\r\n\r\n" + HIDDEN,
        [400],
        True,
    ),
    "duplicate-host": (get("a", b"Host: other") + HIDDEN, [400], True),
    "connection-close": (get("a", b"Connection: close") + HIDDEN, [(200, "a")], True),
    "http12": (get("a", version=b"HTTP/1.2"), [400], True),
    # Tokens: a repeated token header is refused whatever its values; a wrong token in the
    # header checked first is refused even when another header holds the right one.
    "duplicate-token": (get("a", b"X-KMS-Token: " + T) + HIDDEN, [400], True),
    "duplicate-token-wrong-first": (
        get("a", b"X-KMS-Token: wrong-token", b"X-KMS-Token: " + T, token=False),
        [400],
        True,
    ),
    "wrong-token-right-in-other-header": (
        get("a", b"X-KMS-Token: wrong-token", b"X-Vault-Token: " + T, token=False),
        [403],
        False,
    ),
    "method-head": (get("a").replace(b"GET", b"HEAD", 1), [405], False),
    "method-post-no-body": (get("a", CL + b"0").replace(b"GET", b"POST", 1), [405], False),
    "method-post-with-body": (
        get("a", CL + b"%d" % len(HIDDEN)).replace(b"GET", b"POST", 1) + HIDDEN,
        [405],
        True,
    ),
    # Oversized heads: the line, one field, the field count, the whole head.
    "oversized-line": (
        get("a").replace(b"?format=raw", b"?format=raw&x=" + b"x" * SERVER.max_header_bytes),
        [400],
        True,
    ),
    "oversized-field": (
        get("a", b"X-Big: " + b"x" * SERVER.max_header_bytes) + HIDDEN,
        [400],
        True,
    ),
    "too-many-fields": (
        get("a", *(b"X-F%d: v" % i for i in range(SERVER.max_headers + 1))) + HIDDEN,
        [400],
        True,
    ),
    "oversized-head": (
        get("a", *(b"X-F%d: " % i + b"y" * 4000 for i in range(SERVER.max_head_bytes // 4000 + 1)))
        + HIDDEN,
        [400],
        True,
    ),
    "head-just-over-budget": (
        get("a", *fill(SERVER.max_head_bytes + 40)) + HIDDEN,
        [400],
        True,
    ),
    "head-just-under-budget": (get("a", *fill(SERVER.max_head_bytes - 40)), [(200, "a")], False),
    "pipelined-long-heads": (
        b"".join(get(NAMES[i % 4], b"X-Pad: " + b"p" * 2011) for i in range(12)),
        [(200, NAMES[i % 4]) for i in range(12)],
        False,
    ),
    "pipelined-many": (
        b"".join(get(NAMES[i % 4]) for i in range(300)),
        [(200, NAMES[i % 4]) for i in range(300)],
        False,
    ),
    "fields-at-the-limit": (
        get("a", *(b"X-F%d: v" % i for i in range(SERVER.max_headers - 3))),
        [(200, "a")],
        False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_smuggling_battery(port, name):
    """Each hostile stream, whole and split across writes: exactly its expected answers, in
    order, none a 5xx, no planted value in a refusal, and then the close (or a connection
    still in step) the case calls for."""
    data, expected, closes = CASES[name]
    for parts in splits(data):
        check(await converse(port, parts, len(expected), closes=closes), expected)


async def test_upgrade_in_one_write_answers_only_the_first(port):
    """``Upgrade: h2c`` with a second request in the same write: the first is answered as
    HTTP/1.1, the second never is (no ``101``, no HTTP/2), and the connection closes."""
    data = get("a", b"Connection: Upgrade", b"Upgrade: h2c") + get("b")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    rest = await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()
    assert rest.count(b"HTTP/1.1 ") == 1
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert value("a") in rest
    assert value("b") not in rest


async def test_a_refused_request_never_shows_the_value(port):
    """Refused requests for a secret (no token, wrong token, a token only in a trailer or
    a body) never carry the secret's value, in any byte of the stream."""
    streams = [
        get("a", token=False),
        get("a", b"X-KMS-Token: wrong-token", token=False),
        get("a", TE + b"chunked", token=False) + b"0\r\nX-KMS-Token: " + T + b"\r\n\r\n",
        get("a", CL + b"%d" % (len(T) + 13), token=False) + b"X-KMS-Token: " + T,
    ]
    for stream in streams:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(stream + get("b", b"Connection: close", token=False))
        everything = await asyncio.wait_for(reader.read(), DEADLINE)
        writer.close()
        assert everything.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 403 "))
        assert PLANTED.encode() not in everything
