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

import calendar
import configparser
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from kms_agent.credentials import Credentials, Fetch, StaleCredentials, assume, credential_kind
from kms_agent.errors import BadCredentials, ConfigError
from kms_agent.signing import Request
from kms_agent.signing import alibaba as acs3
from kms_agent.upstream import check_endpoint, json_object, mapped_errors, send

TYPES = ("auto", "access_key", "rrsa", "ecs_ram_role", "ram_role_arn")
#: The chained type: STS AssumeRole signed with the ``base`` table's credentials.
CHAIN_TYPE = "ram_role_arn"
STS_VERSION = "2015-04-01"
STS = "Alibaba STS"
_SIGNER = acs3.Acs3()
#: STS refusing the base credentials themselves: temporary ones expired or revoked.
_STALE_BASE = ("InvalidSecurityToken.", "InvalidAccessKeyId.NotFound")
METADATA_ENDPOINT = "http://100.100.100.200"
METADATA_TOKEN_TTL = 21600
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


def parse_expiration(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


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
    kind = credential_kind(table, _KEYS, TYPES, where)
    if kind == CHAIN_TYPE:
        return CHAIN_TYPE, _ram_role_arn(table, environ, region, network, session, where)
    assume.refuse_chain_keys(table, kind, CHAIN_TYPE, where)
    if kind == "auto":
        if "access_key_id" in table or "credentials_file" in table or environ.get(ENV_AK):
            kind = "access_key"
        elif "role_arn" in table or environ.get(ENV_ROLE):
            kind = "rrsa"
        else:
            kind = "ecs_ram_role"
    if kind == "access_key":
        return "access_key", _static(table, environ, where)
    if kind == "rrsa":
        return "rrsa", _rrsa(table, environ, region, network, session, where)
    return "ecs_ram_role", _ecs(table, session, where)


def _static(table: Mapping[str, Any], environ: Mapping[str, str], where: str) -> Fetch:
    if "credentials_file" in table:
        path = Path(str(table["credentials_file"])).expanduser()
        profile = str(table.get("profile", "default"))

        async def from_file() -> Credentials:
            parser = configparser.ConfigParser()
            try:
                parser.read_string(path.read_text(encoding="utf-8"))
                section = parser[profile]
                return Credentials(
                    section["access_key_id"],
                    section["access_key_secret"],
                    origin="credentials_file",
                )
            except (OSError, KeyError, configparser.Error) as exc:
                raise BadCredentials(
                    f"{where}.credentials_file: {path} profile [{profile}] has no "
                    f"access_key_id/access_key_secret ({type(exc).__name__})"
                ) from None

        return from_file
    ak = table.get("access_key_id") or environ.get(ENV_AK)
    sk = table.get("access_key_secret") or environ.get(ENV_SK)
    token = table.get("security_token") or environ.get(ENV_TOKEN) or None
    if not ak or not sk:
        raise ConfigError(
            f"{where}: AccessKey credentials need access_key_id and access_key_secret "
            f"(or ${ENV_AK} and ${ENV_SK})"
        )
    creds = Credentials(str(ak), str(sk), token, origin="access_key")

    async def static() -> Credentials:
        return creds

    return static


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

    async def assume_role_with_oidc() -> Credentials:
        try:  # re-read on every exchange: kubelet rotates the projected token
            oidc_token = _read(Path(str(token_file)))
        except OSError as exc:
            raise BadCredentials(
                f"RRSA token file {token_file} cannot be read ({type(exc).__name__})",
                hint="is the projected service-account token volume mounted?",
            ) from None
        params = {
            "DurationSeconds": str(duration),
            "RoleArn": str(role),
            "OIDCProviderArn": str(provider_arn),
            "OIDCToken": oidc_token,
            "RoleSessionName": session_name,
        }
        status, body = await _sts(session, endpoint, "AssumeRoleWithOIDC", params, None)
        if status != 200 or "Credentials" not in body:
            raise BadCredentials(
                f"STS AssumeRoleWithOIDC refused: {body.get('Code', status)}",
                hint="check the role's trust policy (oidc:aud sts.aliyuncs.com, oidc:sub "
                "system:serviceaccount:<ns>:<sa>) and that the token file is fresh",
            )
        return _temporary(body, "rrsa", "AssumeRoleWithOIDC")

    return assume_role_with_oidc


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


def _temporary(body: dict[str, Any], origin: str, action: str) -> Credentials:
    try:
        c = body["Credentials"]
        return Credentials(
            c["AccessKeyId"],
            c["AccessKeySecret"],
            c["SecurityToken"],
            parse_expiration(c["Expiration"]),
            origin=origin,
        )
    except (KeyError, TypeError, ValueError):
        raise BadCredentials(f"STS {action} answered without usable Credentials") from None


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

    async def assume_role(signer: Credentials) -> Credentials:
        status, body = await _sts(session, endpoint, "AssumeRole", params, signer)
        if status == 200 and "Credentials" in body:
            return _temporary(body, CHAIN_TYPE, "AssumeRole")
        code = str(body.get("Code", f"HTTP {status}"))
        said = f"STS AssumeRole of {chain.role_arn} refused: {code}"
        if signer.security_token and code.startswith(_STALE_BASE):
            raise StaleCredentials(f"{said} (the base credentials are no longer valid)")
        raise BadCredentials(
            said,
            hint=f"check that the role's trust policy lets the base credentials ({where}.base) "
            "assume it, the external_id it requires, and that they may call sts:AssumeRole",
        )

    return assume.chained(base, assume_role, where)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def _ecs(
    table: Mapping[str, Any], session: Callable[[], aiohttp.ClientSession], where: str
) -> Fetch:
    endpoint = str(table.get("metadata_endpoint", METADATA_ENDPOINT)).rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.metadata_endpoint: {endpoint!r} is not an http(s) URL")
    role_name = table.get("role_name")

    async def from_metadata() -> Credentials:
        http = session()
        with mapped_errors("the ECS metadata service"):
            # Hardened mode: a session token first; requests without it may be refused.
            async with http.put(
                f"{endpoint}/latest/api/token",
                headers={"X-aliyun-ecs-metadata-token-ttl-seconds": str(METADATA_TOKEN_TTL)},
            ) as resp:
                if resp.status != 200:
                    raise BadCredentials(f"ECS metadata token request failed: HTTP {resp.status}")
                token = (await resp.text()).strip()
            headers = {"X-aliyun-ecs-metadata-token": token}
            base = f"{endpoint}/latest/meta-data/ram/security-credentials/"
            role = role_name
            if not role:
                async with http.get(base, headers=headers) as resp:
                    if resp.status != 200:
                        raise BadCredentials(
                            f"no RAM role is attached to this instance (HTTP {resp.status})",
                            hint="attach a RAM role to the ECS instance, or configure credentials",
                        )
                    role = (await resp.text()).strip().splitlines()[0]
            async with http.get(base + str(role), headers=headers) as resp:
                body = await resp.json(content_type=None)
        if resp.status != 200 or body.get("Code") != "Success":
            raise BadCredentials(f"ECS metadata refused the credentials of role {role!r}")
        return Credentials(
            body["AccessKeyId"],
            body["AccessKeySecret"],
            body["SecurityToken"],
            parse_expiration(body["Expiration"]),
            origin="ecs_ram_role",
        )

    return from_metadata
