"""A KMS 3.0 instance through its dedicated gateway, both ways in: RAM auth (the OpenAPI)
and a ClientKey (dkms-gcs), over TLS verified against the instance CA, with the
KMS-instance emulator behind the agent and curl in front, as an application calls it."""

from __future__ import annotations

import asyncio
import json
import shutil

import aiohttp
import pytest

from kms_agent.config import load
from kms_agent.doctor import diagnose
from kms_agent.errors import ConfigError
from tests.conftest import PLANTED, TOKEN, running_agent

READ_AIGW = {
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["kms:GetSecretValue", "kms:List*"],
            "Resource": ["secret/aigw!*"],
        },
        # a paid secret is under the instance's customer key: RAM auth needs Decrypt on it
        {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "acs:kms:*:*:key/*"},
    ]
}


def dedicated(url: str, ca_file, extra: str = "") -> str:
    return f"""
[[sources]]
name = "instance"
provider = "alibaba"
gateway = "dedicated"
endpoint = "{url}"
ca_file = "{ca_file}"
timeout_seconds = 3
match = ["*"]
{extra}
"""


def client_key_source(tmp_path, issued, url: str, ca_file) -> str:
    """The dedicated source with ``issued``'s ClientKey written where an operator would
    put it: the JSON file, and its password in a file of its own (a trailing newline, as
    an editor leaves it)."""
    key_file = tmp_path / "clientKey.json"
    key_file.write_text(issued.content)
    password_file = tmp_path / "clientKey-password"
    password_file.write_text(issued.password + "\n")
    extra = (
        f'auth = "client_key"\nclient_key_file = "{key_file}"\n'
        f'client_key_password_file = "{password_file}"\n'
    )
    return dedicated(url, ca_file, extra)


async def curl(agent, path: str) -> tuple[int, bytes]:
    """The agent as an application container calls it."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-w", "\n%{http_code}", "-H", f"X-KMS-Token: {TOKEN}",
        f"http://{agent.addresses[0]}{path}", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    body, _, code = out.rpartition(b"\n")
    return int(code), body


async def test_ram_auth_reads_a_paid_default_secret_from_the_instance(
    tmp_path, kms_instance, kms_instance_url, instance_ca_file
):
    """Acceptance 1, RAM auth: a paid default secret aigw!secret-abc, under the instance's
    customer key, reads raw through the agent over TLS verified against the instance CA."""
    kms_instance.add_secret("aigw!secret-abc", PLANTED + "-paid", product="aigw")
    ak, sk = kms_instance.add_access_key(READ_AIGW)
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": ak, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": sk}
    async with running_agent(tmp_path, dedicated(kms_instance_url, instance_ca_file), env) as agent:
        assert await curl(agent, "/secrets/aigw!secret-abc?format=raw") == (
            200,
            (PLANTED + "-paid").encode(),
        )


async def test_client_key_reads_the_same_secret_by_dkms_gcs(
    tmp_path, kms_instance, kms_instance_url, instance_ca_file
):
    """Acceptance 1, ClientKey: the same read through the instance API (protobuf, signed
    with the ClientKey's RSA key), the password read from a file; a name outside the
    ClientKey's policy is a 502 access denial, a missing one a 404."""
    kms_instance.add_secret("aigw!secret-abc", PLANTED + "-paid", product="aigw")
    kms_instance.add_secret("bailian!secret-1", PLANTED + "-other", product="bailian")
    issued = kms_instance.add_client_key(READ_AIGW)
    config = client_key_source(tmp_path, issued, kms_instance_url, instance_ca_file)
    async with running_agent(tmp_path, config) as agent:
        assert await curl(agent, "/secrets/aigw!secret-abc?format=raw") == (
            200,
            (PLANTED + "-paid").encode(),
        )
        status, body = await curl(agent, "/secrets/bailian!secret-1")
        assert status == 502
        assert json.loads(body)["error"]["code"] == "UpstreamAccessDenied"
        assert (await curl(agent, "/secrets/aigw!missing"))[0] == 404
    assert issued.password not in (tmp_path / "kms.toml").read_text()


async def test_a_client_key_the_instance_does_not_know_is_refused_credentials(
    tmp_path, kms_instance, kms_instance_url, instance_ca_file
):
    """A ClientKey deleted from the instance: the gateway's 404 ``Unauthorized`` (its
    documented code for an unknown key) is the caller's 502 UpstreamBadCredentials with
    the ClientKey hint, not a missing secret."""
    kms_instance.add_secret("aigw!secret-abc", PLANTED + "-paid", product="aigw")
    issued = kms_instance.add_client_key(READ_AIGW)
    del kms_instance.client_keys[issued.key_id]
    config = client_key_source(tmp_path, issued, kms_instance_url, instance_ca_file)
    async with running_agent(tmp_path, config) as agent:
        status, body = await curl(agent, "/secrets/aigw!secret-abc")
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (502, "UpstreamBadCredentials"), error
    assert "client_key_file" in error["hint"]
    assert PLANTED not in body.decode()


async def test_a_wrong_ca_leaves_the_source_not_ready_and_says_why(
    tmp_path, kms_instance, kms_instance_url
):
    """With a CA that did not sign the instance's certificate, the source is not ready:
    /readyz answers 503 naming the certificate, and doctor fails the endpoint step with
    ca_file in its fix."""
    from tests.emulators.alibaba_kms import make_instance_tls

    wrong = make_instance_tls(kms_instance.instance_host).write_ca(tmp_path / "wrong-ca.pem")
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    ak, sk = kms_instance.add_access_key(READ_AIGW)
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": ak, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": sk}
    text = dedicated(kms_instance_url, wrong)
    async with running_agent(tmp_path, text, env) as agent:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{agent.addresses[0]}/readyz") as resp,
        ):
            assert resp.status == 503
            assert "certificate" in await resp.text()
    report = await diagnose(load(tmp_path / "kms.toml", environ=env), "aigw!secret-abc", env)
    assert report["failed_step"] == "endpoint"
    endpoint = next(s for s in report["steps"] if s["step"] == "endpoint")
    assert "ca_file" in endpoint["hint"]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ('gateway = "dedicated"\ninstance_id = "kst-hzz6aaaabbbbcccc"\n', "ca_file"),
        (
            'gateway = "dedicated"\ninstance_id = "kst-hzz6aaaabbbbcccc"\nca_file = "/nonexistent/ca.pem"\n',
            "ca_file",
        ),
        ('gateway = "dedicated"\nca_file = "CA"\n', "instance_id"),
        ('auth = "client_key"\nregion = "cn-hangzhou"\n', "auth"),
    ],
    ids=["no-ca", "missing-ca-file", "no-instance", "client-key-on-shared"],
)
def test_dedicated_gateway_settings_fail_at_start_naming_the_key(
    tmp_path, instance_ca_file, options, key
):
    """A missing CA, an unreadable one, no instance and a ClientKey on the shared gateway
    are start-up errors naming the setting (never a first-request surprise): from the
    config load when the table alone shows it, else from creating the provider."""
    from kms_agent import providers

    path = tmp_path / "kms.toml"
    path.write_text(
        f'[[sources]]\nname = "instance"\nprovider = "alibaba"\n'
        f"{options.replace('CA', str(instance_ca_file))}"
    )

    def start() -> None:
        cfg = load(path, environ={})
        providers.create(cfg.sources[0], cfg, {})

    with pytest.raises(ConfigError) as info:
        start()
    assert f"sources.instance.{key}" in info.value.message
