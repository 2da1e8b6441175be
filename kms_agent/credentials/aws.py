"""AWS credentials, first configured wins: environment, shared credentials file, IRSA web
identity (STS AssumeRoleWithWebIdentity), container credentials (EKS Pod Identity), IMDSv2;
and ``type = "assume_role"``: STS AssumeRole signed (SigV4, service ``sts``) with a nested
``base`` table's credentials (see :mod:`kms_agent.credentials.assume`).

STS is the query protocol, version 2011-06-15, ``POST /`` form-encoded; AssumeRole takes
RoleArn, RoleSessionName, DurationSeconds (900-43200), ExternalId, Policy and answers XML
``Credentials{AccessKeyId, SecretAccessKey, SessionToken, Expiration}`` (botocore 1.44.8
``data/sts/2011-06-15/service-2.json``: operation AssumeRole, shapes AssumeRoleRequest,
roleDurationSecondsType, Credentials).
"""

from __future__ import annotations

import configparser
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from kms_agent.credentials import (
    Credentials,
    Fetch,
    Refreshing,
    StaleCredentials,
    assume,
    credential_kind,
)
from kms_agent.errors import BadCredentials, ConfigError
from kms_agent.signing import Request
from kms_agent.signing.aws import SigV4
from kms_agent.upstream import check_endpoint, mapped_errors, send

TYPES = ("auto", "static", "shared_file", "web_identity", "container", "imds", "assume_role")
#: The chained type: STS AssumeRole signed with the ``base`` table's credentials.
CHAIN_TYPE = "assume_role"
STS_VERSION = "2011-06-15"
FORM = "application/x-www-form-urlencoded"
STS = "AWS STS"
#: STS refusing the base credentials themselves (botocore's AssumeRole error shapes name
#: ExpiredTokenException; an unknown or revoked key is InvalidClientTokenId).
_STALE_BASE = ("ExpiredToken", "InvalidClientTokenId")
IMDS_ENDPOINT = "http://169.254.169.254"
#: Link-local hosts of the container credentials endpoint (ECS; EKS Pod Identity Agent),
#: the only non-loopback ones its authorization token is sent to over plain http: the
#: AWS SDKs' rule (botocore utils.py ContainerMetadataFetcher._ALLOWED_HOSTS).
CONTAINER_HOSTS = ("169.254.170.2", "169.254.170.23", "fd00:ec2::23")
_KEYS = {
    "type",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "credentials_file",
    "profile",
    "role_arn",
    "web_identity_token_file",
    "role_session_name",
    "sts_endpoint",
    "container_uri",
    "container_token_file",
    "imds_endpoint",
    *assume.KEYS,
}
_Session = Callable[[], aiohttp.ClientSession]
#: Re-read the shared credentials file this often (it has no expiry of its own).
FILE_RECHECK = 16 * 60


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def resolve(
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    region: str,
    session: Callable[[], aiohttp.ClientSession],
    where: str,
) -> tuple[str, Fetch]:
    kind = credential_kind(table, _KEYS, TYPES, where)
    if kind == CHAIN_TYPE:
        return CHAIN_TYPE, _assume_role(table, environ, region, session, where)
    assume.refuse_chain_keys(table, kind, CHAIN_TYPE, where)
    if kind == "auto":
        if "access_key_id" in table or environ.get("AWS_ACCESS_KEY_ID"):
            kind = "static"
        elif (
            "credentials_file" in table
            or environ.get("AWS_SHARED_CREDENTIALS_FILE")
            or (Path.home() / ".aws" / "credentials").exists()
        ):
            kind = "shared_file"
        elif "role_arn" in table or environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            kind = "web_identity"
        elif "container_uri" in table or environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            kind = "container"
        else:
            kind = "imds"
    builders = {
        "static": _static,
        "shared_file": _shared_file,
        "web_identity": _web_identity,
        "container": _container,
        "imds": _imds,
    }
    return kind, builders[kind](table, environ, region, session, where)


def _static(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    ak = table.get("access_key_id") or environ.get("AWS_ACCESS_KEY_ID")
    sk = table.get("secret_access_key") or environ.get("AWS_SECRET_ACCESS_KEY")
    token = table.get("session_token") or environ.get("AWS_SESSION_TOKEN") or None
    if not ak or not sk:
        raise ConfigError(
            f"{where}: static credentials need access_key_id and secret_access_key "
            "(or $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY)"
        )
    creds = Credentials(str(ak), str(sk), token, origin="static")

    async def static() -> Credentials:
        return creds

    return static


def _shared_file(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    path = Path(
        str(
            table.get("credentials_file")
            or environ.get("AWS_SHARED_CREDENTIALS_FILE")
            or "~/.aws/credentials"
        )
    ).expanduser()
    profile = str(table.get("profile") or environ.get("AWS_PROFILE") or "default")

    async def from_file() -> Credentials:
        parser = configparser.ConfigParser(interpolation=None)  # literal, as the SDKs read it
        try:
            parser.read_string(_read(path))
            section = parser[profile]
            ak, sk = section["aws_access_key_id"], section["aws_secret_access_key"]
        except (OSError, KeyError, configparser.Error) as exc:
            raise BadCredentials(
                f"{path} has no [{profile}] aws_access_key_id/aws_secret_access_key "
                f"({type(exc).__name__})"
            ) from None
        # Re-read periodically: an edited file is picked up without a restart.
        return Credentials(
            ak,
            sk,
            section.get("aws_session_token"),
            time.time() + FILE_RECHECK,
            origin="shared_file",
        )

    return from_file


def _web_identity(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    role = table.get("role_arn") or environ.get("AWS_ROLE_ARN")
    token_file = table.get("web_identity_token_file") or environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if not role or not token_file:
        raise ConfigError(
            f"{where}: web identity needs role_arn and web_identity_token_file "
            "(or $AWS_ROLE_ARN and $AWS_WEB_IDENTITY_TOKEN_FILE, set by EKS IRSA)"
        )
    endpoint = _sts_endpoint(table, environ, region, where)
    duration = assume.duration_seconds(table, where)
    name = str(
        table.get("role_session_name")
        or environ.get("AWS_ROLE_SESSION_NAME")
        or assume.SESSION_NAME
    )

    async def assume_role_with_web_identity() -> Credentials:
        try:
            token = _read(Path(str(token_file)))  # re-read: kubelet rotates it
        except OSError as exc:
            raise BadCredentials(
                f"web identity token file {token_file} cannot be read ({type(exc).__name__})"
            ) from None
        form = {
            "RoleArn": str(role),
            "RoleSessionName": name,
            "WebIdentityToken": token,
            "DurationSeconds": str(duration),
        }
        status, text = await _sts(session, endpoint, region, "AssumeRoleWithWebIdentity", form)
        found = _sts_credentials(text, "web_identity")
        if status != 200 or found is None:
            raise BadCredentials(
                f"STS AssumeRoleWithWebIdentity refused: {_xml(text, 'Code') or status}",
                hint="check the role's trust policy for this service account and the token "
                "audience",
            )
        return found

    return assume_role_with_web_identity


def _sts_endpoint(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, where: str
) -> str:
    """STS: the table's ``sts_endpoint``, else $AWS_ENDPOINT_URL_STS, else the region's;
    https, or http only to loopback (a token is sent there)."""
    return check_endpoint(
        str(
            table.get("sts_endpoint")
            or environ.get("AWS_ENDPOINT_URL_STS")
            or f"https://sts.{region}.amazonaws.com"
        ),
        f"{where}.sts_endpoint",
    )


async def _sts(
    session: _Session,
    endpoint: str,
    region: str,
    action: str,
    params: Mapping[str, str],
    signer: Credentials | None = None,
) -> tuple[int, str]:
    """One STS query-protocol call: (HTTP status, XML text); SigV4-signed with ``signer``
    (service ``sts``, the source's region) when given, else unsigned."""
    body = urlencode({"Action": action, "Version": STS_VERSION, **params}).encode()
    request = Request("POST", "/", headers={"Content-Type": FORM}, body=body)
    signing = SigV4(region, "sts")
    answer = await send(session(), endpoint, request, what=STS, signer=signing, credentials=signer)
    return answer.status, answer.body.decode("utf-8", "replace")


def _sts_credentials(text: str, origin: str) -> Credentials | None:
    found = {
        k: _xml(text, k) for k in ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")
    }
    if not all(found.values()):
        return None
    return Credentials(
        found["AccessKeyId"],
        found["SecretAccessKey"],
        found["SessionToken"],
        parse_time(found["Expiration"]),
        origin=origin,
    )


def _assume_role(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    chain = assume.settings(table, CHAIN_TYPE, where)
    endpoint = _sts_endpoint(table, environ, region, where)
    _, base = resolve(chain.base, environ, region=region, session=session, where=f"{where}.base")
    assume_role = _assumer(chain, endpoint, region, session, f"{where}.base")
    return assume.chained(base, assume_role, where)


def _assumer(
    chain: assume.Chain, endpoint: str, region: str, session: _Session, signed_by: str
) -> assume.Assume:
    """One STS AssumeRole of ``chain.role_arn``, signed with the credentials given it."""
    params = chain.params()

    async def assume_role(signer: Credentials) -> Credentials:
        status, text = await _sts(session, endpoint, region, "AssumeRole", params, signer)
        found = _sts_credentials(text, CHAIN_TYPE)
        if status == 200 and found is not None:
            return found
        code = _xml(text, "Code") or f"HTTP {status}"
        said = f"STS AssumeRole of {chain.role_arn} refused: {code}"
        if signer.security_token and code.startswith(_STALE_BASE):
            raise StaleCredentials(f"{said} (the base credentials are no longer valid)")
        raise BadCredentials(
            said,
            hint=f"check that the role's trust policy lets the base credentials ({signed_by}) "
            "assume it, the external_id it requires, and that they may call sts:AssumeRole",
        )

    return assume_role


def as_role(
    base: Refreshing,
    role_arn: str,
    *,
    environ: Mapping[str, str],
    region: str,
    session: _Session,
    where: str,
) -> Fetch:
    """Credentials of ``role_arn`` assumed with the source's own (``base``, refreshed on
    their own), for a caller's per-request ``roleArn``: the AWS agent's parameter."""
    chain = assume.settings({"role_arn": role_arn}, CHAIN_TYPE, where)
    endpoint = _sts_endpoint({}, environ, region, where)
    assume_role = _assumer(chain, endpoint, region, session, where)

    async def fetch() -> Credentials:
        creds = await base.get()
        try:
            return await assume_role(creds)
        except StaleCredentials:
            base.invalidate(creds)
            raise

    return fetch


def _container(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    uri = table.get("container_uri") or environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    token_file = table.get("container_token_file") or environ.get(
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
    )
    if not uri:
        raise ConfigError(
            f"{where}: container credentials need $AWS_CONTAINER_CREDENTIALS_FULL_URI"
        )
    parts = urlsplit(str(uri))
    if not (parts.scheme == "http" and parts.hostname in CONTAINER_HOSTS):
        check_endpoint(str(uri), f"{where}.container_uri ($AWS_CONTAINER_CREDENTIALS_FULL_URI)")

    async def from_container() -> Credentials:
        headers = {}
        if token_file:
            headers["Authorization"] = _read(Path(str(token_file)))  # re-read each time
        with mapped_errors("the container credentials endpoint"):
            async with session().get(str(uri), headers=headers) as resp:
                # the status first: an error's body need not be JSON
                body = await resp.json(content_type=None) if resp.status == 200 else None
        if resp.status != 200 or not isinstance(body, dict) or "AccessKeyId" not in body:
            raise BadCredentials(f"the container credentials endpoint refused (HTTP {resp.status})")
        return Credentials(
            body["AccessKeyId"],
            body["SecretAccessKey"],
            body.get("Token"),
            parse_time(body["Expiration"]),
            origin="container",
        )

    return from_container


def _imds(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    endpoint = str(table.get("imds_endpoint") or IMDS_ENDPOINT).rstrip("/")

    async def from_imds() -> Credentials:
        http = session()
        with mapped_errors("the EC2 instance metadata service"):
            async with http.put(
                f"{endpoint}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            ) as resp:
                if resp.status != 200:
                    raise BadCredentials(f"IMDSv2 token request failed: HTTP {resp.status}")
                token = (await resp.text()).strip()
            headers = {"X-aws-ec2-metadata-token": token}
            base = f"{endpoint}/latest/meta-data/iam/security-credentials/"
            async with http.get(base, headers=headers) as resp:
                if resp.status != 200:
                    raise BadCredentials("no IAM role is attached to this instance")
                role = (await resp.text()).strip().splitlines()[0]
            async with http.get(base + role, headers=headers) as resp:
                body = await resp.json(content_type=None)
        if not isinstance(body, dict) or body.get("Code") != "Success":
            raise BadCredentials(f"IMDS refused the credentials of role {role!r}")
        return Credentials(
            body["AccessKeyId"],
            body["SecretAccessKey"],
            body.get("Token"),
            parse_time(body["Expiration"]),
            origin="imds",
        )

    return from_imds


def _xml(text: str, tag: str) -> str:
    match = re.search(rf"<{tag}>([^<]*)</{tag}>", text)
    return match.group(1) if match else ""
