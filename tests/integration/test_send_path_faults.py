"""Faults the one send path meets, for every cloud: a blackholed endpoint, a 200 that is
not the store's answer, an error page that is not the store's, a redirect, junk that
would overflow a parser. Each was found in review of the refactor onto that path (and
some were there before it); each test fails on the code before its fix.

Providers are built from config tables through the loader, as the agent builds them;
the stores are loopback aiohttp servers that answer what each test scripts.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from kms_agent import config as config_module
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    ConfigError,
    InvalidUpstreamRequest,
    SecretNotFound,
    Unavailable,
)
from kms_agent.providers import create
from kms_agent.providers._cloud import CloudProvider
from tests.conftest import PLANTED

VAULT_DATA = {"data": {"data": {"k": "v"}, "metadata": {"version": 1}}}
AWS_DATA = {"Name": "db", "SecretString": "v", "VersionId": "v1", "VersionStages": []}
HUAWEI_DATA = {
    "version": {
        "secret_string": "v",
        "version_metadata": {"id": "v1", "secret_name": "db", "version_stages": []},
    }
}
ALIBABA_DATA = {"SecretName": "db", "SecretData": "v", "VersionId": "v1"}
GOOD = {"vault": VAULT_DATA, "aws": AWS_DATA, "huawei": HUAWEI_DATA, "alibaba": ALIBABA_DATA}


def source(kind: str, urls: list[str], **extra: Any) -> CloudProvider:
    tables: dict[str, dict[str, Any]] = {
        "alibaba": {"credentials": {"type": "access_key", "access_key_id": "a",
                                    "access_key_secret": "b"}},
        "aws": {"region": "us-east-1",
                "credentials": {"type": "static", "access_key_id": "a", "secret_access_key": "b"}},
        "huawei": {"project_id": "p1", "credentials": {"type": "aksk", "ak": "a", "sk": "b"}},
        "vault": {"token": "t" * 16, "verify_answers": False},
    }  # fmt: skip
    given = {"name": "s", "provider": kind, "endpoints": urls, **tables[kind], **extra}
    table = {k: v for k, v in given.items() if v is not None}
    cfg = config_module.load(environ={}, overrides={"sources": [table]})
    made = create(cfg.sources[0], cfg, environ={})
    assert isinstance(made, CloudProvider)
    return made


async def read(provider: CloudProvider) -> Any:
    try:
        return await provider.get("db")  # type: ignore[attr-defined]  # every cloud's get
    finally:
        await provider.close()


class Script:
    """A store that answers each request with the next scripted (status, headers, body),
    the last one again once the script is spent; it records what it was sent."""

    def __init__(self, *answers: tuple[int, dict[str, str], bytes]) -> None:
        self.answers = list(answers)
        self.seen: list[web.Request] = []
        self.bodies: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        self.bodies.append(await request.read())
        status, headers, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return web.Response(status=status, headers=headers, body=body)

    async def url(self, aiohttp_server: Any) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        return str(server.make_url("")).rstrip("/")


def ok(kind: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(GOOD[kind]).encode()


@pytest.fixture(name="blackhole")
def _blackhole() -> Iterator[str]:
    """A loopback address that never completes a TCP handshake: a listener whose accept
    queue is full (nothing accepts), so further SYNs are dropped, as by a firewall."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    address = hole.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    select.select([], fillers[:1], [], 5)  # the first fills the queue
    yield f"http://127.0.0.1:{address[1]}"
    for filler in fillers:
        filler.close()
    hole.close()


@pytest.mark.parametrize("kind", ["vault", "aws"])
async def test_a_blackholed_first_endpoint_fails_over_within_the_deadline(
    aiohttp_server, blackhole: str, kind: str
) -> None:
    """The session's short connect timeout (3 s) holds for every call, so a first endpoint
    that swallows SYNs is given up in time and the retry goes to the second, inside the
    call's 6 s deadline (before, the call's total replaced it and the whole deadline went
    to the first endpoint: UpstreamTimeout)."""
    store = Script(ok(kind))
    provider = source(kind, [blackhole, await store.url(aiohttp_server)], timeout_seconds=6)
    record = await read(provider)
    assert record.version_id in ("1", "v1")
    assert len(store.seen) == 1


@pytest.mark.parametrize("kind", sorted(GOOD))
async def test_a_broken_200_is_a_failed_attempt_and_retried(aiohttp_server, kind: str) -> None:
    """A 200 whose body is not the store's answer (an HTML page, a truncated JSON) fails
    its attempt like a 503: retried, and the next answer is used (before, it was raised
    after the retries as Unavailable, with one request made)."""
    broken = (200, {"Content-Type": "text/html"}, b"<html>maintenance</html>")
    truncated: tuple[int, dict[str, str], bytes] = (200, {}, json.dumps(GOOD[kind]).encode()[:-3])
    store = Script(broken, truncated, ok(kind))
    provider = source(kind, [await store.url(aiohttp_server)])
    record = await read(provider)
    assert record.value.reveal() in (b"v", b'{"k":"v"}')
    assert len(store.seen) == 3


@pytest.mark.parametrize("kind", sorted(GOOD))
@pytest.mark.parametrize(
    ("status", "page", "expected"),
    [
        (404, b"<html><h1>404 Not Found</h1>nginx</html>", Unavailable),
        (404, b'{"message":"no Route matched with those values"}', Unavailable),
        (502, b"<html>Bad Gateway</html>", Unavailable),
        (400, b"<html>400 Bad Request</html>", InvalidUpstreamRequest),
        (403, b'{"message":"Forbidden"}', InvalidUpstreamRequest),
    ],
    ids=["html-404", "json-gateway-404", "html-502", "html-400", "json-waf-403"],
)
async def test_an_error_page_that_is_not_the_stores_never_drops_the_cache(
    aiohttp_server, kind: str, status: int, page: bytes, expected: type[AgentError]
) -> None:
    """A refusal that is not in the store's own shape (an ingress's HTML 404 during a
    rolling restart, a JSON gateway or WAF in front) says nothing about the secret: never
    SecretNotFound or AccessDenied, which drop cached values. A 404 or 5xx page is
    Unavailable (stale values served, the endpoint failed over); another 4xx page is this
    one call refused (not transient: it does not open the source's breaker)."""
    store = Script((status, {"Content-Type": "text/html"}, page))
    provider = source(kind, [await store.url(aiohttp_server)], max_attempts=1)
    with pytest.raises(AgentError, match="a page that is not its own") as caught:
        await read(provider)
    assert type(caught.value) is expected, caught.value
    assert not caught.value.drops_cache
    assert "nginx" not in str(caught.value)


#: Vault's record is read after its metadata check, outside the attempt (left as is).
@pytest.mark.parametrize("kind", sorted(set(GOOD) - {"vault"}))
async def test_a_200_of_the_wrong_shape_is_retried(aiohttp_server, kind: str) -> None:
    """A 200 that is JSON but not a version (``{}``) fails its attempt: the next answer
    is used (before, the record was read after the retries: Unavailable, one request)."""
    store = Script((200, {}, b"{}"), ok(kind))
    provider = source(kind, [await store.url(aiohttp_server)])
    record = await read(provider)
    assert record.value.reveal() == b"v"
    assert len(store.seen) == 2


@pytest.mark.parametrize(
    "header", ["ResourceNotFoundException", "ResourceNotFoundException:http://internal/x"]
)
@pytest.mark.parametrize("body", [b"{}", b""], ids=["json-without-type", "empty"])
async def test_aws_reads_the_error_type_header(aiohttp_server, header: str, body: bytes):
    """Secrets Manager's code may come only in ``x-amzn-ErrorType`` (with a URL suffix
    after a colon), with a JSON body lacking ``__type`` or no body at all."""
    store = Script((400, {"x-amzn-ErrorType": header}, body))
    provider = source("aws", [await store.url(aiohttp_server)], max_attempts=1)
    with pytest.raises(SecretNotFound) as caught:
        await read(provider)
    assert caught.value.upstream_code == "ResourceNotFoundException"


async def test_an_alibaba_200_that_carries_a_code_is_its_refusal(aiohttp_server) -> None:
    """Alibaba's OpenAPI answering 200 with a Code is read as that refusal (the old
    provider's rule, lost in the refactor: it became 'answered without SecretData')."""
    refusal = {"Code": "Forbidden.NoPermission", "Message": "no", "RequestId": "r"}
    store = Script((200, {"Content-Type": "application/json"}, json.dumps(refusal).encode()))
    provider = source("alibaba", [await store.url(aiohttp_server)])
    with pytest.raises(AccessDenied, match=r"Forbidden\.NoPermission"):
        await read(provider)


@pytest.mark.parametrize("kind", sorted(GOOD))
async def test_a_redirect_is_not_followed(aiohttp_server, kind: str) -> None:
    """A store answering 307 elsewhere: the agent does not follow (the signed request and
    its token would go to a host nobody configured, outside the limiter); the call is
    Unavailable naming the redirect, and the other host sees nothing."""
    elsewhere = Script(ok(kind))
    target = await elsewhere.url(aiohttp_server)
    store = Script((307, {"Location": f"{target}/stolen"}, b""))
    provider = source(kind, [await store.url(aiohttp_server)], max_attempts=1)
    with pytest.raises(Unavailable, match=r"redirect \(HTTP 307\)"):
        await read(provider)
    assert elsewhere.seen == []


@pytest.mark.parametrize("kind", ["vault", "huawei"])
async def test_a_get_carries_no_body_headers(aiohttp_server, kind: str) -> None:
    """A GET goes without a body, so without Content-Length or Content-Type: a strict
    proxy may refuse a GET with a body."""
    store = Script(ok(kind))
    provider = source(kind, [await store.url(aiohttp_server)])
    await read(provider)
    sent = store.seen[0]
    assert sent.method == "GET"
    assert "Content-Length" not in sent.headers
    if kind == "vault":
        assert "Content-Type" not in sent.headers
    assert store.bodies == [b""]


@pytest.mark.parametrize("kind", sorted(GOOD))
@pytest.mark.parametrize("status", [200, 400])
async def test_deeply_nested_json_is_unavailable_not_a_crash(
    aiohttp_server, kind: str, status: int
) -> None:
    """JSON nested past the parser's recursion limit, as an answer or as a refusal, is a
    broken answer (Unavailable; a refusal in no shape of the store's, a refused call), not
    a RecursionError escaping as a 500."""
    store = Script((status, {}, b"[" * 200_000))
    provider = source(kind, [await store.url(aiohttp_server)], max_attempts=1)
    with pytest.raises(AgentError) as caught:
        await read(provider)
    assert type(caught.value) is (Unavailable if status == 200 else InvalidUpstreamRequest)


async def test_a_huge_or_odd_creation_time_is_no_crash(aiohttp_server) -> None:
    """A creation time too big for a float, or not a number at all, reads as unknown."""
    body = {**AWS_DATA, "CreatedDate": 10**400}
    store = Script((200, {}, json.dumps(body).encode()))
    record = await read(source("aws", [await store.url(aiohttp_server)]))
    assert record.created == 0.0


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ({"max_attempts": 0}, r"sources\.s\.max_attempts: 0 is out of range"),
        ({"timeout_seconds": 0}, r"sources\.s\.timeout_seconds: 0 is out of range"),
        ({"rate_limit_qps": float("nan")}, r"sources\.s\.rate_limit_qps: nan is not a finite"),
        ({"rate_limit_qps": float("inf")}, r"sources\.s\.rate_limit_qps: inf is not a finite"),
    ],
)
def test_limits_that_could_never_work_are_refused_at_load(setting: dict[str, Any], said: str):
    """No attempts, no time or an endless quota: each made every call fail (an assertion
    error, an instant timeout); now a config error naming the key."""
    with pytest.raises(ConfigError, match=said):
        source("vault", ["http://127.0.0.1:1"], **setting)


def test_a_mistyped_secret_setting_is_not_echoed() -> None:
    """A token or secret id of the wrong type is named, its value not shown."""
    for key in ("token", "secret_id"):
        with pytest.raises(ConfigError, match=rf"sources\.s\.{key}: the value given") as caught:
            source("vault", ["http://127.0.0.1:1"], **{key: [PLANTED]})
        assert PLANTED not in str(caught.value)


async def test_a_proxy_page_at_vault_login_is_unavailable(aiohttp_server) -> None:
    """A login answered by a proxy's page (not Vault's JSON) is Unavailable, transient, so
    cached values are served: before, it was a non-transient 'login refused'."""
    store = Script((502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>"))
    url = await store.url(aiohttp_server)
    provider = source(
        "vault", [url], token=None, auth="approle", role_id="r", secret_id="s", max_attempts=1
    )
    with pytest.raises(Unavailable, match="a page that is not its own") as caught:
        await read(provider)
    assert caught.value.transient
    assert store.seen[0].path == "/v1/auth/approle/login"


@pytest.mark.parametrize(
    "value",
    [9e15, "9999-12-31T23:59:59-14:00", 1e300, -1.0],
    ids=["ms-far", "y10000", "huge", "neg"],
)
def test_a_time_no_dialect_can_render_reads_as_unknown(value: object) -> None:
    """A finite time outside 1970-9999 would crash every later render of the cached
    record (datetime's range); it reads as unknown, like an unreadable one."""
    from kms_agent.upstream import answer_time

    assert answer_time(value) == 0.0


@pytest.mark.parametrize(
    ("setting", "value"),
    [("timeout_seconds", 10**400), ("timeout_seconds", "9" * 400), ("rate_limit_qps", "9" * 400)],
    ids=["huge-int", "huge-text", "huge-qps-text"],
)
def test_numbers_too_big_for_a_float_are_refused_not_a_traceback(setting: str, value: object):
    """A number that overflows a float (or becomes inf) is a config error naming the key;
    it was an OverflowError traceback, or an inf that broke every call."""
    with pytest.raises(ConfigError, match=rf"sources\.s\.{setting}: .* is not a finite number"):
        source("vault", ["http://127.0.0.1:1"], **{setting: value})
