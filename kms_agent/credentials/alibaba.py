"""Alibaba Cloud credentials: static AccessKey, RRSA (OIDC → STS), ECS RAM role, and
RamRoleArn (STS AssumeRole signed with any of those, see :mod:`kms_agent.credentials.assume`).

``type = "auto"`` (default) takes the first that is configured: AccessKey in the
environment, then RRSA's three environment variables, then the instance metadata service.

STS, both calls (RPC style, version 2015-04-01, JSON): AssumeRoleWithOIDC is unsigned;
AssumeRole is signed with the base credentials — ACS3-HMAC-SHA256 here, the generic OpenAPI
signature, where Alibaba's credentials SDK signs it with RPC HMAC-SHA1 (both accepted).
Parameters RoleArn, RoleSessionName, DurationSeconds, optional Policy and ExternalId; the
answer's ``Credentials{AccessKeyId, AccessKeySecret, SecurityToken, Expiration}``, expiry in
``%Y-%m-%dT%H:%M:%SZ`` UTC (alibabacloud_credentials 1.0.12, provider/ram_role_arn.py
lines 103-120 and 149-156).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from kms_agent.credentials import Credentials, Fetch, assume, blocks
from kms_agent.errors import BadCredentials, ConfigError
from kms_agent.signing import Request
from kms_agent.signing import alibaba as acs3
from kms_agent.upstream import check_endpoint, json_object, send

TYPES = ("auto", "access_key", "rrsa", "ecs_ram_role", "ram_role_arn")
#: The chained type: STS AssumeRole signed with the ``base`` table's credentials.
CHAIN_TYPE = "ram_role_arn"
STS_VERSION = "2015-04-01"
STS = "Alibaba STS"
_SIGNER = acs3.Acs3()
#: Codes (prefixes) by which an Alibaba OpenAPI product (KMS, STS) refuses temporary
#: credentials that looked valid: expired or revoked. Fetched anew and the call retried.
STALE_CODES = ("InvalidSecurityToken.", "InvalidAccessKeyId.NotFound", "SecurityTokenExpired")
METADATA_ENDPOINT = "http://100.100.100.200"
ENV_AK, ENV_SK, ENV_TOKEN = (
    "ALIBABA_CLOUD_ACCESS_KEY_ID",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    "ALIBABA_CLOUD_SECURITY_TOKEN",
)
ENV_ROLE, ENV_PROVIDER, ENV_TOKEN_FILE = (
    "ALIBABA_CLOUD_ROLE_ARN",
    "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
    "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
)
_KEYS = {
    "type",
    "access_key_id",
    "access_key_secret",
    "security_token",
    "credentials_file",
    "profile",
    "role_arn",
    "oidc_provider_arn",
    "oidc_token_file",
    "role_session_name",
    "duration_seconds",
    "sts_endpoint",
    "metadata_endpoint",
    "role_name",
    *assume.KEYS,
}
_KINDS = blocks.Kinds(_KEYS, TYPES, CHAIN_TYPE)
_KEY_NAMES = blocks.KeyNames(
    ("access_key_id", ENV_AK),
    ("access_key_secret", ENV_SK),
    ("security_token", ENV_TOKEN),
    "AccessKey credentials",
)
#: Interpolated as Alibaba's SDK reads it (ConfigParser); the keys do not expire.
_PROFILE = blocks.ProfileLayout(
    "access_key_id", "access_key_secret", None, literal=False, recheck=None
)
#: STS's answer (under ``Credentials``) and the ECS metadata document.
_FIELDS = ("AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration")
_STS_CREDENTIALS = blocks.Document(*_FIELDS, within="Credentials")
_METADATA = blocks.Document(*_FIELDS, success=("Code", "Success"))
_METADATA_TOKEN = blocks.SessionToken(
    "/latest/api/token",
    "X-aliyun-ecs-metadata-token-ttl-seconds",
    "X-aliyun-ecs-metadata-token",
    "ECS metadata",
)


def resolve(
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    region: str,
    network: str,
    session: Callable[[], aiohttp.ClientSession],
    where: str,
) -> tuple[str, Fetch]:
    """(description, fetch function) for the configured or discovered credentials."""
    kind = _KINDS.of(table, where, lambda: _discover(table, environ))
    if kind == CHAIN_TYPE:
        return kind, _ram_role_arn(table, environ, region, network, session, where)
    if kind == "access_key":
        return kind, _static(table, environ, where)
    if kind == "rrsa":
        return kind, _rrsa(table, environ, region, network, session, where)
    return kind, _ecs(table, session, where)


def _discover(table: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """ "auto": AccessKey in the table or environment, then RRSA, then the instance role."""
    if "access_key_id" in table or "credentials_file" in table or environ.get(ENV_AK):
        return "access_key"
    if "role_arn" in table or environ.get(ENV_ROLE):
        return "rrsa"
    return "ecs_ram_role"


def _static(table: Mapping[str, Any], environ: Mapping[str, str], where: str) -> Fetch:
    if "credentials_file" in table:
        path = Path(str(table["credentials_file"])).expanduser()
        profile = str(table.get("profile", "default"))
        return blocks.profile_file(
            path, profile, _PROFILE, "credentials_file", f"{where}.credentials_file"
        )
    return blocks.static(*blocks.static_keys(table, environ, _KEY_NAMES, where), "access_key")


def _rrsa(
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    region: str,
    network: str,
    session: Callable[[], aiohttp.ClientSession],
    where: str,
) -> Fetch:
    role = table.get("role_arn") or environ.get(ENV_ROLE)
    provider_arn = table.get("oidc_provider_arn") or environ.get(ENV_PROVIDER)
    token_file = table.get("oidc_token_file") or environ.get(ENV_TOKEN_FILE)
    if not role or not provider_arn or not token_file:
        raise ConfigError(
            f"{where}: RRSA needs role_arn, oidc_provider_arn and oidc_token_file "
            f"(or ${ENV_ROLE}, ${ENV_PROVIDER}, ${ENV_TOKEN_FILE}, set by ACK)"
        )
    duration = assume.duration_seconds(table, where)
    endpoint = _sts_endpoint(table, region, network, where)
    session_name = assume.session_name(table, where)

    async def assume_role_with_oidc(oidc_token: str) -> Credentials:
        params = {
            "DurationSeconds": str(duration),
            "RoleArn": str(role),
            "OIDCProviderArn": str(provider_arn),
            "OIDCToken": oidc_token,
            "RoleSessionName": session_name,
        }
        found, code = await _call(session, endpoint, "AssumeRoleWithOIDC", params, "rrsa", None)
        if found is None:
            raise BadCredentials(
                f"STS AssumeRoleWithOIDC refused: {code}",
                hint="check the role's trust policy (oidc:aud sts.aliyuncs.com, oidc:sub "
                "system:serviceaccount:<ns>:<sa>) and that the token file is fresh",
            )
        return found

    return blocks.token_exchange(
        str(token_file),
        "RRSA token file",
        assume_role_with_oidc,
        hint="is the projected service-account token volume mounted?",
    )


def _sts_endpoint(table: Mapping[str, Any], region: str, network: str, where: str) -> str:
    host = f"sts-vpc.{region}.aliyuncs.com" if network == "vpc" else f"sts.{region}.aliyuncs.com"
    return check_endpoint(
        str(table.get("sts_endpoint", f"https://{host}")), f"{where}.sts_endpoint"
    )


async def _sts(
    session: Callable[[], aiohttp.ClientSession],
    endpoint: str,
    action: str,
    params: Mapping[str, str],
    signer: Credentials | None,
) -> tuple[int, dict[str, Any]]:
    """One STS call: (HTTP status, JSON object). Unsigned (``signer`` None) calls carry
    Action, Version and Timestamp in a GET query; signed ones, ACS3 headers on a POST."""
    if signer is None:
        query = {
            "Action": action,
            "Format": "JSON",
            "Version": STS_VERSION,
            **params,
            "Timestamp": time.strftime(acs3.DATE_FORMAT, time.gmtime()),
        }
        request = Request("GET", "/", query)
    else:
        request = acs3.rpc(action, STS_VERSION, params)
    answer = await send(session(), endpoint, request, what=STS, signer=_SIGNER, credentials=signer)
    return answer.status, json_object(answer.body, STS)


async def _call(
    session: Callable[[], aiohttp.ClientSession],
    endpoint: str,
    action: str,
    params: Mapping[str, str],
    origin: str,
    signer: Credentials | None,
) -> tuple[Credentials | None, str]:
    """One STS call for credentials: (them, or None and what STS said)."""
    status, body = await _sts(session, endpoint, action, params, signer)
    found = _STS_CREDENTIALS.credentials(body, origin) if status == 200 else None
    return found, blocks.refusal(str(body.get("Code") or ""), status)


def _ram_role_arn(
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    region: str,
    network: str,
    session: Callable[[], aiohttp.ClientSession],
    where: str,
) -> Fetch:
    chain = assume.settings(table, CHAIN_TYPE, where)
    endpoint = _sts_endpoint(table, region, network, where)
    _, base = resolve(
        chain.base, environ, region=region, network=network, session=session, where=f"{where}.base"
    )
    params = chain.params()

    async def call(signer: Credentials) -> tuple[Credentials | None, str]:
        return await _call(session, endpoint, "AssumeRole", params, CHAIN_TYPE, signer)

    assume_role = assume.assumer(call, chain, STALE_CODES, f"{where}.base")
    return assume.chained(base, assume_role, where)


def _ecs(
    table: Mapping[str, Any], session: Callable[[], aiohttp.ClientSession], where: str
) -> Fetch:
    endpoint = blocks.endpoint_setting(table, "metadata_endpoint", METADATA_ENDPOINT, where)
    # Hardened mode: a session token first; requests without it may be refused.
    return blocks.metadata(
        session,
        "the ECS metadata service",
        blocks.session_token(endpoint, _METADATA_TOKEN),
        blocks.instance_role(
            f"{endpoint}/latest/meta-data/ram/security-credentials/",
            str(table["role_name"]) if table.get("role_name") else None,
            lambda status: BadCredentials(
                f"no RAM role is attached to this instance (HTTP {status})",
                hint="attach a RAM role to the ECS instance, or configure credentials",
            ),
            lambda role: f"ECS metadata refused the credentials of role {role!r}",
        ),
        _METADATA,
        "ecs_ram_role",
    )
