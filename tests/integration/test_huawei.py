"""The huawei source end to end: the agent's HTTP API in front, the CSMS emulator behind."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from kms_agent import cli
from kms_agent.agent import Agent
from tests.conftest import PLANTED, TOKEN, running_agent

H = {"X-KMS-Token": TOKEN}


def source_toml(url: str, project: str, extra: str = "", credentials: str = "") -> str:
    return f"""
[[sources]]
name = "huawei"
provider = "huawei"
endpoint = "{url}"
project_id = "{project}"
timeout_seconds = 5
match = ["*"]
{extra}
{credentials}
"""


agent_for = running_agent


def aksk(csms, readable=("*",)) -> dict[str, str]:
    ak, sk = csms.add_identity(list(readable))
    return {"HUAWEICLOUD_SDK_AK": ak, "HUAWEICLOUD_SDK_SK": sk}


async def get(agent: Agent, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{agent.addresses[0]}{path}", headers=H) as r,
    ):
        return r.status, await r.read()


async def test_current_rotated_and_previous_stage(tmp_path, csms, csms_url):
    """Acceptance 1: db-password under csms/default reads through the agent; after a new
    version, a forced refresh returns it and SYSPREVIOUS still reads the old one."""
    csms.add_secret("db-password", PLANTED + "-1")
    async with agent_for(tmp_path, source_toml(csms_url, csms.project_id), aksk(csms)) as agent:
        assert await get(agent, "/secrets/db-password?format=raw") == (
            200,
            (PLANTED + "-1").encode(),
        )
        csms.put_version("db-password", PLANTED + "-2")
        assert await get(agent, "/secrets/db-password?format=raw") == (
            200,
            (PLANTED + "-1").encode(),
        )  # cached
        assert await get(agent, "/secrets/db-password?format=raw&refresh=true") == (
            200,
            (PLANTED + "-2").encode(),
        )
        assert await get(agent, "/secrets/db-password?format=raw&version_stage=SYSPREVIOUS") == (
            200,
            (PLANTED + "-1").encode(),
        )
        status, body = await get(
            agent, "/secretsmanager/get?secretId=db-password&versionStage=AWSPREVIOUS"
        )
        assert json.loads(body)["SecretString"] == PLANTED + "-1"
        status, body = await get(agent, "/secrets?prefix=db-")
        assert status == 200
        assert [s["name"] for s in json.loads(body)["secrets"]] == ["db-password"]


async def test_temporary_credentials_expiring_mid_run(tmp_path, csms, csms_url):
    """Acceptance 2: ECS temporary credentials that expire while requests run are fetched
    again from the metadata service; no request fails."""
    csms.ecs_identity_readable = ["*"]
    csms.add_secret("db-password", PLANTED)
    creds = f'[sources.credentials]\ntype = "ecs"\nmetadata_endpoint = "{csms_url}"\n'
    async with agent_for(
        tmp_path, source_toml(csms_url, csms.project_id, credentials=creds), {}
    ) as agent:
        statuses = []
        for i in range(6):
            if i == 3:
                csms.expire_temporary()
            statuses.append((await get(agent, "/secrets/db-password?format=raw&refresh=true"))[0])
        assert statuses == [200] * 6
        assert csms.metadata_calls == 2


@pytest.mark.parametrize(
    ("case", "status", "code", "hint_has"),
    [
        ("not-found", 404, "SecretNotFound", "project"),
        ("no-permission", 502, "UpstreamAccessDenied", "csms:secret:getVersion"),
        ("cmk-disabled", 502, "UpstreamDecryptDenied", "kms_key_id"),
        ("pending-deletion", 404, "SecretPendingDeletion", "restore"),
        ("throttled", 503, "UpstreamThrottled", "rate_limit_qps"),
        ("wrong-sk", 502, "UpstreamBadCredentials", "clock"),
        ("bad-name", 400, "BadRequest", "1-64 letters"),
    ],
)
async def test_each_failure_has_its_code_and_hint(
    tmp_path, csms, csms_url, case, status, code, hint_has
):
    """Acceptance 3: every failure case returns its own code and hint."""
    csms.add_secret("db-password", PLANTED)
    csms.add_secret("other-app", PLANTED)
    cmk = csms.add_key("app/cmk")
    csms.add_secret("paid-secret", PLANTED, key=cmk)
    csms.set_key_state(cmk.id, "disabled")
    csms.add_secret("going-away", PLANTED)
    csms.secrets["going-away"].state = "PENDING_DELETE"
    env = aksk(csms, readable=("db-*", "paid-*", "going-*"))
    if case == "wrong-sk":
        env["HUAWEICLOUD_SDK_SK"] = "not-the-secret-key"
    name = {
        "not-found": "db-nothing",
        "no-permission": "other-app",
        "cmk-disabled": "paid-secret",
        "pending-deletion": "going-away",
        "throttled": "db-password",
        "wrong-sk": "db-password",
        "bad-name": "csms!default",
    }[case]
    async with agent_for(
        tmp_path, source_toml(csms_url, csms.project_id, extra="max_attempts = 1"), env
    ) as agent:
        if case == "throttled":
            csms.faults.extend(["throttle"] * 3)
        got, body = await get(agent, f"/secrets/{name}")
    err = json.loads(body)["error"]
    assert (got, err["code"]) == (status, code)
    assert hint_has in err["hint"]


async def test_doctor_shows_the_key_when_decryption_fails(tmp_path, csms, csms_url, capsys):
    """Acceptance 3: doctor names the decrypt step and the secret's kms_key_id."""
    cmk = csms.add_key("app/cmk")
    csms.add_secret("paid-secret", PLANTED, key=cmk)
    csms.set_key_state(cmk.id, "disabled")
    path = tmp_path / "kms.toml"
    path.write_text(source_toml(csms_url, csms.project_id))
    code = await asyncio.to_thread(
        cli.main,
        ["--config", str(path), "doctor", "paid-secret"],
        {**aksk(csms), "KMS_TOKEN": TOKEN},
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] decrypt" in out
    assert f"key: {cmk.id}" in out
    assert PLANTED not in out
