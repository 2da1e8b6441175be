"""Which Alibaba credentials the agent picks, and what it says when they are missing."""

from __future__ import annotations

import pytest

from kms_agent.credentials import Credentials
from kms_agent.credentials.alibaba import resolve
from kms_agent.errors import BadCredentials, ConfigError
from tests.conftest import no_session


def pick(table, environ):
    return resolve(
        table,
        environ,
        region="cn-hangzhou",
        network="public",
        session=no_session,
        where="sources.a.credentials",
    )


async def test_auto_prefers_env_access_key_then_rrsa_then_ecs():
    """auto: AccessKey env first, RRSA env next, the instance role last."""
    both = {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAIx",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "s",
        "ALIBABA_CLOUD_ROLE_ARN": "acs:ram::1:role/r",
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN": "p",
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE": "/t",
    }
    kind, fetch = pick({}, both)
    assert kind == "access_key"
    creds = await fetch()
    assert (creds.access_key_id, creds.origin) == ("LTAIx", "access_key")
    assert pick({}, {k: v for k, v in both.items() if "ACCESS_KEY" not in k})[0] == "rrsa"
    assert pick({}, {})[0] == "ecs_ram_role"


async def test_credentials_file_profile(tmp_path):
    """An Alibaba CLI-style INI credentials file, by profile."""
    path = tmp_path / "credentials"
    path.write_text(
        "[default]\naccess_key_id = LTAIa\naccess_key_secret = sa\n[prod]\naccess_key_id = LTAIp\naccess_key_secret = sp\n"
    )
    kind, fetch = pick({"credentials_file": str(path), "profile": "prod"}, {})
    assert kind == "access_key"
    assert (await fetch()).access_key_id == "LTAIp"
    _, broken = pick({"credentials_file": str(path), "profile": "nope"}, {})
    with pytest.raises(BadCredentials, match=r"has no \[nope\] access_key_id/access_key_secret"):
        await broken()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"type": "access_key"}, "need access_key_id and access_key_secret"),
        ({"type": "rrsa"}, "RRSA needs role_arn"),
        (
            {
                "type": "rrsa",
                "role_arn": "r",
                "oidc_provider_arn": "p",
                "oidc_token_file": "/t",
                "duration_seconds": 60,
            },
            "900-43200",
        ),
        ({"type": "vault"}, "is not one of"),
        ({"acces_key_id": "typo"}, r"credentials.acces_key_id: unknown setting"),
        (
            {
                "type": "rrsa",
                "role_arn": "r",
                "oidc_provider_arn": "p",
                "oidc_token_file": "/t",
                "sts_endpoint": "http://sts.example.com",
            },
            "plain http is allowed only to a loopback host",
        ),
    ],
)
def test_incomplete_credentials_fail_config_naming_the_key(table, message):
    """Missing or wrong credential settings fail at config time with the key named."""
    with pytest.raises(ConfigError, match=message):
        pick(table, {})


def test_credentials_repr_hides_secret_and_token():
    """repr shows the key id and origin, never the secret or token."""
    creds = Credentials("LTAIid", "the-secret-value", "the-sts-token", origin="rrsa")
    assert "the-secret-value" not in repr(creds)
    assert "the-sts-token" not in repr(creds)
    assert "LTAIid" in repr(creds)
