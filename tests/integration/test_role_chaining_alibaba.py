"""Alibaba RamRoleArn credentials: STS AssumeRole signed with base credentials (AccessKey or
RRSA), against the emulator's STS, which verifies the signature, the role's trust and its
ExternalId; then a secret read with the role's credentials."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from kms_agent.credentials import Refreshing
from kms_agent.credentials.alibaba import resolve
from kms_agent.errors import BadCredentials, ConfigError
from tests.conftest import PLANTED, TOKEN, no_session, running_agent

ACCOUNT = "1234567890123456"
READER = f"acs:ram::{ACCOUNT}:role/secret-reader"
POD_ROLE = f"acs:ram::{ACCOUNT}:role/pod"
PROVIDER = f"acs:ram::{ACCOUNT}:oidc-provider/ack-rrsa-c1"
SUBJECT = "system:serviceaccount:default:app"
#: The role may read the shared secret; the base principals may not.
READ_SHARED = {
    "Statement": [
        {"Effect": "Allow", "Action": ["kms:GetSecretValue"], "Resource": ["secret/shared-*"]}
    ]
}
NOTHING: dict[str, Any] = {"Statement": []}
WHERE = "sources.alibaba.credentials"


def chained(kms_url: str, base: dict[str, Any], **role: object) -> dict[str, Any]:
    return {
        "type": "ram_role_arn",
        "role_arn": READER,
        "sts_endpoint": kms_url,
        **role,
        "base": base,
    }


def pick(
    table: dict[str, Any], session: aiohttp.ClientSession, environ: dict[str, str] | None = None
):
    return resolve(
        table, environ or {}, region="cn-hangzhou", network="public",
        session=lambda: session, where=WHERE,
    )  # fmt: skip


async def test_static_keys_assume_a_role_and_the_agent_reads_with_it(tmp_path, kms, kms_url):
    """RamRoleArn from static AccessKeys: the agent's AssumeRole (signed with the keys,
    carrying the ExternalId and session name) is accepted, and the secret only the role may
    read comes back through the agent, read with the role's STS credentials."""
    ak, sk = kms.add_access_key(NOTHING, principal="user/app")
    kms.add_role(READER, READ_SHARED, trusted=("user/app",), external_id="ext-4711")
    kms.add_secret("shared-db", PLANTED)
    text = f"""
[[sources]]
name = "alibaba"
provider = "alibaba"
region = "cn-hangzhou"
endpoint = "{kms_url}"
timeout_seconds = 5
match = ["*"]
[sources.credentials]
type = "ram_role_arn"
role_arn = "{READER}"
external_id = "ext-4711"
role_session_name = "reader-1"
sts_endpoint = "{kms_url}"
[sources.credentials.base]
type = "access_key"
access_key_id = "{ak}"
access_key_secret = "{sk}"
"""
    async with running_agent(tmp_path, text) as agent:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://{agent.addresses[0]}/secrets/shared-db?format=raw",
                headers={"X-KMS-Token": TOKEN},
            ) as r,
        ):
            assert (r.status, await r.read()) == (200, PLANTED.encode())
        creds = agent.state.router.providers["alibaba"].credentials.current
    assert creds.origin == "ram_role_arn"
    assert creds.access_key_id.startswith("STS.")
    readers = [key for _, action, key in kms.calls if action == "GetSecretValue"]
    assert readers == [creds.access_key_id]
    assumed = [key for _, action, key in kms.calls if action == "AssumeRole"]
    assert assumed == [ak]
    sts = [r for r in kms.recorded if ("x-acs-action", "AssumeRole") in r[2]]
    assert "RoleSessionName=reader-1" in sts[0][1] and "ExternalId=ext-4711" in sts[0][1]


async def test_rrsa_base_assumes_a_second_role(tmp_path, kms, kms_url):
    """RamRoleArn from RRSA: the OIDC token becomes the pod role's STS credentials, which
    sign AssumeRole (with their security token) for the reader role; its credentials read
    the secret that neither the pod role nor anyone else may."""
    kms.add_role(POD_ROLE, NOTHING, PROVIDER, SUBJECT)
    kms.add_role(READER, READ_SHARED, trusted=("assumed-role/pod",))
    kms.add_secret("shared-api", PLANTED)
    token = tmp_path / "token"
    token.write_text(kms.issue_oidc_token(PROVIDER, SUBJECT))
    base = {"type": "rrsa", "role_arn": POD_ROLE, "oidc_provider_arn": PROVIDER,
            "oidc_token_file": str(token), "sts_endpoint": kms_url}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        kind, fetch = pick(chained(kms_url, base), session)
        creds = await fetch()
    assert (kind, creds.origin) == ("ram_role_arn", "ram_role_arn")
    assert kms.identities[creds.access_key_id].principal == "assumed-role/secret-reader"
    signer = next(key for _, action, key in kms.calls if action == "AssumeRole")
    assert kms.identities[signer].principal == "assumed-role/pod"  # the RRSA credentials
    text = f"""
[[sources]]
name = "alibaba"
provider = "alibaba"
region = "cn-hangzhou"
endpoint = "{kms_url}"
timeout_seconds = 5
match = ["*"]
[sources.credentials]
type = "ram_role_arn"
role_arn = "{READER}"
sts_endpoint = "{kms_url}"
[sources.credentials.base]
{chr(10).join(f'{k} = "{v}"' for k, v in base.items())}
"""
    async with running_agent(tmp_path, text) as agent:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://{agent.addresses[0]}/secrets/shared-api?format=raw",
                headers={"X-KMS-Token": TOKEN},
            ) as r,
        ):
            assert (r.status, await r.read()) == (200, PLANTED.encode())


async def test_session_policy_narrows_the_role(kms, kms_url):
    """A session ``policy`` is sent with AssumeRole and the credentials get only what both
    the role and the policy allow: a secret the role may read but the policy excludes is
    refused."""
    ak, sk = kms.add_access_key(NOTHING)
    kms.add_role(READER, READ_SHARED, trusted=("user/app",))
    kms.add_secret("shared-a", "a")
    kms.add_secret("shared-b", "b")
    only_a = json.dumps({"Version": "1", "Statement": [{"Effect": "Allow",
                         "Action": ["kms:*"], "Resource": ["secret/shared-a"]}]})  # fmt: skip
    base = {"access_key_id": ak, "access_key_secret": sk}
    async with aiohttp.ClientSession() as session:
        _, fetch = pick(chained(kms_url, base, policy=only_a), session)
        creds = await fetch()
    from tests.emulators.alibaba_kms import allowed

    policy = kms.identities[creds.access_key_id].policy
    assert allowed(policy, "kms:GetSecretValue", kms.arn("shared-a"))
    assert not allowed(policy, "kms:GetSecretValue", kms.arn("shared-b"))


@pytest.mark.parametrize(
    ("trusted", "required", "given"),
    [
        (("user/other",), None, None),  # the trust policy does not name the caller
        (("user/app",), "ext-right", "ext-wrong"),
        (("user/app",), "ext-right", None),
    ],
    ids=["not-trusted", "wrong-external-id", "missing-external-id"],
)
async def test_refused_assume_role_is_bad_credentials_naming_the_role(
    kms, kms_url, trusted, required, given
):
    """A refused AssumeRole (caller not trusted, ExternalId wrong or missing) is one
    BadCredentials naming the role, STS's code and the base table to check, and no key,
    secret, token or ExternalId anywhere in it."""
    ak, sk = kms.add_access_key(NOTHING, principal="user/app")
    kms.add_role(READER, READ_SHARED, trusted=trusted, external_id=required)
    extra = {} if given is None else {"external_id": given}
    async with aiohttp.ClientSession() as session:
        _, fetch = pick(
            chained(kms_url, {"access_key_id": ak, "access_key_secret": sk}, **extra), session
        )
        with pytest.raises(BadCredentials) as caught:
            await fetch()
    said = f"{caught.value.message} {caught.value.hint}"
    assert f"STS AssumeRole of {READER} refused: NoPermission" in caught.value.message
    assert f"{WHERE}.base" in said
    for leaked in (ak, sk, "ext-right", "ext-wrong"):
        assert leaked not in said and leaked not in repr(caught.value)


async def test_assumed_credentials_refresh_before_expiry(kms, kms_url):
    """Assumed credentials are refreshed like any temporary ones: in the last third of their
    life a caller still gets the current ones while a background AssumeRole runs; in the
    last tenth callers wait for fresh ones. The static base is not re-fetched from STS."""
    ak, sk = kms.add_access_key(NOTHING)
    kms.add_role(READER, READ_SHARED, trusted=("user/app",))
    kms.temp_duration = 1200  # the emulator's lifetime for what it issues
    now = [time.time()]
    async with aiohttp.ClientSession() as session:
        _, fetch = pick(chained(kms_url, {"access_key_id": ak, "access_key_secret": sk}), session)
        held = Refreshing(fetch, "alibaba", clock=lambda: now[0])
        first = await held.get()
        assert kms.sts_calls == 1
        assert first.expiration is not None and 0 < first.expiration - now[0] <= 1200
        now[0] = first.expiration - 300  # inside the last third, not the last tenth
        assert await held.get() is first
        assert held._background is not None
        await held._background
        second = held.current
        assert kms.sts_calls == 2 and second is not None and second is not first
        assert second.expiration is not None
        now[0] = second.expiration - 30  # the last tenth: the caller waits for fresh ones
        third = await held.get()
        assert kms.sts_calls == 3 and third not in (first, second)
        await held.close()


async def test_expired_base_credentials_are_fetched_anew(tmp_path, kms, kms_url):
    """When STS refuses the RRSA base credentials themselves (expired server-side), the
    attempt fails as stale, the base is dropped, and the next attempt exchanges the OIDC
    token again and assumes the role with the new base."""
    kms.add_role(POD_ROLE, NOTHING, PROVIDER, SUBJECT)
    kms.add_role(READER, READ_SHARED, trusted=("assumed-role/pod",))
    token = tmp_path / "token"
    token.write_text(kms.issue_oidc_token(PROVIDER, SUBJECT))
    base = {"type": "rrsa", "role_arn": POD_ROLE, "oidc_provider_arn": PROVIDER,
            "oidc_token_file": str(token), "sts_endpoint": kms_url}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        _, fetch = pick(chained(kms_url, base), session)
        await fetch()
        oidc_exchanges = kms.sts_calls
        kms.expire_temporary_credentials()
        with pytest.raises(BadCredentials, match="base credentials are no longer valid") as caught:
            await fetch()
        assert caught.value.transient  # StaleCredentials: retried by the provider
        fresh = await fetch()
    assert kms.identities[fresh.access_key_id].principal == "assumed-role/secret-reader"
    # the stale attempt was refused at the signature check, before STS counted it; then
    # one new OIDC exchange and one AssumeRole
    assert "InvalidAccessKeyId.NotFound" in kms.rejections
    assert kms.sts_calls == oidc_exchanges + 2


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"type": "ram_role_arn"}, r"credentials.role_arn: required"),
        (
            {"type": "ram_role_arn", "role_arn": READER, "oidc_token_file": "/t"},
            r"credentials.oidc_token_file: unknown setting for type = 'ram_role_arn'",
        ),
        ({"type": "ram_role_arn", "role_arn": READER, "duration_seconds": 600}, "900-43200"),
        (
            {"type": "ram_role_arn", "role_arn": READER, "policy": "{not json"},
            r"credentials.policy: must be a session policy",
        ),
        (
            {"type": "ram_role_arn", "role_arn": READER, "role_session_name": "a b"},
            r"credentials.role_session_name",
        ),
        (
            {"type": "ram_role_arn", "role_arn": READER, "base": "access_key"},
            r"credentials.base: must be a table",
        ),
        (
            {"type": "ram_role_arn", "role_arn": READER, "base": {"type": "access_key"}},
            r"credentials.base: AccessKey credentials need",
        ),
        (
            {"type": "ram_role_arn", "role_arn": READER, "base": {"acces_key_id": "x"}},
            r"credentials.base.acces_key_id: unknown setting",
        ),
        (
            {
                "type": "access_key",
                "access_key_id": "a",
                "access_key_secret": "s",
                "external_id": "x1",
            },
            r"credentials.external_id: only taken with type = 'ram_role_arn'",
        ),
    ],
)
def test_bad_ram_role_arn_tables_fail_config_naming_the_key(table, message):
    """Wrong RamRoleArn settings, and chain-only keys on another type, fail at config time
    with the dotted key named (the base table's own errors under ``.base``)."""
    with pytest.raises(ConfigError, match=message):
        resolve(table, {}, region="cn-hangzhou", network="public", session=no_session, where=WHERE)
