"""The HTTP API in process: routes, shapes, and every bad input getting its 4xx JSON error."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kms_agent.auth import Authenticator, load_tokens
from kms_agent.cache import Cache
from kms_agent.config import AuthConfig, Config, ServerConfig
from kms_agent.errors import AccessDenied, Unavailable, UpstreamTimeout
from kms_agent.model import SecretRecord, SecretValue
from kms_agent.providers import Router
from kms_agent.state import AgentState, Phase
from tests.conftest import PLANTED, TOKEN, FakeClock, ScriptedProvider

H = {"X-KMS-Token": TOKEN}


def make_state(provider: ScriptedProvider, clock: FakeClock, **server: object) -> AgentState:
    config = Config(server=ServerConfig(**server))  # type: ignore[arg-type]
    cache = Cache(provider.fetch, replace(config.cache, jitter=0.0), clock=clock)
    auth = Authenticator(config.auth.headers, load_tokens(AuthConfig(), {"KMS_TOKEN": TOKEN}))
    state = AgentState(config=config, router=Router([(("*",), provider)]), cache=cache, auth=auth)
    state.enter(Phase.READY)
    return state


@pytest.fixture(name="state")
def _state(provider, clock):
    provider.values.update(
        {
            "aigw!secret-abc": PLANTED + "-aigw",
            "db/json": json.dumps({"username": "app", "password": PLANTED, "port": 5432}),
        }
    )
    return make_state(provider, clock)


@pytest.fixture(name="client")
async def _client(serve, state):
    return await serve(state)


async def error_of(resp, status: int, code: str) -> dict[str, Any]:
    """Assert an error response's status, JSON shape and code; return the error object."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    err: dict[str, Any] = body["error"]
    assert err["code"] == code
    assert err["message"]
    assert err["request_id"] == resp.headers["X-Request-Id"]
    return err


# --------------------------------------------------------------------------- success paths


async def test_raw_value_is_exactly_the_stored_bytes(client):
    """format=raw returns the value alone, as text/plain, uncacheable by proxies."""
    resp = await client.get("/secrets/aigw!secret-abc?format=raw", headers=H)
    assert resp.status == 200
    assert await resp.read() == (PLANTED + "-aigw").encode()
    assert resp.content_type == "text/plain"
    assert resp.headers["Cache-Control"] == "no-store"


async def test_native_json_shape(client):
    """The canonical JSON carries name, source, version, stages, type and value."""
    resp = await client.get("/secrets/aigw%21secret-abc", headers=H)
    body = await resp.json()
    assert body["name"] == "aigw!secret-abc"
    assert body["value"] == PLANTED + "-aigw"
    assert body["source"] == "scripted"
    assert body["version_id"] == "v1"
    assert body["version_stages"] == ["ACSCurrent"]
    assert body["data_type"] == "text"
    assert "stale" not in body


async def test_field_of_a_json_secret(client):
    """field=KEY returns one key of a JSON secret, raw or in the JSON envelope."""
    resp = await client.get("/secrets/db/json?field=password&format=raw", headers=H)
    assert await resp.text() == PLANTED
    resp = await client.get("/secrets/db/json?field=port&format=raw", headers=H)
    assert await resp.text() == "5432"
    body = await (await client.get("/secrets/db/json?field=port", headers=H)).json()
    assert (body["field"], body["value"]) == ("port", 5432)


async def test_compat_endpoint_aws_shape(client):
    """/secretsmanager/get answers like Secrets Manager's GetSecretValue."""
    resp = await client.get(
        "/secretsmanager/get?secretId=aigw%21secret-abc",
        headers={"X-Aws-Parameters-Secrets-Token": TOKEN},
    )
    assert "Content-Type" not in resp.headers  # the AWS agent sends none
    body = await resp.json(content_type=None)
    assert set(body) == {"ARN", "Name", "VersionId", "SecretString", "VersionStages", "CreatedDate"}
    assert body["SecretString"] == PLANTED + "-aigw"
    assert body["Name"] == "aigw!secret-abc"
    assert isinstance(body["CreatedDate"], str)
    assert float(body["CreatedDate"]) > 0


async def test_v1_path_form(client):
    """/v1/{name} is the AWS agent's path form of the same call."""
    body = await (await client.get("/v1/aigw!secret-abc", headers=H)).json(content_type=None)
    assert body["SecretString"] == PLANTED + "-aigw"


@pytest.mark.parametrize("shape", ["kms", "vault"])
async def test_compat_response_types(serve, provider, clock, shape):
    """server.response_type switches the compat shape to Alibaba KMS or Vault KV v2."""
    provider.values["db"] = json.dumps({"password": PLANTED})
    client = await serve(make_state(provider, clock, response_type=shape))
    body = await (await client.get("/secretsmanager/get?secretId=db", headers=H)).json()
    if shape == "kms":
        assert body["SecretName"] == "db"
        assert body["SecretDataType"] == "text"
        assert body["VersionStages"] == {"VersionStage": ["ACSCurrent"]}
        assert json.loads(body["SecretData"]) == {"password": PLANTED}
    else:
        assert body["data"]["data"] == {"password": PLANTED}
        assert "version" in body["data"]["metadata"]


async def test_binary_secret_raw_and_base64(serve, clock):
    """Binary values: raw bytes as octet-stream; base64 in JSON and SecretBinary."""
    blob = bytes(range(256))

    class BinaryProvider(ScriptedProvider):
        async def get(self, name, *, version_id=None, version_stage=None):
            return SecretRecord(
                name, SecretValue(blob), "binary", "v1", ("ACSCurrent",), 0.0, self.name
            )

    client = await serve(make_state(BinaryProvider(), clock))
    resp = await client.get("/secrets/cert?format=raw", headers=H)
    assert resp.content_type == "application/octet-stream"
    assert await resp.read() == blob
    native = await (await client.get("/secrets/cert", headers=H)).json()
    assert base64.b64decode(native["value"]) == blob
    compat = await (await client.get("/v1/cert", headers=H)).json(content_type=None)
    assert base64.b64decode(compat["SecretBinary"]) == blob


async def test_version_selectors_reach_the_provider(client, provider):
    """version_id and version_stage are their own cache keys; every spelling of a stage is
    one key (ACSPrevious and AWSPREVIOUS are one read), canonical for the source."""
    seen: list[tuple[str | None, str | None]] = []
    get = provider.get

    async def recording(name, *, version_id=None, version_stage=None):
        seen.append((version_id, version_stage))
        return await get(name, version_id=version_id, version_stage=version_stage)

    provider.get = recording
    await client.get("/secrets/aigw!secret-abc?version_stage=ACSPrevious", headers=H)
    await client.get("/secrets/aigw!secret-abc?version_id=abc-123", headers=H)
    await client.get(
        "/secretsmanager/get?secretId=aigw!secret-abc&versionStage=AWSPREVIOUS", headers=H
    )
    await client.get("/secrets/aigw!secret-abc?version_stage=acsprevious", headers=H)
    await client.get("/secrets/aigw!secret-abc", headers=H)
    await client.get("/secrets/aigw!secret-abc?version_stage=AWSCURRENT", headers=H)
    await client.get("/v1/aigw!secret-abc?versionStage=SYSCURRENT", headers=H)
    assert seen == [(None, "ACSPrevious"), ("abc-123", None), (None, None)]


async def test_forced_refresh_coalesces_instead_of_429(client, provider, clock):
    """refresh=true goes upstream; another within cache.refresh_min_interval, however the
    stage is spelled, is answered with that read (never 429); one after it reads again."""
    await client.get("/secrets/aigw!secret-abc", headers=H)
    provider.values["aigw!secret-abc"] = "rotated-" + PLANTED
    resp = await client.get("/secrets/aigw!secret-abc?refresh=true&format=raw", headers=H)
    assert await resp.text() == PLANTED + "-aigw"  # the read a moment ago is the answer
    assert provider.calls["aigw!secret-abc"] == 1
    clock.advance(2)
    resp = await client.get("/secrets/aigw!secret-abc?refresh=true&format=raw", headers=H)
    assert await resp.text() == "rotated-" + PLANTED
    assert provider.calls["aigw!secret-abc"] == 2
    for stage in (
        "",
        "&versionStage=AWSCURRENT",
        "&versionStage=acscurrent",
        "&versionStage=ACSCurrent",
    ):
        resp = await client.get(
            f"/secretsmanager/get?secretId=aigw!secret-abc&refreshNow=true{stage}", headers=H
        )
        assert resp.status == 200, await resp.text()
        assert (await resp.json(content_type=None))["SecretString"] == "rotated-" + PLANTED
    assert provider.calls["aigw!secret-abc"] == 2
    clock.advance(1.5)
    await client.get("/secrets/aigw!secret-abc?refresh=true&version_stage=AWSCURRENT", headers=H)
    assert provider.calls["aigw!secret-abc"] == 3


async def test_forced_refresh_while_upstream_is_down_keeps_the_cache(client, provider, clock):
    """A forced refresh during an outage answers the upstream's error; the cached value is
    still served to plain reads."""
    await client.get("/secrets/aigw!secret-abc", headers=H)
    provider.failures["aigw!secret-abc"] = Unavailable("upstream down")
    clock.advance(2)
    resp = await client.get("/secrets/aigw!secret-abc?refresh=true", headers=H)
    await error_of(resp, 503, "UpstreamUnavailable")
    resp = await client.get("/secrets/aigw!secret-abc?format=raw", headers=H)
    assert await resp.text() == PLANTED + "-aigw"
    assert "Age" not in resp.headers


async def test_list_by_prefix(client):
    """GET /secrets?prefix= lists names visible through their source."""
    body = await (await client.get("/secrets?prefix=aigw!", headers=H)).json()
    assert body == {"secrets": [{"name": "aigw!secret-abc", "source": "scripted"}]}
    body = await (await client.get("/secrets", headers=H)).json()
    assert len(body["secrets"]) == 2


async def test_stale_value_is_marked(client, provider, clock):
    """A value served past expiry during an outage carries Age and "stale": true."""
    await client.get("/secrets/aigw!secret-abc", headers=H)
    provider.failures["aigw!secret-abc"] = Unavailable("upstream down")
    clock.advance(400)
    resp = await client.get("/secrets/aigw!secret-abc", headers=H)
    assert resp.status == 200
    assert int(resp.headers["Age"]) >= 400
    body = await resp.json()
    assert body["stale"] is True
    assert body["value"] == PLANTED + "-aigw"


async def test_health_routes_need_no_token(client, state):
    """/healthz and /ping answer without a token; /readyz follows readiness."""
    assert (await client.get("/healthz")).status == 200
    assert await (await client.get("/ping")).text() == "healthy"
    assert (await client.get("/readyz")).status == 200
    state.enter(Phase.WAITING, "source local: StoreCorrupt")
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["reason"] == "source local: StoreCorrupt"
    state.enter(Phase.DRAINING)
    assert (await (await client.get("/readyz")).json())["reason"] == "draining"


# --------------------------------------------------------------------------- bad input

BAD_REQUESTS = [
    # (method, path, headers, status, code)
    ("GET", "/secrets/db", {}, 401, "MissingToken"),
    ("GET", "/secrets/db", {"X-KMS-Token": "wrong-token-wrong-token"}, 403, "Forbidden"),
    ("GET", "/secrets/db", {**H, "X-Forwarded-For": "10.0.0.1"}, 400, "ProxiedRequestRefused"),
    ("GET", "/secrets/db", {**H, "Forwarded": "for=10.0.0.1"}, 400, "ProxiedRequestRefused"),
    ("GET", "/healthz", {"X-Forwarded-For": "10.0.0.1"}, 400, "ProxiedRequestRefused"),
    ("POST", "/secrets/db", H, 405, "MethodNotAllowed"),
    ("PUT", "/secrets/db", H, 405, "MethodNotAllowed"),
    ("DELETE", "/secrets/db", H, 405, "MethodNotAllowed"),
    ("HEAD", "/secrets/db", H, 405, "MethodNotAllowed"),
    ("OPTIONS", "/healthz", {}, 405, "MethodNotAllowed"),
    ("GET", "/nope", H, 404, "RouteNotFound"),
    ("GET", "/", H, 404, "RouteNotFound"),
    ("GET", "/secrets/bad%20name", H, 400, "BadRequest"),
    ("GET", "/secrets/semi;colon", H, 400, "BadRequest"),
    ("GET", "/secrets/" + "x" * 300, H, 400, "BadRequest"),
    ("GET", "/secrets/db?versionid=1", H, 400, "BadRequest"),
    ("GET", "/secrets/db?format=raw&format=json", H, 400, "BadRequest"),
    ("GET", "/secrets/db?format=xml", H, 400, "BadRequest"),
    ("GET", "/secrets/db?refresh=yes", H, 400, "BadRequest"),
    ("GET", "/secrets/db?version_id=a%20b", H, 400, "BadRequest"),
    ("GET", "/secrets/db?version_stage=" + "S" * 200, H, 400, "BadRequest"),
    ("GET", "/secretsmanager/get", H, 400, "BadRequest"),
    ("GET", "/secretsmanager/get?secretId=", H, 400, "BadRequest"),
    ("GET", "/secretsmanager/get?secretId=db&refreshNow=maybe", H, 400, "BadRequest"),
    ("GET", "/secretsmanager/get?SecretId=db", H, 400, "BadRequest"),
    ("GET", "/secrets?prefix=bad%01prefix", H, 400, "BadRequest"),
    ("GET", "/secrets/a/../b", H, 400, "BadRequest"),
    ("GET", "/secrets/a/./b", H, 400, "BadRequest"),
    ("GET", "/secrets/a//b", H, 400, "BadRequest"),
    ("GET", "/secrets/a%2F%2Fb", H, 400, "BadRequest"),
    ("GET", "/secrets/a%00b", H, 400, "BadRequest"),
    ("GET", "/secrets/a%zzb", H, 400, "BadRequest"),
    ("GET", "/secrets/a%ffb", H, 400, "BadRequest"),
    ("GET", "/secrets/unknown-name", H, 404, "SecretNotFound"),
    ("GET", "/secrets/db/json?field=nope", H, 404, "FieldNotFound"),
    ("GET", "/secrets/aigw!secret-abc?field=x", H, 400, "SecretNotJson"),
]


@pytest.mark.parametrize(("method", "path", "headers", "status", "code"), BAD_REQUESTS)
async def test_bad_input_gets_its_4xx_json_error(client, method, path, headers, status, code):
    """Every caller mistake has its status, a JSON error with a code, and no 500."""
    resp = await client.request(method, path, headers=headers)
    if method == "HEAD":
        assert resp.status == status
        return
    if path.startswith(("/secretsmanager/", "/v1/")):
        # The AWS agent's routes answer as it does: its own refusals in plain text, and no
        # Content-Type on anything.
        assert resp.status == status, await resp.text()
        assert "Content-Type" not in resp.headers
        assert await resp.text()
        return
    await error_of(resp, status, code)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Unavailable("connection refused"), 503, "UpstreamUnavailable"),
        (UpstreamTimeout("no answer in 5 s"), 504, "UpstreamTimeout"),
        (AccessDenied("no kms:GetSecretValue", hint="grant it"), 502, "UpstreamAccessDenied"),
    ],
)
async def test_upstream_errors_map_to_their_status(client, provider, error, status, code):
    """Upstream failures with nothing cached keep their code and hint."""
    provider.failures["db"] = error
    err = await error_of(await client.get("/secrets/db", headers=H), status, code)
    assert err.get("hint") == error.hint


async def test_access_log_line_per_miss_and_hits_counted(client, state, log_capture):
    """Misses get their own access line (route template, status, cache outcome, duration);
    hits are counted for the periodic summary instead of a line each."""
    before = len(log_capture.getvalue())
    await client.get("/secrets/aigw!secret-abc?format=raw", headers=H)
    await client.get("/secrets/aigw!secret-abc?format=raw", headers=H)
    await client.get("/secrets/aigw!secret-abc?format=raw", headers=H)
    lines = [json.loads(x) for x in log_capture.getvalue()[before:].splitlines()]
    access = [x for x in lines if x["event"] == "request"]
    assert [(x["route"], x["status"], x["cache"]) for x in access] == [
        ("/secrets/{name}", 200, "miss")
    ]
    assert isinstance(access[0]["duration_ms"], float)
    assert state.hit_counts == {"/secrets/{name}": 2}


async def test_every_hit_logged_when_asked(serve, provider, clock, log_capture):
    """logging.log_hits = true writes a line for every hit too."""
    provider.values["db"] = PLANTED
    state = make_state(provider, clock)
    state.config = replace(state.config, logging=replace(state.config.logging, log_hits=True))
    client = await serve(state)
    before = len(log_capture.getvalue())
    for _ in range(2):
        await client.get("/secrets/db", headers=H)
    lines = [json.loads(x) for x in log_capture.getvalue()[before:].splitlines()]
    assert [x["cache"] for x in lines if x["event"] == "request"] == ["miss", "hit"]


_path_chars = st.text(
    alphabet=st.sampled_from(list("abcAZ09!/._@-%~;:,'\"<>?&= ")), min_size=0, max_size=40
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(
        ["/secrets/", "/v1/", "/secretsmanager/get?secretId=", "/secrets?prefix=", "/"]
    ),
    tail=_path_chars,
    query=st.dictionaries(
        st.sampled_from(
            ["format", "field", "refresh", "version_id", "version_stage", "versionId", "x"]
        ),
        _path_chars,
        max_size=3,
    ),
)
async def test_fuzz_never_answers_500(client, route, tail, query):
    """Arbitrary names and query strings never produce a 5xx or a non-JSON error."""
    path = route + quote(tail, safe="/!@")
    assume(not path.startswith("//"))  # the test client reads //x as a host, not a path
    sep = "&" if "?" in path else "?"
    if query:
        path += sep + "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())
    resp = await client.get(path, headers=H)
    assert resp.status < 500, (path, await resp.text())
    if resp.status >= 400 and path.startswith(("/secretsmanager/", "/v1/")):
        # The AWS agent's dialect: its own refusals in plain text, the store's as __type.
        text = await resp.text()
        assert "Content-Type" not in resp.headers
        if text.startswith("{"):
            assert "__type" in json.loads(text)
        else:
            assert text
    elif resp.status >= 400:
        assert "error" in await resp.json()


async def test_1000_concurrent_http_requests_for_a_cold_key_make_one_provider_call(
    serve, provider, clock
):
    """Acceptance: 1,000 concurrent requests for a cold key cause exactly one provider call."""
    provider.values["cold"] = PLANTED
    provider.gate = asyncio.Event()
    client = await serve(make_state(provider, clock))

    async def one() -> tuple[int, bytes]:
        resp = await client.get("/secrets/cold?format=raw", headers=H)
        return resp.status, await resp.read()

    tasks = [asyncio.create_task(one()) for _ in range(1000)]
    await provider.started.wait()
    provider.gate.set()
    results = await asyncio.gather(*tasks)
    assert provider.calls["cold"] == 1
    assert set(results) == {(200, PLANTED.encode())}
