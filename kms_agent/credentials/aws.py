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

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from kms_agent.credentials import (
    Credentials,
    Fetch,
    Refreshing,
    assume,
    blocks,
    read_secret_file,
)
from kms_agent.credentials import parse_time as parse_time  # noqa: PLC0414 (re-exported)
from kms_agent.errors import BadCredentials, ConfigError
from kms_agent.signing import Request
from kms_agent.signing.aws import SigV4
from kms_agent.upstream import check_endpoint, send

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
#: ECS task roles: the relative URI is on this host (botocore ContainerMetadataFetcher).
ECS_HOST = CONTAINER_HOSTS[0]
ENV_FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
ENV_RELATIVE_URI = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
ENV_TOKEN_FILE = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"  # noqa: S105 (a variable's name)
ENV_TOKEN = "AWS_CONTAINER_AUTHORIZATION_TOKEN"  # noqa: S105 (a variable's name)
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
_KINDS = blocks.Kinds(_KEYS, TYPES, CHAIN_TYPE)
_Session = Callable[[], aiohttp.ClientSession]
#: Re-read the shared credentials file this often (it has no expiry of its own).
FILE_RECHECK = 16 * 60
_KEY_NAMES = blocks.KeyNames(
    ("access_key_id", "AWS_ACCESS_KEY_ID"),
    ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ("session_token", "AWS_SESSION_TOKEN"),
    "static credentials",
)
#: Literal values: botocore reads the file with RawConfigParser.
_PROFILE = blocks.ProfileLayout(
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    literal=True,
    recheck=FILE_RECHECK,
)
#: STS's ``Credentials`` element, and the JSON of IMDS and the container endpoint.
_STS_CREDENTIALS = blocks.Document("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")
_METADATA = blocks.Document(
    "AccessKeyId", "SecretAccessKey", "Token", "Expiration", token_optional=True
)
#: IMDS may say the document is bad (``Code`` other than ``Success``; AWS SDK for Go v1
#: checks it, botocore only the fields, and moto sends no Code at all).
_IMDS_DOCUMENT = blocks.Document(
    "AccessKeyId",
    "SecretAccessKey",
    "Token",
    "Expiration",
    token_optional=True,
    success=("Code", "Success"),
)
_IMDS_TOKEN = blocks.SessionToken(
    "/latest/api/token",
    "X-aws-ec2-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token",
    "IMDSv2",
)


def resolve(
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    region: str,
    session: Callable[[], aiohttp.ClientSession],
    where: str,
) -> tuple[str, Fetch]:
    kind = _KINDS.of(table, where, lambda: _discover(table, environ))
    builders = {
        CHAIN_TYPE: _assume_role,
        "static": _static,
        "shared_file": _shared_file,
        "web_identity": _web_identity,
        "container": _container,
        "imds": _imds,
    }
    return kind, builders[kind](table, environ, region, session, where)


def _discover(table: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """ "auto": the first configured, in the SDKs' order."""
    if "access_key_id" in table or environ.get("AWS_ACCESS_KEY_ID"):
        return "static"
    if (
        "credentials_file" in table
        or environ.get("AWS_SHARED_CREDENTIALS_FILE")
        or (Path.home() / ".aws" / "credentials").exists()
    ):
        return "shared_file"
    if "role_arn" in table or environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "web_identity"
    if "container_uri" in table or environ.get(ENV_FULL_URI) or environ.get(ENV_RELATIVE_URI):
        return "container"
    return "imds"


def _static(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    return blocks.static(*blocks.static_keys(table, environ, _KEY_NAMES, where), "static")


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
    return blocks.profile_file(path, profile, _PROFILE, "shared_file", where)


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

    async def assume_role_with_web_identity(token: str) -> Credentials:
        form = {
            "RoleArn": str(role),
            "RoleSessionName": name,
            "WebIdentityToken": token,
            "DurationSeconds": str(duration),
        }
        found, code = await _call(
            session, endpoint, region, "AssumeRoleWithWebIdentity", form, "web_identity"
        )
        if found is None:
            raise BadCredentials(
                f"STS AssumeRoleWithWebIdentity refused: {code}",
                hint="check the role's trust policy for this service account and the token "
                "audience",
            )
        return found

    return blocks.token_exchange(
        str(token_file), "web identity token file", assume_role_with_web_identity
    )


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


async def _call(
    session: _Session,
    endpoint: str,
    region: str,
    action: str,
    params: Mapping[str, str],
    origin: str,
    signer: Credentials | None = None,
) -> tuple[Credentials | None, str]:
    """One STS call for credentials: (them, or None and what STS said)."""
    status, text = await _sts(session, endpoint, region, action, params, signer)
    found = _sts_credentials(text, origin) if status == 200 else None
    return found, blocks.refusal(xml_text(text, "Code"), status)


def _sts_credentials(text: str, origin: str) -> Credentials | None:
    fields = ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")
    return _STS_CREDENTIALS.credentials({k: xml_text(text, k) for k in fields}, origin)


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

    async def call(signer: Credentials) -> tuple[Credentials | None, str]:
        return await _call(session, endpoint, region, "AssumeRole", params, CHAIN_TYPE, signer)

    return assume.assumer(call, chain, _STALE_BASE, signed_by)


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
    return assume.signed_with(base, _assumer(chain, endpoint, region, session, where))


def container_uri(table: Mapping[str, Any], environ: Mapping[str, str], where: str) -> str:
    """The container credentials endpoint, as botocore's ContainerProvider picks it: the
    table's ``container_uri``; else ECS's ``$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` on
    ECS_HOST (it wins over the full URI, as in botocore); else EKS Pod Identity's
    ``$AWS_CONTAINER_CREDENTIALS_FULL_URI``. Plain http only to loopback or the
    container hosts (where the authorization token may go)."""
    relative = environ.get(ENV_RELATIVE_URI)
    uri = table.get("container_uri") or (
        f"http://{ECS_HOST}{relative}" if relative else environ.get(ENV_FULL_URI)
    )
    if not uri:
        raise ConfigError(
            f"{where}: container credentials need ${ENV_FULL_URI} or ${ENV_RELATIVE_URI}"
        )
    parts = urlsplit(str(uri))
    if not (parts.scheme == "http" and parts.hostname in CONTAINER_HOSTS):
        check_endpoint(str(uri), f"{where}.container_uri (${ENV_FULL_URI})")
    return str(uri)


def _container(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    uri = container_uri(table, environ, where)
    token_file = table.get("container_token_file") or environ.get(ENV_TOKEN_FILE)
    # ECS may hand the token inline instead of in a file (botocore: the file wins).
    inline = None if token_file else environ.get(ENV_TOKEN)
    if inline is not None and ("\r" in inline or "\n" in inline):
        raise ConfigError(f"{where}: ${ENV_TOKEN} holds a line break; it is not a header value")

    async def authorization(_service: blocks.Service) -> dict[str, str]:
        if inline is not None:
            return {"Authorization": inline}
        if not token_file:
            return {}
        # re-read each time: the agent rotates it
        return {
            "Authorization": read_secret_file(str(token_file), "container authorization token file")
        }

    return blocks.metadata(
        session,
        "the container credentials endpoint",
        authorization,
        blocks.at(uri, "the container credentials endpoint refused"),
        _METADATA,
        "container",
    )


def _imds(
    table: Mapping[str, Any], environ: Mapping[str, str], region: str, session: _Session, where: str
) -> Fetch:
    endpoint = blocks.endpoint_setting(table, "imds_endpoint", IMDS_ENDPOINT, where)
    return blocks.metadata(
        session,
        "the EC2 instance metadata service",
        blocks.session_token(endpoint, _IMDS_TOKEN),
        blocks.instance_role(
            f"{endpoint}/latest/meta-data/iam/security-credentials/",
            None,
            lambda _status: BadCredentials("no IAM role is attached to this instance"),
            lambda role: f"IMDS refused the credentials of role {role!r}",
        ),
        _IMDS_DOCUMENT,
        "imds",
    )


def xml_text(text: str, tag: str) -> str:
    """The text of the first ``<tag>`` in an AWS query-protocol (XML) answer, or ""."""
    match = re.search(rf"<{tag}>([^<]*)</{tag}>", text)
    return match.group(1) if match else ""
