"""The one send path every cloud shares (``providers/_cloud.py`` + ``upstream.send``):
classification is pure, side effects follow the error's type in one place, answers are
read within a bound, and every provider's refusals go through it.

Providers are built from config tables through the loader (``config.load``), the way the
agent builds them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kms_agent import config as config_module
from kms_agent import upstream
from kms_agent.credentials import Credentials, StaleCredentials
from kms_agent.errors import AccessDenied, AgentError, Throttled, Unavailable
from kms_agent.providers import create
from kms_agent.providers._cloud import CloudProvider
from kms_agent.providers.aws import Provider as AwsProvider
from kms_agent.providers.vault import Provider as VaultProvider
from kms_agent.signing import Request

STATIC = Credentials("AKID", "secret-planted-in-send-path", None)
TEMPORARY = Credentials("ASIA", "secret-planted-in-send-path", "token-planted", 4e9)

SOURCES: dict[str, dict[str, Any]] = {
    "alibaba": {
        "region": "cn-hangzhou",
        "credentials": {"type": "access_key", "access_key_id": "a", "access_key_secret": "b"},
    },
    "aws": {
        "region": "us-east-1",
        "credentials": {"type": "static", "access_key_id": "a", "secret_access_key": "b"},
    },
    "huawei": {
        "region": "cn-north-4",
        "project_id": "p1",
        "credentials": {"type": "aksk", "ak": "a", "sk": "b"},
    },
    "vault": {"address": "http://127.0.0.1:8200", "token": "t" * 16},
}

#: A throttling answer, and an answer refusing expired temporary credentials, per cloud.
THROTTLED: dict[str, tuple[int, bytes]] = {
    "alibaba": (400, b'{"Code":"Rejected.Throttling","Message":"slow down"}'),
    "aws": (400, b'{"__type":"ThrottlingException","message":"Rate exceeded"}'),
    "huawei": (429, b'{"error_code":"APIG.0308","error_msg":"throttled"}'),
    "vault": (429, b'{"errors":["rate limit quota exceeded"]}'),
}
EXPIRED: dict[str, tuple[int, bytes]] = {
    "alibaba": (400, b'{"Code":"InvalidSecurityToken.Expired","Message":"expired"}'),
    "aws": (400, b'{"__type":"ExpiredTokenException","message":"expired"}'),
    "huawei": (401, b'{"error_code":"APIGW.0301","error_msg":"expired"}'),
}


def provider(kind: str, **extra: Any) -> CloudProvider:
    given = {"name": kind, "provider": kind, **SOURCES[kind], **extra}
    table = {k: v for k, v in given.items() if v is not None}
    cfg = config_module.load(environ={}, overrides={"sources": [table]})
    made = create(cfg.sources[0], cfg, environ={})
    assert isinstance(made, CloudProvider)
    return made


def held(source: CloudProvider) -> Credentials | None:
    """The credentials the source holds now (read through a call, so that mypy does not
    carry one assert's narrowing past the call that changes them)."""
    return source.credentials.current


@pytest.mark.parametrize("kind", sorted(THROTTLED))
def test_classify_is_pure_and_refusal_counts_throttling(kind: str) -> None:
    """classify turns a throttling answer into Throttled and changes nothing (asked twice,
    nothing is counted); the side effect, counting, is taken by _refused, once."""
    source = provider(kind)
    status, body = THROTTLED[kind]
    for _ in range(2):
        error = source.classify(status, {}, body, "db", TEMPORARY)
        assert isinstance(error, Throttled), error
    assert source.stats.throttled == 0
    assert source._refused(error, TEMPORARY, source.credentials) is error
    assert source.stats.throttled == 1


@pytest.mark.parametrize("kind", sorted(EXPIRED))
async def test_stale_credentials_are_invalidated_by_refusal_not_by_classify(kind: str) -> None:
    """Expired temporary credentials: classify says StaleCredentials without touching the
    held credentials; _refused invalidates exactly those, so the next get() fetches anew.
    Static credentials refused the same way are not 'stale' (a retry would not help)."""
    source = provider(kind)
    fetched = await source.credentials.get()
    status, body = EXPIRED[kind]
    temporary = Credentials(fetched.access_key_id, "x", "token", 4e9)
    error = source.classify(status, {}, body, "db", temporary)
    assert isinstance(error, StaleCredentials)
    assert held(source) is fetched  # classify invalidated nothing
    source._refused(error, fetched, source.credentials)
    assert held(source) is None
    assert not isinstance(source.classify(status, {}, body, "db", STATIC), StaleCredentials)
    await source.close()


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_classify_survives_any_body(kind: str) -> None:
    """An HTML error page, an empty body or JSON that is not an object is still an error
    of the vocabulary (never an exception out of classify, never a value in its words)."""
    source = provider(kind)
    for status in (400, 403, 404, 500, 503):
        for body in (b"<html>planted-page</html>", b"", b"[1,2]", b'"text"', b"\xff\xfe"):
            error = source.classify(status, {}, body, "db", STATIC)
            assert isinstance(error, AgentError)
            assert "planted" not in str(error) and "planted" not in (error.hint or "")


async def test_vault_denial_after_rotation_is_stale_and_retried(tmp_path) -> None:
    """Vault token auth: a 403 is a denial (AccessDenied) unless the token file now holds
    another token; then _refused makes it StaleCredentials (the retry re-reads the file)."""
    token_file = tmp_path / "token"
    token_file.write_text("s.first-token-planted")
    source = provider("vault", token_file=str(token_file))
    creds = await source.credentials.get()
    denied = source.classify(403, {}, b'{"errors":["permission denied"]}', "db", creds)
    assert isinstance(denied, AccessDenied)
    assert source._refused(denied, creds, source.credentials) is denied
    token_file.write_text("s.second-token-planted")
    rotated = source._refused(denied, creds, source.credentials)
    assert isinstance(rotated, StaleCredentials)
    assert held(source) is None
    await source.close()


async def test_answer_over_the_bound_is_refused_not_read(aiohttp_server, monkeypatch) -> None:
    """An upstream answering more than MAX_ANSWER_BYTES is Unavailable, whether it says
    so in Content-Length or streams it chunked; an answer within the bound is read whole."""
    monkeypatch.setattr(upstream, "MAX_ANSWER_BYTES", 1024)
    sent: list[str] = []

    async def sized(request: web.Request) -> web.StreamResponse:
        sent.append("sized")
        return web.Response(body=b"x" * 2048)

    async def chunked(request: web.Request) -> web.StreamResponse:
        sent.append("chunked")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(8):
            await resp.write(b"y" * 512)
        await resp.write_eof()
        return resp

    async def small(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"z" * 1024)

    app = web.Application()
    app.router.add_get("/sized", sized)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/small", small)
    server = await aiohttp_server(app, host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        for path in ("/sized", "/chunked"):
            with pytest.raises(Unavailable, match="more than"):
                await upstream.send(session, base, Request("GET", path), what="test", timeout=5)
        answer = await upstream.send(session, base, Request("GET", "/small"), what="t", timeout=5)
    assert sent == ["sized", "chunked"]
    assert (answer.status, len(answer.body)) == (200, 1024)


async def test_send_signs_what_it_sends(aiohttp_server) -> None:
    """upstream.send addresses the request to the base URL's host, signs it with the
    signer, and sends the exact query string and headers that were signed."""
    seen: dict[str, Any] = {}

    class Recorder:
        def sign(self, request: Request, credentials: Credentials, now: float) -> dict[str, str]:
            seen["signed"] = (request.headers["Host"], request.target, credentials.access_key_id)
            return {**request.headers, "X-Signed": "yes"}

    async def echo(request: web.Request) -> web.Response:
        seen["received"] = (request.host, request.path_qs, request.headers.get("X-Signed"))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/v1/{tail:.*}", echo)
    server = await aiohttp_server(app, host="127.0.0.1")
    base = str(server.make_url("")).rstrip("/")
    request = Request("GET", "/v1/a%21b", {"z": "1 2", "a": "x/y!"})
    async with aiohttp.ClientSession() as session:
        answer = await upstream.send(
            session, base, request, what="t", timeout=5, signer=Recorder(), credentials=STATIC
        )
    host = base.removeprefix("http://")
    target = "/v1/a%21b?a=x%2Fy%21&z=1%202"
    assert seen["signed"] == (host, target, "AKID")
    assert seen["received"] == (host, target, "yes")
    assert json.loads(answer.body) == {"ok": True}


async def test_vault_auth_calls_keep_to_the_deadline(aiohttp_server) -> None:
    """A Vault login that never answers fails as the source's timeout, not never: the
    auth flow's calls are bounded like every other call."""
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/auth/approle/login", hang)
    server = await aiohttp_server(app, host="127.0.0.1")
    source = provider(
        "vault",
        address=str(server.make_url("")).rstrip("/"),
        token=None,
        auth="approle",
        role_id="r",
        secret_id="s",
        timeout_seconds=0.3,
        max_attempts=1,
    )
    assert isinstance(source, VaultProvider)
    with pytest.raises(AgentError) as caught:
        await source.get("db")
    assert caught.value.transient
    assert "in time" in str(caught.value)
    await source.close()


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("2024-01-01T00:00:00Z", 1704067200.0),
        ("2024-01-01T08:00:00+08:00", 1704067200.0),
        ("2024-01-01T00:00:00.123456789Z", 1704067200.123456),  # Vault's nanoseconds
        (1704067200, 1704067200.0),  # seconds (AWS)
        (1704067200000, 1704067200.0),  # milliseconds (Huawei)
        (None, 0.0),
        ("", 0.0),
        ("not a time", 0.0),
        (True, 0.0),
    ],
)
def test_answer_time_reads_every_clouds_times(value: object, epoch: float) -> None:
    """One reader for the times in answers: ISO text with any offset, epoch seconds or
    milliseconds; absent or unreadable is 0.0 (a creation time is shown, never acted on)."""
    assert upstream.answer_time(value) == pytest.approx(epoch)


@pytest.mark.parametrize("body", [b"<html>", b"[1]", b'"x"', b"\xff"])
def test_a_success_that_is_not_a_json_object_is_unavailable(body: bytes) -> None:
    """A 200 whose body is not a JSON object is the store's failure, said without the body."""
    with pytest.raises(
        Unavailable, match=r"^the store answered with a body that is not a JSON object"
    ) as caught:
        upstream.json_object(body, "the store")
    assert "html" not in str(caught.value)
    assert upstream.json_object(b" ", "the store", empty_ok=True) == {}


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"SecretString": "v", "Name": "db"}, "answered without 'VersionId'"),
        ({"SecretBinary": "!!not base64", "VersionId": "v1"}, "a field it cannot have"),
        ({"SecretString": "v", "VersionId": "v1", "VersionStages": 5}, "a field it cannot"),
    ],
)
async def test_an_answer_missing_or_garbling_a_field_is_unavailable(
    aiohttp_server, body: dict[str, Any], said: str
) -> None:
    """A GetSecretValue answer without a field the record needs, or with one of the wrong
    kind, is Unavailable naming the field or the fault, never showing the value."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/", answer)
    server = await aiohttp_server(app, host="127.0.0.1")
    source = provider("aws", endpoint=str(server.make_url("")).rstrip("/"))
    assert isinstance(source, AwsProvider)
    with pytest.raises(Unavailable, match=said) as caught:
        await source.get("db")
    assert "not base64" not in str(caught.value)
    await source.close()


def test_every_provider_class_is_a_provider() -> None:
    """Each provider class satisfies the Provider protocol: mypy checks the list's type
    (a provider that drifts from the protocol fails type checking, as the cloud ones did
    while the protocol's credentials were a writable attribute), and an instance of each
    passes the runtime check."""
    from kms_agent.providers import Provider
    from kms_agent.providers.alibaba import Provider as AlibabaProvider
    from kms_agent.providers.huawei import Provider as HuaweiProvider
    from kms_agent.providers.local import Provider as LocalProvider

    classes: list[type[Provider]] = [
        AlibabaProvider, AwsProvider, HuaweiProvider, VaultProvider, LocalProvider,
    ]  # fmt: skip
    assert {c.__module__.rsplit(".", 1)[-1] for c in classes} == {"local", *SOURCES}
    for kind in SOURCES:
        assert isinstance(provider(kind), Provider)
