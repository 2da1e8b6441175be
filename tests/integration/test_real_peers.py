"""AWS Secrets Manager (moto server) and Vault/OpenBao (bao dev server): the whole chain
against software nobody on this team wrote."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets as pysecrets
from typing import Any

import aiohttp
import boto3
import pytest

from kms_agent.agent import Agent
from kms_agent.credentials import Credentials as AgentCredentials
from kms_agent.signing import Request
from kms_agent.signing import aws as sigv4
from kms_agent.store import LocalStore
from tests.conftest import PLANTED, TOKEN, moto_source, running_agent

H = {"X-KMS-Token": TOKEN}


agent_for = running_agent


async def get(agent: Agent, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{agent.addresses[0]}{path}", headers=H) as r,
    ):
        return r.status, await r.read()


def aws_source(moto: dict[str, Any], extra: str = "") -> str:
    """An aws source over moto for the names under ``aws/``."""
    return moto_source(moto, match="aws/*", extra=extra)


def sm(moto: dict[str, Any]):
    return boto3.client(
        "secretsmanager",
        endpoint_url=moto["url"],
        region_name="us-east-1",
        aws_access_key_id=moto["ak"],
        aws_secret_access_key=moto["sk"],
    )


def unique(prefix: str) -> str:
    return f"{prefix}{pysecrets.token_hex(4)}"


# --------------------------------------------------------------------------- AWS


async def test_rotation_refresh_ahead_previous_stage_and_refresh_now(tmp_path, moto):
    """Acceptance 1: after PutSecretValue the compat endpoint returns the new value once the
    entry refreshes (in the background, without a caller waiting), AWSPREVIOUS the old one,
    and refreshNow=true the new one at once."""
    name = unique("aws/app/db-")
    client = sm(moto)
    await asyncio.to_thread(client.create_secret, Name=name, SecretString=PLANTED + "-v1")
    async with agent_for(tmp_path, aws_source(moto)) as agent:
        status, body = await get(agent, f"/secretsmanager/get?secretId={name}")
        assert (status, json.loads(body)["SecretString"]) == (200, PLANTED + "-v1")
        assert json.loads(body)["ARN"].startswith("arn:aws:secretsmanager:us-east-1:")
        await asyncio.to_thread(
            client.put_secret_value, SecretId=name, SecretString=PLANTED + "-v2"
        )
        entry = agent.state.cache.peek(("aws", name, None, None))
        entry.refresh_at = 0  # the entry enters its refresh window
        status, body = await get(agent, f"/secretsmanager/get?secretId={name}")
        assert json.loads(body)["SecretString"] == PLANTED + "-v1"  # served at once, stale-free
        await asyncio.gather(*agent.state.cache._inflight.values())
        status, body = await get(agent, f"/secretsmanager/get?secretId={name}")
        assert json.loads(body)["SecretString"] == PLANTED + "-v2"
        status, body = await get(
            agent, f"/secretsmanager/get?secretId={name}&versionStage=AWSPREVIOUS"
        )
        assert json.loads(body)["SecretString"] == PLANTED + "-v1"
        await asyncio.to_thread(
            client.put_secret_value, SecretId=name, SecretString=PLANTED + "-v3"
        )
        status, body = await get(agent, f"/secretsmanager/get?secretId={name}&refreshNow=true")
        assert json.loads(body)["SecretString"] == PLANTED + "-v3"


async def test_versions_binary_not_found_deletion_and_bad_credentials(tmp_path, moto):
    """Versions by id, binary secrets, not found, marked for deletion, bad credentials."""
    client = sm(moto)
    text, blob, doomed = unique("aws/t-"), unique("aws/b-"), unique("aws/d-")
    v1 = (await asyncio.to_thread(client.create_secret, Name=text, SecretString="one"))["VersionId"]
    await asyncio.to_thread(client.put_secret_value, SecretId=text, SecretString="two")
    await asyncio.to_thread(
        client.create_secret, Name=blob, SecretBinary=b"\x00\x01" + PLANTED.encode()
    )
    await asyncio.to_thread(client.create_secret, Name=doomed, SecretString="bye")
    await asyncio.to_thread(client.delete_secret, SecretId=doomed, RecoveryWindowInDays=7)
    async with agent_for(tmp_path, aws_source(moto)) as agent:
        assert await get(agent, f"/secrets/{text}?format=raw&version_id={v1}") == (200, b"one")
        assert await get(agent, f"/secrets/{blob}?format=raw") == (
            200,
            b"\x00\x01" + PLANTED.encode(),
        )
        status, body = await get(agent, f"/v1/{blob}")
        assert base64.b64decode(json.loads(body)["SecretBinary"]) == b"\x00\x01" + PLANTED.encode()
        status, body = await get(agent, "/secrets/aws/never-created")
        assert (status, json.loads(body)["error"]["code"]) == (404, "SecretNotFound")
        status, body = await get(agent, f"/secrets/{doomed}")
        assert (status, json.loads(body)["error"]["code"]) == (404, "SecretPendingDeletion")
        status, body = await get(agent, "/secrets?prefix=aws/t-")
        assert text in [s["name"] for s in json.loads(body)["secrets"]]
    wrong = aws_source(moto).replace(moto["sk"], "not-the-secret-key")
    async with agent_for(tmp_path, wrong) as agent:
        status, body = await get(agent, f"/secrets/{text}")
    assert (status, json.loads(body)["error"]["code"]) == (502, "UpstreamBadCredentials")


async def test_irsa_web_identity_through_moto_sts(tmp_path, moto_open):
    """IRSA: the projected token is exchanged with STS AssumeRoleWithWebIdentity (moto) and
    the temporary credentials read the secret."""
    client = boto3.client(
        "secretsmanager",
        endpoint_url=moto_open,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    name = unique("aws/irsa-")
    await asyncio.to_thread(client.create_secret, Name=name, SecretString=PLANTED)
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YXBwIn0.c2ln")
    text = f"""
[[sources]]
name = "aws"
provider = "aws"
region = "us-east-1"
endpoint = "{moto_open}"
match = ["*"]
[sources.credentials]
sts_endpoint = "{moto_open}"
"""
    env = {
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/app",
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
    }
    async with agent_for(tmp_path, text, env) as agent:
        assert await get(agent, f"/secrets/{name}?format=raw") == (200, PLANTED.encode())
        creds = agent.state.router.providers["aws"].credentials.current
    assert creds.origin == "web_identity"
    assert creds.access_key_id.startswith("ASIA")


def test_sigv4_matches_botocore():
    """Acceptance 4: the agent's SigV4 equals botocore's for the same request."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    body = b'{"SecretId":"prod/db"}'
    headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Date": "20240101T000000Z",
        "X-Amz-Target": "secretsmanager.GetSecretValue",
        "X-Amz-Security-Token": "SESSIONTOKEN",
    }
    request = AWSRequest(
        method="POST",
        url="https://secretsmanager.us-east-1.amazonaws.com/",
        data=body,
        headers=headers,
    )
    request.context["timestamp"] = "20240101T000000Z"
    auth = SigV4Auth(
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "SESSIONTOKEN"),
        "secretsmanager",
        "us-east-1",
    )
    request.headers["Host"] = "secretsmanager.us-east-1.amazonaws.com"
    canonical = auth.canonical_request(request)
    botocore_signature = auth.signature(auth.string_to_sign(request, canonical), request)
    ours = sigv4.authorization(
        Request(
            "POST", "/", {}, {**headers, "Host": "secretsmanager.us-east-1.amazonaws.com"}, body
        ),
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        service="secretsmanager",
    )
    # The Signer adds the date and the session token itself, to the same result.
    unsigned = {k: v for k, v in headers.items() if not k.startswith("X-Amz-") or "Target" in k}
    sent = sigv4.SigV4("us-east-1", "secretsmanager").sign(
        Request("POST", "/", {}, unsigned, body).to("secretsmanager.us-east-1.amazonaws.com"),
        AgentCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "SESSIONTOKEN"),
        now=1704067200.0,
    )
    assert sent["Authorization"] == ours
    assert ours.endswith(f"Signature={botocore_signature}")
    assert botocore_signature == "ef3e6c65e028f7f3c7e64366b15eb5ed9fcd647c2176f4155922730fd68db707"


# --------------------------------------------------------------------------- Vault / OpenBao


async def bao_call(
    bao: str, method: str, path: str, payload: dict[str, Any] | None = None
) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"{bao}{path}", json=payload, headers={"X-Vault-Token": "root"}) as r,
    ):
        text = await r.text()
        assert r.status in (200, 204), (path, r.status, text)
        return json.loads(text) if text.strip() else {}


@pytest.fixture(name="approle")
async def _approle(bao):
    """An AppRole whose tokens live 3 s and cannot be renewed past that."""
    role = f"agent{pysecrets.token_hex(3)}"
    with contextlib.suppress(AssertionError):
        await bao_call(bao, "POST", "/v1/sys/auth/approle", {"type": "approle"})
    policy = 'path "secret/data/*" { capabilities = ["read"] }\npath "secret/metadata/*" { capabilities = ["read", "list"] }'
    await bao_call(bao, "PUT", f"/v1/sys/policies/acl/{role}", {"policy": policy})
    await bao_call(
        bao,
        "POST",
        f"/v1/auth/approle/role/{role}",
        {"token_policies": [role], "token_ttl": "3s", "token_max_ttl": "3s"},
    )
    role_id = (await bao_call(bao, "GET", f"/v1/auth/approle/role/{role}/role-id"))["data"][
        "role_id"
    ]
    secret_id = (await bao_call(bao, "POST", f"/v1/auth/approle/role/{role}/secret-id"))["data"][
        "secret_id"
    ]
    return role_id, secret_id


def vault_source(bao: str, role_id: str, secret_id: str) -> str:
    return f"""
[[sources]]
name = "vault"
provider = "vault"
address = "{bao}"
auth = "approle"
role_id = "{role_id}"
secret_id = "{secret_id}"
match = ["vault/*"]
"""


async def test_approle_read_and_relogin_after_the_token_ttl(tmp_path, bao, approle):
    """Acceptance 2: a KV v2 secret reads with AppRole; requests keep succeeding while the
    3 s tokens expire and the agent logs in again; a revoked token is replaced too."""
    path = unique("vault/app/db-")
    await bao_call(
        bao, "POST", f"/v1/secret/data/{path}", {"data": {"password": PLANTED, "user": "app"}}
    )
    await bao_call(
        bao,
        "POST",
        f"/v1/secret/data/{path}",
        {"data": {"password": PLANTED + "-2", "user": "app"}},
    )
    async with agent_for(tmp_path, vault_source(bao, *approle)) as agent:
        assert await get(agent, f"/secrets/{path}?field=password&format=raw") == (
            200,
            (PLANTED + "-2").encode(),
        )
        prev = await get(
            agent, f"/secrets/{path}?field=password&format=raw&version_stage=AWSPREVIOUS"
        )
        assert prev == (200, PLANTED.encode())
        provider = agent.state.router.providers["vault"]
        statuses = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 4.5  # longer than the 3 s token TTL
        while loop.time() < end:
            statuses.append((await get(agent, f"/secrets/{path}?format=raw&refresh=true"))[0])
            await asyncio.sleep(0.25)  # pacing the client loop
        assert set(statuses) == {200}
        assert provider.logins >= 2
        token = provider.credentials.current.access_key_secret
        await bao_call(bao, "POST", "/v1/auth/token/revoke", {"token": token})
        assert (await get(agent, f"/secrets/{path}?format=raw&refresh=true"))[0] == 200
        assert provider.credentials.current.access_key_secret != token


async def test_vault_not_found_and_deleted_version(tmp_path, bao, approle):
    """A missing path and a soft-deleted latest version are both 404 with their own message."""
    path = unique("vault/app/gone-")
    await bao_call(bao, "POST", f"/v1/secret/data/{path}", {"data": {"k": "v"}})
    await bao_call(bao, "DELETE", f"/v1/secret/data/{path}")
    async with agent_for(tmp_path, vault_source(bao, *approle)) as agent:
        status, body = await get(agent, "/secrets/vault/app/never-was")
        assert (status, json.loads(body)["error"]["code"]) == (404, "SecretNotFound")
        status, body = await get(agent, f"/secrets/{path}")
        err = json.loads(body)["error"]
        assert (status, err["code"]) == (404, "SecretNotFound")
        assert "deleted" in err["message"]


async def test_three_sources_route_by_glob(tmp_path, moto, bao, approle):
    """Acceptance 3: local, moto and OpenBao in one agent: aws/*, vault/* and the rest."""
    aws_name, vault_path = unique("aws/route-"), unique("vault/route-")
    await asyncio.to_thread(sm(moto).create_secret, Name=aws_name, SecretString="from-moto")
    await bao_call(bao, "POST", f"/v1/secret/data/{vault_path}", {"data": {"value": "from-bao"}})
    LocalStore(tmp_path / "d").put("plain-secret", b"from-local")
    text = (
        aws_source(moto)
        + vault_source(bao, *approle)
        + '\n[[sources]]\nname = "local"\nprovider = "local"\nmatch = ["*"]\n'
    )
    async with agent_for(tmp_path, text) as agent:
        assert await get(agent, f"/secrets/{aws_name}?format=raw") == (200, b"from-moto")
        assert await get(agent, f"/secrets/{vault_path}?field=value&format=raw") == (
            200,
            b"from-bao",
        )
        assert await get(agent, "/secrets/plain-secret?format=raw") == (200, b"from-local")
        sources = {}
        for name in (aws_name, vault_path, "plain-secret"):
            status, body = await get(agent, f"/secrets/{name}")
            assert status == 200
            sources[name] = json.loads(body)["source"]
    assert sources == {aws_name: "aws", vault_path: "vault", "plain-secret": "local"}
