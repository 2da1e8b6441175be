"""AWS ``type = "assume_role"`` credentials against moto's STS: a secret that exists only in
account B read, by name and by full ARN, through a role of B assumed with keys of account A.

moto places credentials in an account by the role ARN AssumeRole is given (its
``STSBackend._create_access_key`` takes the account from the ARN) and then serves every call
made with them from that account's backends, so an assumed role of B reads B's secrets. This
server checks SigV4 signatures and IAM policies once the set-up calls are done.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import boto3
import pytest

from kms_agent.credentials.aws import resolve
from kms_agent.errors import BadCredentials, ConfigError
from tests.conftest import PLANTED, TOKEN, _bin, _free_port, _start_until, no_session, running_agent

ACCOUNT_A = "123456789012"  # moto's default account: the agent's own keys live here
ACCOUNT_B = "210987654321"
ROLE_B = f"arn:aws:iam::{ACCOUNT_B}:role/shared-reader"
SECRET = "shared/db"
#: The calls before moto starts checking signatures and policies (made in ``_accounts``).
SETUP_CALLS = 7
WHERE = "sources.aws.credentials"


def _client(url: str, service: str, ak: str, sk: str, token: str | None = None):
    return boto3.client(
        service, endpoint_url=url, region_name="us-east-1",
        aws_access_key_id=ak, aws_secret_access_key=sk, aws_session_token=token,
    )  # fmt: skip


def _allow(actions: str) -> str:
    return json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": actions.split(","), "Resource": "*"}]}
    )  # fmt: skip


@pytest.fixture(name="accounts", scope="module")
def _accounts():
    """moto with account A's user ``agent`` (may assume roles and use Secrets Manager in
    A) and, in account B, role ``shared-reader`` and the secret ``shared/db``."""
    port = _free_port()
    proc = _start_until(
        [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        "Running on",
        env={"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)},
    )
    url = f"http://127.0.0.1:{port}"
    iam = _client(url, "iam", "bootstrap", "bootstrap")
    iam.create_user(UserName="agent")
    iam.put_user_policy(
        UserName="agent", PolicyName="p", PolicyDocument=_allow("sts:AssumeRole,secretsmanager:*")
    )
    key = iam.create_access_key(UserName="agent")["AccessKey"]
    setup = _client(url, "sts", "bootstrap", "bootstrap").assume_role(
        RoleArn=ROLE_B, RoleSessionName="setup"
    )["Credentials"]
    in_b = (setup["AccessKeyId"], setup["SecretAccessKey"], setup["SessionToken"])
    iam_b = _client(url, "iam", *in_b)
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
             "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_A}:user/agent"}}]}  # fmt: skip
    iam_b.create_role(RoleName="shared-reader", AssumeRolePolicyDocument=json.dumps(trust))
    iam_b.put_role_policy(
        RoleName="shared-reader", PolicyName="sm", PolicyDocument=_allow("secretsmanager:*")
    )
    arn = _client(url, "secretsmanager", *in_b).create_secret(Name=SECRET, SecretString=PLANTED)[
        "ARN"
    ]
    yield {"url": url, "ak": key["AccessKeyId"], "sk": key["SecretAccessKey"], "arn": arn,
           "in_b": in_b}  # fmt: skip
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


def source(accounts: dict[str, Any], credentials: str) -> str:
    return f"""
[[sources]]
name = "aws"
provider = "aws"
region = "us-east-1"
endpoint = "{accounts["url"]}"
match = ["*"]
timeout_seconds = 5
[sources.credentials]
{credentials}
"""


def assumed(accounts: dict[str, Any], sk: str | None = None) -> str:
    return f"""type = "assume_role"
role_arn = "{ROLE_B}"
external_id = "partner-4711"
role_session_name = "kms-agent-test"
sts_endpoint = "{accounts["url"]}"
[sources.credentials.base]
type = "static"
access_key_id = "{accounts["ak"]}"
secret_access_key = "{sk or accounts["sk"]}"
"""


async def get(agent, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{agent.addresses[0]}{path}", headers={"X-KMS-Token": TOKEN}) as r,
    ):
        return r.status, await r.read()


async def test_secret_of_account_b_read_through_an_assumed_role(tmp_path, accounts):
    """With keys of account A, the agent assumes a role of account B (SigV4-signed
    AssumeRole, checked by moto) and reads B's secret by name and by its full ARN; the same
    keys without the role find no such secret in A."""
    assert accounts["arn"].startswith(
        f"arn:aws:secretsmanager:us-east-1:{ACCOUNT_B}:secret:{SECRET}-"
    )
    async with running_agent(tmp_path, source(accounts, assumed(accounts))) as agent:
        assert await get(agent, f"/secrets/{SECRET}?format=raw") == (200, PLANTED.encode())
        assert await get(agent, f"/secrets/{accounts['arn']}?format=raw") == (
            200,
            PLANTED.encode(),
        )
        creds = agent.state.router.providers["aws"].credentials.current
    assert creds.origin == "assume_role" and creds.access_key_id != accounts["ak"]
    identity = await asyncio.to_thread(
        _client(accounts["url"], "sts", creds.access_key_id, creds.access_key_secret,
                creds.security_token).get_caller_identity
    )  # fmt: skip
    assert identity["Account"] == ACCOUNT_B
    assert identity["Arn"].endswith("assumed-role/shared-reader/kms-agent-test")
    plain = f'access_key_id = "{accounts["ak"]}"\nsecret_access_key = "{accounts["sk"]}"\n'
    async with running_agent(tmp_path, source(accounts, plain)) as agent:
        status, body = await get(agent, f"/secrets/{SECRET}")
    assert (status, json.loads(body)["error"]["code"]) == (404, "SecretNotFound")


async def test_refused_assume_role_names_the_role_and_no_credential(tmp_path, accounts):
    """A base whose secret key is wrong has its AssumeRole refused by STS (signature):
    BadCredentials naming the role, STS's code and the base table; neither key appears in
    the message, and the agent answers 502 UpstreamBadCredentials."""
    wrong = "not-the-secret-key-0123456789"
    table = {"type": "assume_role", "role_arn": ROLE_B, "sts_endpoint": accounts["url"],
             "base": {"access_key_id": accounts["ak"], "secret_access_key": wrong}}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        kind, fetch = resolve(table, {}, region="us-east-1", session=lambda: session, where=WHERE)
        with pytest.raises(BadCredentials) as caught:
            await fetch()
    assert kind == "assume_role"
    said = f"{caught.value.message} {caught.value.hint}"
    assert f"STS AssumeRole of {ROLE_B} refused: SignatureDoesNotMatch" in said
    assert f"{WHERE}.base" in said
    assert accounts["ak"] not in said and wrong not in said
    async with running_agent(tmp_path, source(accounts, assumed(accounts, wrong))) as agent:
        status, body = await get(agent, f"/secrets/{SECRET}")
    assert (status, json.loads(body)["error"]["code"]) == (502, "UpstreamBadCredentials")
    assert wrong.encode() not in body and accounts["ak"].encode() not in body


async def test_assume_role_sends_the_configured_parameters(accounts):
    """AssumeRole carries RoleArn, RoleSessionName, DurationSeconds, ExternalId and the
    session Policy as configured: moto's record of the assumed role (its ``moto-api``
    state dump) shows the session, ExternalId and Policy; the expiry it grants follows the
    duration."""
    policy = _allow("secretsmanager:GetSecretValue")
    table = {"type": "assume_role", "role_arn": ROLE_B, "sts_endpoint": accounts["url"],
             "duration_seconds": 1800, "external_id": "partner-0815", "policy": policy,
             "role_session_name": "params-check",
             "base": {"access_key_id": accounts["ak"], "secret_access_key": accounts["sk"]}}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        _, fetch = resolve(table, {}, region="us-east-1", session=lambda: session, where=WHERE)
        creds = await fetch()
        async with session.get(accounts["url"] + "/moto-api/data.json") as resp:
            state = await resp.json(content_type=None)
    assert creds.expiration is not None
    assert 1700 < creds.expiration - time.time() <= 1800
    records = [r for r in state["sts"]["AssumedRole"] if r["access_key_id"] == creds.access_key_id]
    assert len(records) == 1
    record = records[0]
    assert record["arn"] == f"arn:aws:sts::{ACCOUNT_B}:assumed-role/shared-reader/params-check"
    assert (record["external_id"], record["policy"]) == ("partner-0815", policy)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"type": "assume_role"}, r"credentials.role_arn: required"),
        (
            {"type": "assume_role", "role_arn": ROLE_B, "web_identity_token_file": "/t"},
            r"credentials.web_identity_token_file: unknown setting for type = 'assume_role'",
        ),
        ({"type": "assume_role", "role_arn": ROLE_B, "duration_seconds": 50000}, "900-43200"),
        (
            {"type": "assume_role", "role_arn": ROLE_B, "external_id": "x"},
            r"credentials.external_id: must be 2-1224",
        ),
        (
            {"type": "assume_role", "role_arn": ROLE_B, "base": {"type": "static"}},
            r"credentials.base: static credentials need",
        ),
        (
            {"type": "static", "access_key_id": "a", "secret_access_key": "s", "base": {}},
            r"credentials.base: only taken with type = 'assume_role'",
        ),
    ],
)
def test_bad_assume_role_tables_fail_config_naming_the_key(table, message):
    """Wrong assume_role settings, and chain-only keys on another type, fail at config time
    with the dotted key named."""
    with pytest.raises(ConfigError, match=message):
        resolve(table, {}, region="us-east-1", session=no_session, where=WHERE)


async def test_a_per_request_role_arn_reads_only_if_allowed_and_never_crosses(tmp_path, accounts):
    """The AWS agent's roleArn parameter: a role in the source's assume_roles is assumed
    with the source's own keys (account A) and reads account B's secret; the same name read
    without the role is A's answer (not found), never the role's cached value; a role not
    in the allow-list is 403 with a hint, and nothing is assumed for it."""
    plain = f'access_key_id = "{accounts["ak"]}"\nsecret_access_key = "{accounts["sk"]}"\n'
    text = source(accounts, plain).replace(
        "timeout_seconds = 5", f'timeout_seconds = 5\nassume_roles = ["{ROLE_B}"]'
    )
    env = {"AWS_ENDPOINT_URL_STS": accounts["url"]}
    other = f"arn:aws:iam::{ACCOUNT_B}:role/admin"
    async with running_agent(tmp_path, text, env) as agent:
        as_b = f"/secretsmanager/get?secretId={SECRET}&roleArn={ROLE_B}"
        for _ in range(2):  # the second is a cache hit of the role's own entry
            status, body = await get(agent, as_b)
            assert (status, json.loads(body)["SecretString"]) == (200, PLANTED)
        status, body = await get(agent, f"/secretsmanager/get?secretId={SECRET}")
        assert status == 404, body  # moto answers ResourceNotFoundException with 404
        assert json.loads(body)["__type"] == "ResourceNotFoundException", body
        status, body = await get(agent, f"/secretsmanager/get?secretId={SECRET}&roleArn={other}")
        assert status == 403
        assert json.loads(body)["__type"] == "AccessDeniedException"
        provider = agent.state.router.providers["aws"]
        assert list(provider._as_roles) == [ROLE_B]
