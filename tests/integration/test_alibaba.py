"""The alibaba source end to end: the agent's HTTP API in front, the KMS emulator behind."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from kms_agent import cli
from kms_agent.agent import Agent
from tests.conftest import PLANTED, TOKEN, running_agent

H = {"X-KMS-Token": TOKEN}
AIGW_ONLY = {
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["kms:GetSecretValue", "kms:List*"],
            "Resource": ["secret/aigw!*"],
        },
        {
            "Effect": "Allow",
            "Action": ["kms:GetSecretValue", "kms:Decrypt"],
            "Resource": ["secret/db-*", "secret/paid-*", "acs:kms:*:*:key/key-allowed"],
        },
    ]
}


def source_toml(kms_url: str, extra: str = "", credentials: str = "") -> str:
    return f"""
[cache]
ttl = 300
[[sources]]
name = "alibaba"
provider = "alibaba"
region = "cn-hangzhou"
endpoint = "{kms_url}"
timeout_seconds = 5
match = ["*"]
{extra}
{credentials}
"""


agent_for = running_agent


def ak_env(kms) -> dict[str, str]:
    ak, sk = kms.add_access_key(AIGW_ONLY)
    return {"ALIBABA_CLOUD_ACCESS_KEY_ID": ak, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": sk}


async def get(agent: Agent, path: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{agent.addresses[0]}{path}", headers={**H, **headers}) as r,
    ):
        return r.status, await r.read(), dict(r.headers)


async def test_default_secret_through_the_agent_and_listing_by_product(tmp_path, kms, kms_url):
    """Acceptance 1: a product's default secret reads raw through the agent; listing by the
    product prefix shows only that product's secrets the identity may list."""
    kms.add_secret("aigw!secret-abc", PLANTED + "-aigw", product="aigw")
    kms.add_secret("aigw!secret-def", PLANTED + "-def", product="aigw")
    kms.add_secret("bailian!secret-123", PLANTED + "-bailian", product="bailian")
    async with agent_for(tmp_path, source_toml(kms_url), ak_env(kms)) as agent:
        assert (await get(agent, "/secrets/aigw!secret-abc?format=raw"))[:2] == (
            200,
            (PLANTED + "-aigw").encode(),
        )
        status, body, _ = await get(agent, "/secrets?prefix=aigw!")
        assert status == 200
        assert [s["name"] for s in json.loads(body)["secrets"]] == [
            "aigw!secret-abc",
            "aigw!secret-def",
        ]
        status, body, _ = await get(agent, "/secrets?prefix=bailian!")
        assert json.loads(body)["secrets"] == []
        status, body, _ = await get(agent, "/secretsmanager/get?secretId=aigw!secret-def")
        assert json.loads(body)["SecretString"] == PLANTED + "-def"
    assert "Rejected.Throttling" not in kms.rejections


async def test_rrsa_credentials_and_refresh_while_requests_continue(tmp_path, kms, kms_url):
    """Acceptance 2 (RRSA): the OIDC token file is exchanged for STS credentials; when they
    expire server-side, or enter their refresh window, they are replaced with no failure."""
    role, provider_arn = (
        "acs:ram::1234567890123456:role/kms-reader",
        "acs:ram::1234567890123456:oidc-provider/ack-rrsa-c1",
    )
    kms.add_role(role, AIGW_ONLY, provider_arn, "system:serviceaccount:default:app")
    token_file = tmp_path / "token"
    token_file.write_text(kms.issue_oidc_token(provider_arn, "system:serviceaccount:default:app"))
    kms.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    env = {
        "ALIBABA_CLOUD_ROLE_ARN": role,
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": provider_arn,
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE": str(token_file),
    }
    creds = f'[sources.credentials]\nsts_endpoint = "{kms_url}"\n'
    async with agent_for(tmp_path, source_toml(kms_url, credentials=creds), env) as agent:
        statuses = []
        statuses.append((await get(agent, "/secrets/aigw!secret-abc?format=raw"))[0])
        calls = kms.sts_calls
        # The kubelet rotates the projected token; the old one stops being valid.
        kms.oidc_tokens.clear()
        token_file.write_text(
            kms.issue_oidc_token(provider_arn, "system:serviceaccount:default:app")
        )
        assert kms.expire_temporary_credentials() >= 1
        for _ in range(5):
            statuses.append(
                (await get(agent, "/secrets/aigw!secret-abc?format=raw&refresh=true"))[0]
            )
        assert kms.sts_calls == calls + 1  # one exchange, with the re-read token
        # Credentials inside their refresh window are replaced in the background.
        kms.temp_duration = 600
        kms.expire_temporary_credentials()
        statuses.append((await get(agent, "/secrets/aigw!secret-abc?refresh=true"))[0])
        credentials = agent.state.router.providers["alibaba"].credentials
        # 450 s into their 600 s life: past the last third (background refresh), not yet in
        # the last tenth (where callers would wait).
        credentials._clock = lambda: time.time() + 450
        before = kms.sts_calls
        statuses.append((await get(agent, "/secrets/aigw!secret-abc?refresh=true"))[0])
        await credentials._background
        assert kms.sts_calls == before + 1
        assert statuses == [200] * len(statuses)
        m = await scrape(agent)
        expiry = m[("kms_agent_credentials_expiry_timestamp_seconds", (("source", "alibaba"),))]
        assert 0 < expiry - time.time() <= 600


async def test_ecs_ram_role_from_instance_metadata(tmp_path, kms, kms_url):
    """Acceptance 2 (ECS): credentials come from the metadata service with its session
    token; expired ones are fetched again with no failed request."""
    kms.ecs_role = ("KmsReader", AIGW_ONLY)
    kms.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    creds = f'[sources.credentials]\ntype = "ecs_ram_role"\nmetadata_endpoint = "{kms_url}"\n'
    async with agent_for(tmp_path, source_toml(kms_url, credentials=creds), {}) as agent:
        assert (await get(agent, "/secrets/aigw!secret-abc?format=raw"))[:2] == (
            200,
            PLANTED.encode(),
        )
        assert kms.metadata_calls == 1
        kms.expire_temporary_credentials()
        assert (await get(agent, "/secrets/aigw!secret-abc?format=raw&refresh=true"))[0] == 200
        assert kms.metadata_calls == 2


@pytest.mark.parametrize(
    ("case", "status", "code", "hint_has"),
    [
        ("no-permission", 502, "UpstreamAccessDenied", '"Action": "kms:GetSecretValue"'),
        ("cmk-without-decrypt", 502, "UpstreamDecryptDenied", '"Action": "kms:Decrypt"'),
        ("pending-deletion", 404, "SecretPendingDeletion", "RestoreSecret"),
        ("not-found", 404, "SecretNotFound", "region"),
    ],
)
async def test_troubleshooting_cases_each_have_their_code_and_hint(
    tmp_path, kms, kms_url, case, status, code, hint_has
):
    """Acceptance 3: each case of the troubleshooting order gets its own code and hint."""
    kms.add_secret("mcp!no-access", PLANTED)
    kms.add_secret("paid-cmk", PLANTED, key_id="key-denied")
    kms.add_secret("db-pending", PLANTED)
    kms.schedule_deletion("db-pending")
    name = {
        "no-permission": "mcp!no-access",
        "cmk-without-decrypt": "paid-cmk",
        "pending-deletion": "db-pending",
        "not-found": "db-nothing",
    }[case]
    async with agent_for(tmp_path, source_toml(kms_url), ak_env(kms)) as agent:
        got, body, _ = await get(agent, f"/secrets/{name}")
    err = json.loads(body)["error"]
    assert (got, err["code"]) == (status, code)
    assert hint_has in err["hint"]
    if case == "no-permission":
        assert "acs:kms:cn-hangzhou:*:secret/mcp!no-access" in err["hint"]


async def test_unreachable_endpoint_is_503_with_a_network_hint(tmp_path, kms):
    """Acceptance 3: nothing listening where the endpoint points: 503 and a network hint,
    the agent stays up and not ready, naming the source."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with agent_for(
        tmp_path, source_toml(dead, extra="max_attempts = 2"), ak_env(kms)
    ) as agent:
        got, body, _ = await get(agent, "/secrets/aigw!x")
        assert agent.state.ready is False
        assert "source alibaba: UpstreamUnavailable" in agent.state.reason
    err = json.loads(body)["error"]
    assert (got, err["code"]) == (503, "UpstreamUnavailable")
    assert "network" in err["hint"]


@pytest.mark.parametrize(
    ("name", "failed_step"),
    [
        ("aigw!secret-abc", None),
        ("mcp!no-access", "permission"),
        ("paid-cmk", "decrypt"),
        ("db-pending", "state"),
        ("db-missing", "state"),
    ],
)
async def test_doctor_names_the_failing_step(tmp_path, kms, kms_url, capsys, name, failed_step):
    """`kms-agent doctor NAME --json` names the failing step and the fix; exit 0 only when
    the secret reads."""
    kms.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    kms.add_secret("mcp!no-access", PLANTED)
    kms.add_secret("paid-cmk", PLANTED, key_id="key-denied")
    kms.add_secret("db-pending", PLANTED)
    kms.schedule_deletion("db-pending")
    path = tmp_path / "kms.toml"
    path.write_text(source_toml(kms_url))
    code = await asyncio.to_thread(
        cli.main,
        ["--config", str(path), "doctor", name, "--json"],
        {**ak_env(kms), "KMS_TOKEN": TOKEN},
    )
    report = json.loads(capsys.readouterr().out)
    assert report["failed_step"] == failed_step
    assert code == (0 if failed_step is None else 1)
    assert PLANTED not in json.dumps(report)
    if failed_step == "permission":
        failing = next(s for s in report["steps"] if s["status"] == "failed")
        assert "kms:GetSecretValue" in failing["hint"]


@pytest.mark.parametrize("fault", ["503", "500", "reset", "throttle"])
async def test_transient_faults_are_retried(tmp_path, kms, kms_url, fault):
    """One 5xx, connection reset or throttling answer is retried inside the deadline."""
    kms.add_secret("aigw!secret-abc", PLANTED)
    async with agent_for(tmp_path, source_toml(kms_url), ak_env(kms)) as agent:
        kms.faults.next.append(fault)
        assert (await get(agent, "/secrets/aigw!secret-abc?format=raw"))[:2] == (
            200,
            PLANTED.encode(),
        )
        if fault == "throttle":
            m = await scrape(agent)
            assert m[("kms_agent_upstream_throttled_total", (("source", "alibaba"),))] == 1


async def test_garbage_and_outage_serve_stale_or_fail_cleanly(tmp_path, kms, kms_url):
    """A garbage body with nothing cached is a 503; with a cached value the agent serves it
    stale through an outage."""
    kms.add_secret("aigw!a", PLANTED + "-a")
    kms.add_secret("aigw!b", PLANTED + "-b")
    text = source_toml(kms_url, extra="max_attempts = 1")
    async with agent_for(tmp_path, text, ak_env(kms)) as agent:
        kms.faults.next.append("garbage")
        got, body, _ = await get(agent, "/secrets/aigw!a")
        assert (got, json.loads(body)["error"]["code"]) == (503, "UpstreamUnavailable")
        assert (await get(agent, "/secrets/aigw!b"))[0] == 200
        entry = agent.state.cache.peek(("alibaba", "aigw!b", None, None))
        entry.expires_at = entry.refresh_at = agent.state.cache.now()  # expire it (max_stale 1 h)
        kms.faults.next.extend(["503"] * 3)
        got, body, headers = await get(agent, "/secrets/aigw!b")
        assert got == 200
        assert json.loads(body)["stale"] is True
        assert "Age" in headers


async def scrape(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{agent.metrics_addresses[0]}/metrics") as r,
    ):
        text = await r.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_secret_read_by_its_arn_is_sent_as_the_secret_name(tmp_path, kms, kms_url):
    """A name that is an Alibaba secret ARN (how a secret another account shares by secret
    policy is named) routes to the alibaba source and is sent as SecretName, which KMS
    accepts; the answer (named by the plain name) is taken as the one asked for, and the
    entry is keyed by the ARN as asked."""
    kms.add_secret("aigw!secret-abc", PLANTED + "-arn", product="aigw")
    arn = kms.arn("aigw!secret-abc")
    async with agent_for(tmp_path, source_toml(kms_url), ak_env(kms)) as agent:
        assert (await get(agent, f"/secrets/{arn}?format=raw"))[:2] == (
            200,
            (PLANTED + "-arn").encode(),
        )
        status, body, _ = await get(agent, f"/secretsmanager/get?secretId={arn}")
        assert status == 200
        assert json.loads(body)["SecretString"] == PLANTED + "-arn"
        assert [e.key[1] for e in agent.state.cache.entries()] == [arn]  # keyed as asked
