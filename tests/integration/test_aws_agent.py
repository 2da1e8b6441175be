"""The AWS agent's own integration tests, translated: kms-agent behind an ``aws@`` listener.

Issue 12, acceptance 4. The AWS Workload Credentials Provider (formerly the AWS Secrets
Manager Agent) ships integration tests (``integration-tests/tests``: security, secret
retrieval, cache behaviour, version management, role chaining, refreshNow, errors,
configuration) and HTTP unit tests (``aws_secretsmanager_provider/src/lib.rs``). Each is
translated here and run against one kms-agent listener speaking the AWS agent's API
(``server.listen = ["aws@127.0.0.1:0"]``), started the way that agent's harness starts its
binary: the token in ``AWS_TOKEN`` (``test-token-123``), sent in
``X-Aws-Parameters-Secrets-Token``, a 5 s TTL.

Two backends stand behind the listener:

* ``moto``: an ``aws`` source reading the session's moto server (SigV4 checked), seeded
  with boto3 exactly as the AWS tests seed Secrets Manager;
* ``local``: the agent's own encrypted store, where a behaviour applies to it (it has no
  ARNs, no ``AWSPENDING`` stage and no UpdateSecretVersionStage; a put to it is seen by
  the agent's file watcher, so "still cached after an update" is a moto-only step).

The AWS tests sleep (0.5 s after an update, 6 s for the TTL); these do not. kms-agent's
forced refreshes go upstream at once (``refresh_min_interval`` is 0 under
``running_agent``), and TTL expiry is reached by moving the cache entry's ``expires_at``
into the past.

Where kms-agent is deliberately different from the AWS agent, the test asserts
kms-agent's behaviour and says so: concurrent misses are coalesced into one upstream read;
stage spellings (``AWSCURRENT``, ``awscurrent``, none) are one cache key; a repeated query
parameter is refused (400) where the AWS agent takes the last; ``Forwarded`` is refused as
well as ``X-Forwarded-For``; ``/v1/`` names are percent-decoded; a ``roleArn`` outside a
source's allow-list is refused (403 ``AccessDeniedException``; assuming roles is a later
issue). A behaviour that contradicts the AWS agent otherwise is written as the AWS agent
does it and marked ``xfail(strict=True)`` with the discrepancy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import boto3
import pytest
import yarl
from botocore.exceptions import ClientError

from kms_agent.agent import Agent
from kms_agent.store import LocalStore
from tests.conftest import PLANTED, moto_source, running_agent

#: The token the AWS agent's harness starts its binary with (``AWS_TOKEN``).
AWS_TOKEN = "test-token-123"
#: The header its harness sends the token in.
TOKEN_HEADER = "X-Aws-Parameters-Secrets-Token"
H = {TOKEN_HEADER: AWS_TOKEN}
#: One AWS-dialect listener; ``KMS_TOKEN`` emptied so that ``AWS_TOKEN`` is the token
#: (the first token variable with a value wins).
ENV = {
    "KMS_AGENT_SERVER_LISTEN": "aws@127.0.0.1:0",
    "KMS_TOKEN": "",
    "AWS_TOKEN": AWS_TOKEN,
}
#: The harness's TTL.
TTL = 5
#: The keys of a GetSecretValue answer, in the AWS agent's fixed order.
TEXT_KEYS = ["ARN", "Name", "VersionId", "SecretString", "VersionStages", "CreatedDate"]
BINARY_KEYS = ["ARN", "Name", "VersionId", "SecretBinary", "VersionStages", "CreatedDate"]
ROLE_FORMAT = "invalid roleArn format, expected arn:<partition>:iam::<account>:role/<name>"
GOOD_ROLE = "arn:aws:iam::123456789012:role/asm-role-chaining-role"
NO_ACCESS_ROLE = "arn:aws:iam::123456789012:role/provider-no-access-role"
MISSING_ROLE = "arn:aws:iam::000000000000:role/NonExistentRole"
VERBS = ("POST", "PUT", "PATCH", "DELETE", "HEAD", "CONNECT", "OPTIONS", "TRACE")

BASIC = {"username": "testuser", "password": "testpass123-" + PLANTED}
CURRENT = {"username": "currentuser", "password": "currentpass-" + PLANTED}
PENDING = {"username": "pendinguser", "password": "pendingpass-" + PLANTED}
ROTATED = {"username": "rotateduser", "password": "rotatedpass123-" + PLANTED}
BINARY = b"\x00\x01\x02\x03\xff\xfe\xfd"


def unique(kind: str) -> str:
    """A secret name as the AWS harness makes them."""
    return f"aws-workload-credentials-provider-test-{time.time_ns()}-{kind}"


# --------------------------------------------------------------------------- HTTP


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


class Caller:
    """A keep-alive HTTP client on the agent's AWS listener (like the harness's reqwest
    client). Every answer is checked for what the AWS agent never sends: a Content-Type."""

    def __init__(self, agent: Agent, session: aiohttp.ClientSession) -> None:
        self.agent = agent
        self.base = f"http://{agent.addresses[0]}"
        self.session = session

    async def get(
        self, target: str, headers: dict[str, str] | None = None, *, typed: bool = False
    ) -> Answer:
        """``target`` is sent exactly as given (already encoded). ``typed``: a Content-Type
        is let through (only for the answer whose own test checks it)."""
        url = yarl.URL(self.base + target, encoded=True)
        async with self.session.get(url, headers=H if headers is None else headers) as resp:
            answer = Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                            await resp.read())  # fmt: skip
        if not typed:
            assert "content-type" not in answer.headers, (target, answer.headers)
        return answer

    async def secret(
        self,
        secret_id: str,
        *,
        version_id: str | None = None,
        version_stage: str | None = None,
        refresh_now: bool | None = None,
        role_arn: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """The harness's query form: parameters form-encoded in its order."""
        pairs = [("secretId", secret_id)]
        if version_id is not None:
            pairs.append(("versionId", version_id))
        if version_stage is not None:
            pairs.append(("versionStage", version_stage))
        if refresh_now is not None:
            pairs.append(("refreshNow", "true" if refresh_now else "false"))
        if role_arn is not None:
            pairs.append(("roleArn", role_arn))
        return await self.get(f"/secretsmanager/get?{urlencode(pairs)}", headers)

    async def ok(self, secret_id: str, **kwargs: Any) -> dict[str, Any]:
        answer = await self.secret(secret_id, **kwargs)
        assert answer.status == 200, answer
        body: dict[str, Any] = answer.json()
        return body


async def raw(
    agent: Agent, method: str, target: str, headers: dict[str, str], *, typed: bool = False
) -> Answer:
    """One request on its own connection, bytes exactly as given, read to the close."""
    host, port = agent.addresses[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    answer = Answer(int(status_line.split(" ", 2)[1]), parsed, body)
    if not typed:
        assert "content-type" not in answer.headers, (method, target, answer.headers)
    return answer


# --------------------------------------------------------------------------- backends


def moto_client(moto: dict[str, str], secret_key: str | None = None) -> Any:
    return boto3.client(
        "secretsmanager",
        endpoint_url=moto["url"],
        region_name="us-east-1",
        aws_access_key_id=moto["ak"],
        aws_secret_access_key=secret_key or moto["sk"],
    )


def cache_table(ttl: float) -> str:
    return f"[cache]\nttl = {ttl}\n"


async def versioned(client: Any) -> tuple[str, str, str]:
    """The harness's versioned secret: AWSCURRENT and an AWSPENDING version; its name and
    both version ids."""
    name = unique("versioned")
    made = await asyncio.to_thread(client.create_secret, Name=name,
                                   SecretString=json.dumps(CURRENT))  # fmt: skip
    put = await asyncio.to_thread(client.put_secret_value, SecretId=name,
                                  SecretString=json.dumps(PENDING), VersionStages=["AWSPENDING"])  # fmt: skip
    return name, made["VersionId"], put["VersionId"]


def aws_source(moto: dict[str, str], *, endpoint: str | None = None, extra: str = "") -> str:
    return moto_source(moto, endpoint=endpoint, extra=extra)


LOCAL_SOURCE = '\n[[sources]]\nname = "local"\nprovider = "local"\nmatch = ["*"]\n'


@dataclass
class Backend:
    """What stands behind the listener, and how a test seeds it."""

    kind: str
    source: str
    text: str
    create: Callable[..., Any]
    update: Callable[[str, str], Any]
    #: The value an update leaves cached until a refresh (the local store is watched).
    keeps_cached_value: bool
    details: dict[str, Any] = field(default_factory=dict)

    async def put(self, name: str, value: dict[str, Any] | bytes | str) -> str:
        """Create ``name``; its version id."""
        data = json.dumps(value) if isinstance(value, dict) else value
        vid: str = await asyncio.to_thread(self.create, name, data)
        return vid

    async def rotate(self, name: str, value: dict[str, Any]) -> str:
        """A new current version; its id."""
        vid: str = await asyncio.to_thread(self.update, name, json.dumps(value))
        return vid


def moto_backend(moto: dict[str, str]) -> Backend:
    client = moto_client(moto)

    def create(name: str, value: str | bytes) -> str:
        if isinstance(value, bytes):
            out = client.create_secret(Name=name, SecretBinary=value)
        else:
            out = client.create_secret(Name=name, SecretString=value)
        return str(out["VersionId"])

    def update(name: str, value: str) -> str:
        return str(client.update_secret(SecretId=name, SecretString=value)["VersionId"])

    return Backend("moto", "aws", aws_source(moto), create, update, keeps_cached_value=True,
                   details={"client": client})  # fmt: skip


def local_backend(tmp_path: Path) -> Backend:
    store = LocalStore(tmp_path / "d")
    store.init()

    def create(name: str, value: str | bytes) -> str:
        if isinstance(value, bytes):
            return store.put(name, value, data_type="binary")
        return store.put(name, value.encode())

    def update(name: str, value: str) -> str:
        return store.put(name, value.encode())

    return Backend("local", "local", LOCAL_SOURCE, create, update, keeps_cached_value=False)


@pytest.fixture(name="backend", params=["moto", "local"])
def _backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "moto":
        return moto_backend(request.getfixturevalue("moto"))
    return local_backend(tmp_path)


@contextlib.asynccontextmanager
async def aws_agent(tmp_path: Path, text: str, ttl: float = TTL) -> AsyncIterator[Caller]:
    """kms-agent with one AWS-dialect listener, started as the AWS harness starts its agent."""
    async with (
        running_agent(tmp_path, cache_table(ttl) + text, env=ENV) as agent,
        aiohttp.ClientSession() as session,
    ):
        yield Caller(agent, session)


def upstream_reads(agent: Agent, source: str) -> float:
    """Successful upstream reads of ``source`` so far."""
    value = agent.state.metrics.registry.get_sample_value(
        "kms_agent_upstream_requests_total",
        {"source": source, "operation": "get", "outcome": "success"},
    )
    return value or 0.0


def expire(agent: Agent, key: tuple[str, str, str | None, str | None]) -> None:
    """The TTL of ``key``'s entry runs out now (the AWS test sleeps 6 s for this)."""
    entry = agent.state.cache.peek(key)
    assert entry is not None, key
    past = agent.state.cache.now() - 0.001
    entry.expires_at = entry.refresh_at = past


# --------------------------------------------------------------------------- security


async def test_ssrf_token_validation(tmp_path: Path, backend: Backend) -> None:
    """security::test_ssrf_token_validation: no token and a wrong token are 403 ``Bad
    Token`` (plain text), the right one reads the secret; the same with refreshNow=true."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        for refresh in (None, True):
            missing = await call.secret(name, refresh_now=refresh, headers={})
            assert (missing.status, missing.text) == (403, "Bad Token")
            wrong = await call.secret(
                name, refresh_now=refresh, headers={TOKEN_HEADER: "invalid-token-456"}
            )
            assert (wrong.status, wrong.text) == (403, "Bad Token")
            body = await call.ok(name, refresh_now=refresh)
            assert "testuser" in body["SecretString"]


async def test_x_forwarded_for_rejection(tmp_path: Path, backend: Backend) -> None:
    """security::test_x_forwarded_for_rejection: a valid token with ``X-Forwarded-For`` is
    400 ``Forwarded``; without it the secret is read. kms-agent refuses ``Forwarded`` the
    same way (deliberately stricter: the AWS agent lets it through)."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        for proxied in ({"X-Forwarded-For": "192.168.1.100"}, {"X-Forwarded-For": ""},
                        {"Forwarded": "for=192.168.1.100"}):  # fmt: skip
            answer = await call.secret(name, headers={**H, **proxied})
            assert (answer.status, answer.text) == (400, "Forwarded"), proxied
        assert "testuser" in (await call.ok(name))["SecretString"]


async def test_check_order_forwarding_token_method_route(
    tmp_path: Path, moto: dict[str, str]
) -> None:
    """The AWS agent's fixed order (forwarding → token → method → route): an unknown path
    without a token is 403, not 404; POST without a token is 403; X-Forwarded-For without a
    token is 400; POST /ping needs no token but is still 405; a wrong verb on an unknown
    path with a token is 405, not 404."""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        agent = call.agent
        assert (await call.get("/pong", headers={})).status == 403
        assert (await raw(agent, "POST", "/secretsmanager/get?secretId=x", {})).status == 403
        answer = await call.get("/secretsmanager/get?secretId=x",
                                headers={"X-Forwarded-For": "10.0.0.1"})  # fmt: skip
        assert (answer.status, answer.text) == (400, "Forwarded")
        answer = await raw(agent, "POST", "/ping", {})
        assert (answer.status, answer.body) == (405, b"Not allowed")
        assert (await raw(agent, "DELETE", "/pong", H)).status == 405


async def test_token_headers_and_case(tmp_path: Path, backend: Backend) -> None:
    """lib.rs token tests: ``X-Vault-Token`` with the token reads (path and query form),
    with ``click slipers`` is 403; header names are case-insensitive; the value is not."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        assert (await call.get(f"/v1/{name}", headers={"X-Vault-Token": AWS_TOKEN})).status == 200
        assert (await call.secret(name, headers={"X-Vault-Token": AWS_TOKEN})).status == 200
        bad = await call.get(f"/v1/{name}", headers={"X-Vault-Token": "click slipers"})
        assert (bad.status, bad.text) == (403, "Bad Token")
        lower = {TOKEN_HEADER.lower(): AWS_TOKEN}
        assert (await call.secret(name, headers=lower)).status == 200
        upper = {TOKEN_HEADER: AWS_TOKEN.upper()}
        assert (await call.secret(name, headers=upper)).status == 403
        other = {"X-Other-Token": AWS_TOKEN}
        assert (await call.secret(name, headers=other)).status == 403


# --------------------------------------------------------------------------- retrieval


async def test_secret_retrieval_by_name(tmp_path: Path, backend: Backend) -> None:
    """secret_retrieval::test_secret_retrieval_by_name, and lib.rs's basic answer: 200 with
    ``Name``, ``SecretString``, a string ``VersionId``, ``VersionStages`` in AWS spelling
    (the local store's ``ACSCurrent`` too), the AWS agent's key order, compact JSON, and
    ``CreatedDate`` a string of epoch seconds (no trailing ``.0``)."""
    name = unique("basic")
    vid = await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        answer = await call.secret(name)
        assert answer.status == 200
        body = answer.json()
        assert list(body) == TEXT_KEYS
        assert answer.body == json.dumps(body, separators=(",", ":")).encode()
        assert body["Name"] == name
        assert json.loads(body["SecretString"]) == BASIC
        assert body["VersionId"] == vid
        assert body["VersionStages"] == ["AWSCURRENT"]
        created = body["CreatedDate"]
        assert isinstance(created, str)
        assert re.fullmatch(r"\d+(\.\d+)?", created) and not created.endswith(".0")
        if backend.kind == "moto":
            client = backend.details["client"]
            seen = await asyncio.to_thread(client.get_secret_value, SecretId=name)
            assert abs(float(created) - seen["CreatedDate"].timestamp()) < 0.001
            assert body["ARN"] == seen["ARN"]
        else:
            assert abs(float(created) - time.time()) < 60
            assert isinstance(body["ARN"], str)


async def test_secret_retrieval_by_arn(tmp_path: Path, moto: dict[str, str]) -> None:
    """secret_retrieval::test_secret_retrieval_by_arn: ``secretId=<ARN from DescribeSecret>``
    answers that ARN and the value (moto only: the local store has no ARNs)."""
    backend = moto_backend(moto)
    name = unique("basic")
    await backend.put(name, BASIC)
    described = await asyncio.to_thread(backend.details["client"].describe_secret, SecretId=name)
    async with aws_agent(tmp_path, backend.text) as call:
        body = await call.ok(described["ARN"])
        assert body["ARN"] == described["ARN"]
        assert body["Name"] == name
        assert "testuser" in body["SecretString"]
        by_path = (await call.get(f"/v1/{described['ARN']}")).json()
        assert by_path["ARN"] == described["ARN"]


async def test_binary_secret_retrieval(tmp_path: Path, backend: Backend) -> None:
    """secret_retrieval::test_binary_secret_retrieval: ``SecretBinary`` is standard base64
    with padding of the stored bytes; ``SecretString`` is absent (reads as null)."""
    name = unique("binary")
    await backend.put(name, BINARY)
    async with aws_agent(tmp_path, backend.text) as call:
        body = await call.ok(name)
        assert list(body) == BINARY_KEYS
        assert body["Name"] == name
        assert body["SecretBinary"] == base64.b64encode(BINARY).decode()
        assert body.get("SecretString") is None


async def test_version_stage_retrieval(tmp_path: Path, moto: dict[str, str]) -> None:
    """secret_retrieval::test_version_stage_retrieval: ``versionStage=AWSCURRENT`` and
    ``versionStage=AWSPENDING`` each answer their own version and stage (moto only: the
    local store has no AWSPENDING)."""
    client = moto_client(moto)
    name = unique("versioned")
    await asyncio.to_thread(client.create_secret, Name=name, SecretString=json.dumps(CURRENT))
    await asyncio.to_thread(client.put_secret_value, SecretId=name,
                            SecretString=json.dumps(PENDING), VersionStages=["AWSPENDING"])  # fmt: skip
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        current = await call.ok(name, version_stage="AWSCURRENT")
        assert "currentuser" in current["SecretString"]
        assert "AWSCURRENT" in current["VersionStages"]
        pending = await call.ok(name, version_stage="AWSPENDING")
        assert "pendinguser" in pending["SecretString"]
        assert "AWSPENDING" in pending["VersionStages"]
        assert pending["VersionId"] != current["VersionId"]


async def test_version_id_retrieval(tmp_path: Path, moto: dict[str, str]) -> None:
    """secret_retrieval::test_version_id_retrieval: ``versionId`` of the current and of the
    pending version each answer that version id and value; lib.rs: all parameters together
    (``versionStage``, ``versionId``, ``refreshNow``) are accepted."""
    client = moto_client(moto)
    name, current, pending = await versioned(client)
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        body = await call.ok(name, version_id=current)
        assert (body["VersionId"], "currentuser" in body["SecretString"]) == (current, True)
        body = await call.ok(name, version_id=pending)
        assert (body["VersionId"], "pendinguser" in body["SecretString"]) == (pending, True)
        body = await call.ok(name, version_id=pending, version_stage="AWSPENDING",
                             refresh_now=True)  # fmt: skip
        assert (body["VersionId"], body["VersionStages"]) == (pending, ["AWSPENDING"])


async def test_version_id_and_previous_stage_on_the_local_store(tmp_path: Path) -> None:
    """The local store's versions in the AWS dialect: ``versionId`` of an older version
    answers it with ``AWSPREVIOUS`` (its ``ACSPrevious``), ``versionStage=AWSPREVIOUS`` the
    same version, ``versionStage=AWSCURRENT`` the newest."""
    backend = local_backend(tmp_path)
    name = unique("versioned")
    old = await backend.put(name, CURRENT)
    new = await backend.rotate(name, ROTATED)
    async with aws_agent(tmp_path, backend.text) as call:
        body = await call.ok(name, version_id=old)
        assert (body["VersionId"], body["VersionStages"]) == (old, ["AWSPREVIOUS"])
        assert "currentuser" in body["SecretString"]
        body = await call.ok(name, version_stage="AWSPREVIOUS")
        assert body["VersionId"] == old
        body = await call.ok(name, version_stage="AWSCURRENT")
        assert (body["VersionId"], body["VersionStages"]) == (new, ["AWSCURRENT"])


async def test_large_secret_retrieval(tmp_path: Path, backend: Backend) -> None:
    """secret_retrieval::test_large_secret_retrieval: a 60 KB secret comes back whole."""
    name = unique("large")
    await backend.put(name, {"data": "x" * 60000, "size": "60KB"})
    async with aws_agent(tmp_path, backend.text) as call:
        value = json.loads((await call.ok(name))["SecretString"])
        assert value["size"] == "60KB"
        assert value["data"] == "x" * 60000


async def test_real_nonexistent_secret(tmp_path: Path, backend: Backend) -> None:
    """secret_retrieval::test_real_nonexistent_secret: a missing secret is answered with the
    store's status and ``{"__type":"ResourceNotFoundException","message":...}`` (compact, in
    that key order), with and without refreshNow=true, by query and by path.

    The AWS test expects 400 because Secrets Manager answers 400; the AWS agent passes the
    upstream status through. moto answers this error with 404 (and ``Message``), so behind
    moto the expected status is moto's own, as botocore sees it, and the message is moto's
    under the lower-case key. The local store answers as Secrets Manager would: 400."""
    name = f"nonexistent-secret-{time.time_ns()}"
    status, message = 400, None
    if backend.kind == "moto":
        with pytest.raises(ClientError) as raised:
            await asyncio.to_thread(backend.details["client"].get_secret_value, SecretId=name)
        status = raised.value.response["ResponseMetadata"]["HTTPStatusCode"]
        message = raised.value.response["Error"]["Message"]
    async with aws_agent(tmp_path, backend.text) as call:
        for answer in (
            await call.secret(name),
            await call.secret(name, refresh_now=True),
            await call.get(f"/v1/{name}?refreshNow=true"),
        ):
            assert answer.status == status, answer
            body = answer.json()
            assert list(body) == ["__type", "message"]
            assert body["__type"] == "ResourceNotFoundException"
            assert body["message"]
            if message is not None:
                assert body["message"] == message
            assert answer.body == json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- cache


async def test_refresh_now_on_updated_secret_succeeds(tmp_path: Path, backend: Backend) -> None:
    """cache_behavior::test_refresh_now_on_updated_secret_succeeds (and lib.rs's refreshNow
    sequence): after an update the cached value is served until refreshNow=true, which
    answers the new version, AWSCURRENT and the rotated value. The local store's watcher
    may drop the entry on the update, so "still cached" is checked for moto only."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        first = await call.ok(name)
        assert "testuser" in first["SecretString"]
        assert "testuser" in (await call.ok(name))["SecretString"]
        new = await backend.rotate(name, ROTATED)
        if backend.keeps_cached_value:
            cached = await call.ok(name)
            assert (cached["VersionId"], "testuser" in cached["SecretString"]) == (
                first["VersionId"],
                True,
            )
        body = await call.ok(name, refresh_now=True)
        assert body["VersionId"] == new
        assert "AWSCURRENT" in body["VersionStages"]
        assert "rotateduser" in body["SecretString"]
        assert "rotateduser" in (await call.ok(name))["SecretString"]  # the cache took it


async def test_refresh_now_spellings(tmp_path: Path, moto: dict[str, str]) -> None:
    """lib.rs parse tests: refreshNow is ``true``/``1``/``false``/``0`` in any case; any
    other value, empty included, is 400 ``invalid refreshNow value``. Two forced refreshes
    back to back both answer 200 (the AWS agent never rate-limits refreshNow)."""
    backend = moto_backend(moto)
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        for value in ("1", "0", "TRUE", "False", "true", "true"):
            answer = await call.get(f"/secretsmanager/get?secretId={name}&refreshNow={value}")
            assert answer.status == 200, value
        for value in ("yes", "", "2"):
            answer = await call.get(f"/secretsmanager/get?secretId={name}&refreshNow={value}")
            assert (answer.status, answer.text) == (400, "invalid refreshNow value"), value
            answer = await call.get(f"/v1/{name}?refreshNow={value}")
            assert (answer.status, answer.text) == (400, "invalid refreshNow value"), value


async def test_cache_expiration_and_refresh(tmp_path: Path, backend: Backend) -> None:
    """cache_behavior::test_cache_expiration_and_refresh (TTL 5): the entry lives the TTL
    (within its jitter); once it has run out the next read answers the updated version.
    The AWS test sleeps 6 s; here the entry's expiry is moved into the past."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        agent = call.agent
        first = await call.ok(name)
        assert "testuser" in first["SecretString"]
        key = (backend.source, name, None, None)
        entry = agent.state.cache.peek(key)
        assert entry is not None
        assert TTL * 0.8 <= entry.expires_at - entry.fetched_at <= TTL * 1.2
        new = await backend.rotate(name, {"username": "expireduser", "password": PLANTED})
        if backend.keeps_cached_value:
            cached = await call.ok(name)
            assert (cached["VersionId"], "testuser" in cached["SecretString"]) == (
                first["VersionId"],
                True,
            )
            expire(agent, key)
        elif agent.state.cache.peek(key) is not None:
            expire(agent, key)
        body = await call.ok(name)
        assert body["VersionId"] == new
        assert "AWSCURRENT" in body["VersionStages"]
        assert "expireduser" in body["SecretString"]


async def test_ttl_zero_disables_caching(tmp_path: Path, backend: Backend) -> None:
    """cache_behavior::test_ttl_zero_disables_caching: with TTL 0 the read after an update
    answers the new version at once, without refreshNow, and nothing is kept."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text, ttl=0) as call:
        first = await call.ok(name)
        assert "testuser" in first["SecretString"]
        assert call.agent.state.cache.peek((backend.source, name, None, None)) is None
        new = await backend.rotate(name, {"username": "nocacheuser", "password": PLANTED})
        body = await call.ok(name)
        assert body["VersionId"] == new != first["VersionId"]
        assert "AWSCURRENT" in body["VersionStages"]
        assert "nocacheuser" in body["SecretString"]


async def test_concurrent_misses_are_one_upstream_read(tmp_path: Path, backend: Backend) -> None:
    """Deliberately different from the AWS agent (which makes one upstream call per
    concurrent miss): eight concurrent first reads of one secret are one upstream read,
    and all eight get the value."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        agent = call.agent
        before = upstream_reads(agent, backend.source)
        bodies = await asyncio.gather(*(call.ok(name) for _ in range(8)))
        assert {b["SecretString"] for b in bodies} == {json.dumps(BASIC)}
        assert upstream_reads(agent, backend.source) - before == 1


async def test_stage_spellings_share_one_cache_entry(tmp_path: Path, moto: dict[str, str]) -> None:
    """Deliberately different from the AWS agent (whose cache key is the stage exactly as
    given): no stage, ``AWSCURRENT`` and ``awscurrent`` are one cache entry, so after an
    update all three still answer the cached version until a forced refresh, which then
    serves all three."""
    backend = moto_backend(moto)
    name = unique("basic")
    first = await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        await call.ok(name)
        await backend.rotate(name, ROTATED)
        for stage in (None, "AWSCURRENT", "awscurrent"):
            assert (await call.ok(name, version_stage=stage))["VersionId"] == first, stage
        assert len(call.agent.state.cache) == 1
        new = (await call.ok(name, version_stage="awscurrent", refresh_now=True))["VersionId"]
        for stage in (None, "AWSCURRENT"):
            assert (await call.ok(name, version_stage=stage))["VersionId"] == new, stage


# --------------------------------------------------------------------------- versions


async def test_version_stage_transitions(tmp_path: Path, moto: dict[str, str]) -> None:
    """version_management::test_version_stage_transitions: AWSPENDING and AWSCURRENT answer
    their versions; after UpdateSecretVersionStage moves AWSCURRENT to the pending version,
    ``versionStage=AWSCURRENT&refreshNow=true`` answers it (the AWS test polls; moto is
    consistent at once), and ``versionId=<old>&refreshNow=true`` the old version without
    AWSCURRENT."""
    client = moto_client(moto)
    name, current, pending = await versioned(client)
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        body = await call.ok(name, version_stage="AWSPENDING")
        assert (body["VersionId"], "pendinguser" in body["SecretString"]) == (pending, True)
        body = await call.ok(name, version_stage="AWSCURRENT")
        assert (body["VersionId"], "currentuser" in body["SecretString"]) == (current, True)
        await asyncio.to_thread(client.update_secret_version_stage, SecretId=name,
                                VersionStage="AWSCURRENT", MoveToVersionId=pending,
                                RemoveFromVersionId=current)  # fmt: skip
        body = await call.ok(name, version_stage="AWSCURRENT", refresh_now=True)
        assert body["VersionId"] == pending
        assert "pendinguser" in body["SecretString"]
        assert "AWSCURRENT" in body["VersionStages"]
        body = await call.ok(name, version_id=current, refresh_now=True)
        assert body["VersionId"] == current
        assert "currentuser" in body["SecretString"]
        assert "AWSCURRENT" not in body["VersionStages"]


# --------------------------------------------------------------------------- roles


async def test_role_chaining_invalid_role_arn_format(tmp_path: Path, moto: dict[str, str]) -> None:
    """role_chaining::test_role_chaining_invalid_role_arn_format and lib.rs: a roleArn that
    is not an IAM role ARN is 400 with the AWS agent's exact text, in both forms, checked
    after unknown parameters and after a missing secretId."""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        for target in (
            "/secretsmanager/get?secretId=any-secret&roleArn=not-a-valid-arn",
            "/v1/any-secret?roleArn=not-a-valid-arn",
            "/secretsmanager/get?secretId=any-secret&roleArn="
            + quote("arn:aws:sts::123456789012:role/x", safe=""),
            "/secretsmanager/get?secretId=any-secret&roleArn="
            + quote("arn:aws:iam::123456789012:role/x\n", safe=""),
        ):
            answer = await call.get(target)
            assert (answer.status, answer.text) == (400, ROLE_FORMAT), target
        answer = await call.get("/secretsmanager/get?roleArn=not-a-valid-arn")
        assert (answer.status, answer.text) == (400, "missing parameter secretId")
        answer = await call.get("/secretsmanager/get?secretId=x&roleArn=bad&abc=1")
        assert (answer.status, answer.text) == (400, "unknown parameter: abc")


async def test_role_chaining_valid_roles_are_refused(tmp_path: Path, backend: Backend) -> None:
    """role_chaining's basic retrieval, nonexistent role, refreshNow, no-access role and
    per-role caches. Deliberately different: kms-agent does not assume a caller's role
    (that is a later issue); a well-formed roleArn outside the source's allow-list (every
    role, today) is refused with 403 ``{"__type":"AccessDeniedException",...}`` naming the
    role, as the AWS agent answers a role it cannot assume. The AWS agent's own answers
    differ for the roles it can assume: 200 for ``asm-role-chaining-role``, 400 for
    ``provider-no-access-role``. The refusal is never cached: the default identity keeps
    its own cache, repeated refusals on one keep-alive connection stay 403, and the
    secret's cached value is untouched."""
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        first = await call.ok(name)
        assert "testuser" in first["SecretString"]
        await backend.rotate(name, {"username": "updateduser", "password": PLANTED})
        for role in (GOOD_ROLE, MISSING_ROLE, NO_ACCESS_ROLE, GOOD_ROLE):
            for refresh in (None, True):
                for answer in (
                    await call.secret(name, role_arn=role, refresh_now=refresh),
                    await call.get(f"/v1/{name}?roleArn={quote(role, safe='')}"),
                ):
                    assert answer.status == 403, (role, answer)
                    body = answer.json()
                    assert body["__type"] == "AccessDeniedException"
                    assert "AccessDenied" in answer.text
                    assert role in body["message"]
        if backend.keeps_cached_value:
            assert (await call.ok(name))["VersionId"] == first["VersionId"]


# --------------------------------------------------------------------------- errors


async def test_upstream_error_status_and_type_pass_through(
    tmp_path: Path, moto: dict[str, str]
) -> None:
    """lib.rs ``OTHERERRORTest`` and the error table: a modelled Secrets Manager error (here
    InvalidRequestException for a secret marked for deletion) comes back with the store's
    own HTTP status and ``{"__type":"<its code>","message":"<its message>"}``, exactly as
    botocore sees them from the same moto."""
    client = moto_client(moto)
    name = unique("deleted")
    await asyncio.to_thread(client.create_secret, Name=name, SecretString=json.dumps(BASIC))
    await asyncio.to_thread(client.delete_secret, SecretId=name, RecoveryWindowInDays=7)
    with pytest.raises(ClientError) as raised:
        await asyncio.to_thread(client.get_secret_value, SecretId=name)
    seen = raised.value.response
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        for refresh in (None, True):
            answer = await call.secret(name, refresh_now=refresh)
            assert answer.status == seen["ResponseMetadata"]["HTTPStatusCode"]
            assert answer.json() == {
                "__type": seen["Error"]["Code"],
                "message": seen["Error"]["Message"],
            }
            assert answer.text.startswith('{"__type":')


async def test_connection_error_is_502_read_error(tmp_path: Path, moto: dict[str, str]) -> None:
    """The error table: a store that refuses connections is 502
    ``{"__type":"ConnectionError","message":"Read Error"}``, with and without refreshNow."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    text = aws_source(moto, endpoint=closed, extra="max_attempts = 1")
    async with aws_agent(tmp_path, text) as call:
        for refresh in (None, True):
            answer = await call.secret("any-secret", refresh_now=refresh)
            assert (answer.status, answer.json()) == (
                502,
                {"__type": "ConnectionError", "message": "Read Error"},
            )


# --------------------------------------------------------------------------- configuration


async def test_ping_endpoint_health_check(tmp_path: Path, moto: dict[str, str]) -> None:
    """configuration::test_ping_endpoint_health_check and lib.rs: ``/ping`` is 200
    ``healthy`` (exactly) with and without a token, its query string ignored. (Its missing
    Content-Type is checked on its own, below.)"""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        for headers in ({}, H, {TOKEN_HEADER: "wrong-token-0"}):
            answer = await call.get("/ping", headers=headers, typed=True)
            assert (answer.status, answer.body) == (200, b"healthy")


async def test_ping_ignores_its_query_string(tmp_path: Path, moto: dict[str, str]) -> None:
    """server.rs routes on the path only: ``/ping?secretId=x&abc=1`` is 200 ``healthy``."""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        answer = await call.get("/ping?secretId=x&abc=1", headers={}, typed=True)
        assert (answer.status, answer.body) == (200, b"healthy")


async def test_ping_has_no_content_type(tmp_path: Path, moto: dict[str, str]) -> None:
    """No Content-Type header on any response of the AWS agent, /ping's ``healthy`` too."""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        answer = await call.get("/ping", headers={}, typed=True)
        assert answer.status == 200
        assert "content-type" not in answer.headers, answer.headers


async def test_ping_through_a_proxy_is_refused(tmp_path: Path, moto: dict[str, str]) -> None:
    """Deliberately stricter than the AWS agent (which answers /ping before its forwarding
    check): a request carrying ``X-Forwarded-For`` is refused on every route, /ping too, so
    nothing of the agent answers through a proxy; without it /ping needs no token."""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        answer = await call.get("/ping", headers={"X-Forwarded-For": "192.168.1.100"}, typed=True)
        assert (answer.status, answer.body) == (400, b"Forwarded")
        answer = await call.get("/ping", headers={}, typed=True)
        assert (answer.status, answer.body) == (200, b"healthy")


async def test_path_based_requests(tmp_path: Path, backend: Backend) -> None:
    """configuration::test_path_based_requests: ``GET /v1/<name>`` answers what the query
    form answers (same value, version and key order); lib.rs: slashes are kept in the name
    (``/v1/My/Test?versionStage=...&refreshNow=0``)."""
    name = unique("basic")
    slashed = unique("My") + "/Test"
    await backend.put(name, BASIC)
    await backend.put(slashed, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        query = await call.ok(name)
        path = (await call.get(f"/v1/{name}")).json()
        assert list(path) == TEXT_KEYS
        assert path["Name"] == name
        assert "testuser" in path["SecretString"]
        assert (path["SecretString"], path["VersionId"]) == (
            query["SecretString"],
            query["VersionId"],
        )
        answer = await call.get(f"/v1/{slashed}?versionStage=AWSCURRENT&refreshNow=0")
        assert (answer.status, answer.json()["Name"]) == (200, slashed)


async def test_path_names_are_percent_decoded(tmp_path: Path, backend: Backend) -> None:
    """Deliberately different from the AWS agent (which sends ``/v1/`` names upstream still
    percent-encoded): ``/v1/a%2Db`` reads the secret ``a-b``, and ``%2F`` a slash."""
    name = unique("pct")
    slashed = unique("pct") + "/x"
    await backend.put(name, BASIC)
    await backend.put(slashed, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        encoded = name.replace("-", "%2D")
        answer = await call.get(f"/v1/{encoded}")
        assert (answer.status, answer.json()["Name"]) == (200, name)
        answer = await call.get(f"/v1/{slashed.replace('/', '%2F')}")
        assert (answer.status, answer.json()["Name"]) == (200, slashed)


# --------------------------------------------------------------------------- HTTP unit tests


async def test_every_other_verb_is_405_on_all_three_routes(
    tmp_path: Path, moto: dict[str, str]
) -> None:
    """lib.rs verb tests: POST, PUT, PATCH, DELETE, HEAD, CONNECT, OPTIONS and TRACE with
    a valid token are 405 ``Not allowed`` on ``/ping``, ``/secretsmanager/get`` and
    ``/v1/{name}`` (HEAD without a body)."""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        agent = call.agent
        for target in ("/ping", "/secretsmanager/get?secretId=MyTest", "/v1/MyTest"):
            for verb in VERBS:
                answer = await raw(agent, verb, target, H)
                body = b"" if verb == "HEAD" else b"Not allowed"
                assert (answer.status, answer.body) == (405, body), (verb, target)


async def test_routes_and_parameters(tmp_path: Path, moto: dict[str, str]) -> None:
    """lib.rs route and parameter tests: ``/pong`` (and ``/v1``, ``/secretsmanager/get/``)
    is 404 ``Not found``; ``/secretsmanager/get`` without ``secretId`` (or with it empty)
    is 400 ``missing parameter secretId``; ``/v1/`` is 400 ``missing secret ID``; an
    unknown parameter is 400 ``unknown parameter: abc`` in both forms; ``secretId`` is
    unknown to the path form; empty query segments are skipped."""
    backend = moto_backend(moto)
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        expected = {
            "/pong": (404, "Not found"),
            "/v1": (404, "Not found"),
            "/secretsmanager/get/": (404, "Not found"),
            "/secretsmanager/get": (400, "missing parameter secretId"),
            "/secretsmanager/get?versionStage=AWSPENDING": (400, "missing parameter secretId"),
            "/secretsmanager/get?secretId=": (400, "missing parameter secretId"),
            "/v1/": (400, "missing secret ID"),
            f"/secretsmanager/get?secretId={name}&versionStage=AWSPENDING&abc=XXXXXXXXXXXX": (
                400,
                "unknown parameter: abc",
            ),
            f"/v1/{name}?versionStage=AWSPENDING&abc=XXXXXXXXXXXX": (
                400,
                "unknown parameter: abc",
            ),
            f"/v1/{name}?secretId={name}": (400, "unknown parameter: secretId"),
            f"/secretsmanager/get?secretid={name}": (400, "unknown parameter: secretid"),
        }
        for target, want in expected.items():
            answer = await call.get(target)
            assert (answer.status, answer.text) == want, target
        assert (await call.get(f"/secretsmanager/get?&secretId={name}&")).status == 200


async def test_duplicate_parameters_are_refused(tmp_path: Path, moto: dict[str, str]) -> None:
    """Deliberately different from the AWS agent (whose last duplicate wins): a repeated
    query parameter is 400 in plain text, in both forms, and nothing is read."""
    backend = moto_backend(moto)
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        for target in (
            f"/secretsmanager/get?secretId=nope&secretId={name}",
            f"/v1/{name}?versionStage=AWSPENDING&versionStage=AWSCURRENT",
            f"/secretsmanager/get?secretId={name}&refreshNow=true&refreshNow=true",
        ):
            answer = await call.get(target)
            assert answer.status == 400, target
            assert "more than once" in answer.text
            assert not answer.text.startswith("{")
        assert len(call.agent.state.cache) == 0


async def test_role_refusal_repeated_on_one_connection(
    tmp_path: Path, moto: dict[str, str]
) -> None:
    """The same roleArn request twice in a row on one keep-alive connection (the byte-for-
    byte repeat the protocol answers from its memo) is refused the same way both times."""
    async with aws_agent(tmp_path, aws_source(moto)) as call:
        for _ in range(3):
            answer = await call.secret("any-secret", role_arn=GOOD_ROLE)
            assert answer.status == 403, answer
            assert answer.json()["__type"] == "AccessDeniedException"


async def test_responses_carry_only_length_date_and_our_two(
    tmp_path: Path, moto: dict[str, str]
) -> None:
    """lib.rs / server.rs: no Content-Type or other custom header on any answer (a secret,
    a refusal, an error); kms-agent adds exactly two, deliberately: ``X-Request-Id`` (the
    access line's id, for support) and ``Cache-Control: no-store`` (never cache a secret)."""
    backend = moto_backend(moto)
    name = unique("basic")
    await backend.put(name, BASIC)
    async with aws_agent(tmp_path, backend.text) as call:
        agent = call.agent
        for target, headers in ((f"/secretsmanager/get?secretId={name}", H),
                                ("/secretsmanager/get?secretId=x", {}),
                                ("/secretsmanager/get?secretId=nope-" + name, H)):  # fmt: skip
            answer = await raw(agent, "GET", target, headers)
            assert set(answer.headers) - {"connection"} == {
                "content-length",
                "date",
                "x-request-id",
                "cache-control",
            }, target
            assert answer.headers["cache-control"] == "no-store"
