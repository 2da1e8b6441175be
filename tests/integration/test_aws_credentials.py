"""The AWS credential paths against loopback fakes that speak the real protocols: the
shared credentials file, EKS Pod Identity (the container credentials endpoint with its
authorization token file) and IMDSv2; then through the agent, with a moto server that
checks SigV4 signatures and session tokens judging the credentials each path hands over.

The request and response shapes are botocore's (botocore 1.44,
``/work/main/.venv/lib/python3.11/site-packages/botocore``), cited per test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web

from kms_agent.credentials import FAILED_RETRY_BASE, Fetch, Refreshing
from kms_agent.credentials import aws as aws_credentials
from kms_agent.credentials.aws import FILE_RECHECK, resolve
from kms_agent.errors import BadCredentials, ConfigError, Unavailable, UpstreamTimeout
from kms_agent.upstream import new_session
from tests.conftest import (
    PLANTED,
    TOKEN,
    FakeClock,
    _bin,
    _free_port,
    _start_until,
    no_session,
    running_agent,
)

WHERE = "sources.aws.credentials"
HOUR = 3600.0


def iso(epoch: float) -> str:
    """An expiry the way AWS writes it: UTC, whole seconds, ``Z``."""
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def issue(n: int, expires: float) -> dict[str, str]:
    """The n-th temporary credentials a fake hands out (the secret carries PLANTED)."""
    return {
        "AccessKeyId": f"ASIAFAKE{n:08d}",
        "SecretAccessKey": f"{PLANTED}-secret-{n}",
        "Token": f"session-token-{n}-{PLANTED}",
        "Expiration": iso(expires),
    }


@pytest.fixture(name="session")
async def _session():
    """A session made the way a source makes its own (short timeouts for the tests)."""
    http = new_session(connect_timeout=1.0, total_timeout=1.0)
    yield http
    await http.close()


def build(
    table: Mapping[str, object],
    environ: Mapping[str, str],
    session: aiohttp.ClientSession | None,
) -> tuple[str, Fetch]:
    """resolve() in us-east-1; ``session`` None: only the path is chosen, no session opened."""
    return resolve(
        table,
        environ,
        region="us-east-1",
        session=no_session if session is None else lambda: session,
        where=WHERE,
    )


# --------------------------------------------------------------------------- shared file


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


async def test_the_shared_file_is_read_by_profile(tmp_path, session):
    """``[default]`` unless a profile is named (in the table, or $AWS_PROFILE as the SDKs
    read it), with its session token: botocore/credentials.py SharedCredentialProvider
    (aws_access_key_id, aws_secret_access_key, aws_session_token)."""
    path = write(
        tmp_path / "credentials",
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = sk-default\n\n"
        "[prod]\naws_access_key_id = ASIAPROD\naws_secret_access_key = sk-prod\n"
        "aws_session_token = tok-prod\nregion = eu-west-1\n",
    )
    _, default = build({"credentials_file": str(path)}, {}, session)
    creds = await default()
    assert (creds.access_key_id, creds.access_key_secret, creds.security_token) == (
        "AKIADEFAULT",
        "sk-default",
        None,
    )
    assert creds.origin == "shared_file"
    for table, env in (
        ({"credentials_file": str(path), "profile": "prod"}, {}),
        ({}, {"AWS_SHARED_CREDENTIALS_FILE": str(path), "AWS_PROFILE": "prod"}),
    ):
        kind, prod = build(table, env, session)
        creds = await prod()
        assert kind == "shared_file"
        assert (creds.access_key_id, creds.security_token) == ("ASIAPROD", "tok-prod")


async def test_static_keys_in_the_environment_win_over_the_shared_file(tmp_path, session):
    """First configured wins: $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY/$AWS_SESSION_TOKEN
    before $AWS_SHARED_CREDENTIALS_FILE (botocore/credentials.py EnvProvider first)."""
    path = write(tmp_path / "credentials", "[default]\naws_access_key_id = A\n")
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAENV",
        "AWS_SECRET_ACCESS_KEY": "sk-env",
        "AWS_SESSION_TOKEN": "tok-env",
        "AWS_SHARED_CREDENTIALS_FILE": str(path),
    }
    kind, fetch = build({}, env, session)
    creds = await fetch()
    assert kind == "static"
    assert (creds.access_key_id, creds.security_token, creds.expiration) == (
        "AKIAENV",
        "tok-env",
        None,
    )


async def test_an_edited_shared_file_is_picked_up_without_a_restart(tmp_path, session):
    """The file has no expiry of its own: its keys are re-read every FILE_RECHECK seconds
    (in the background, the old keys served meanwhile), so rotated keys take effect."""
    path = write(
        tmp_path / "credentials",
        "[default]\naws_access_key_id = AKIAOLD\naws_secret_access_key = o\n",
    )
    _, fetch = build({"credentials_file": str(path)}, {}, session)
    clock = FakeClock(start=time.time())
    creds = Refreshing(fetch, "aws", clock=clock)
    assert (await creds.get()).access_key_id == "AKIAOLD"
    write(path, "[default]\naws_access_key_id = AKIANEW\naws_secret_access_key = n\n")
    clock.advance(FILE_RECHECK / 2)
    assert (await creds.get()).access_key_id == "AKIAOLD"  # not due yet
    clock.advance(FILE_RECHECK / 4)
    assert (await creds.get()).access_key_id == "AKIAOLD"  # due: re-read behind this call
    assert creds._background is not None
    await creds._background
    assert (await creds.get()).access_key_id == "AKIANEW"
    await creds.close()


@pytest.mark.parametrize(
    ("text", "profile"),
    [
        ("[default]\naws_access_key_id = A\naws_secret_access_key = s\n", "prod"),
        ("[prod]\naws_access_key_id = A\n", "prod"),
        ("[prod]\ncredential_process = /usr/local/bin/creds --secret s3cr3t\n", "prod"),
        ("not an ini file\n", "default"),
    ],
    ids=["no-profile", "no-secret", "credential-process", "garbage"],
)
async def test_an_unusable_profile_is_bad_credentials_naming_file_and_profile(
    tmp_path, session, text, profile
):
    """A missing profile, a profile without both keys, a profile that only names a
    credential_process (which the agent does not run: it would execute a command from a
    file) and a file that is not INI are each BadCredentials naming the file and the
    profile, quoting nothing from the file."""
    path = write(tmp_path / "credentials", text)
    _, fetch = build({"credentials_file": str(path), "profile": profile}, {}, session)
    with pytest.raises(BadCredentials) as caught:
        await fetch()
    assert (
        f"{path} has no [{profile}] aws_access_key_id/aws_secret_access_key" in caught.value.message
    )
    assert "s3cr3t" not in caught.value.message


async def test_a_missing_shared_file_is_bad_credentials(tmp_path, session):
    """A credentials file that does not exist is BadCredentials naming it."""
    _, fetch = build({"credentials_file": str(tmp_path / "nope")}, {}, session)
    with pytest.raises(BadCredentials, match=r"credentials file \S*/nope cannot be read"):
        await fetch()


async def test_values_are_read_verbatim_as_the_sdks_read_them(tmp_path, session):
    """Values are taken literally, '%' included: botocore reads the file with
    configparser.RawConfigParser (botocore/configloader.py raw_config_parse), so a key
    the SDKs accept is accepted here too, not refused as an interpolation error."""
    path = write(
        tmp_path / "credentials",
        "[default]\naws_access_key_id = AKIAPCT\naws_secret_access_key = ab%cd%%ef%(x)s\n",
    )
    _, fetch = build({"credentials_file": str(path)}, {}, session)
    assert (await fetch()).access_key_secret == "ab%cd%%ef%(x)s"


# --------------------------------------------------------------------------- EKS Pod Identity


class PodIdentityAgent:
    """The EKS Pod Identity Agent's credentials endpoint, ``GET /v1/credentials``.

    Request as botocore sends it (botocore/credentials.py ContainerProvider._build_headers:
    the token file's content as the raw ``Authorization`` value; botocore/utils.py
    ContainerMetadataFetcher._retrieve_credentials: a GET; botocore also sends ``Accept:
    application/json``, which the agent does not and the fake does not require).
    Answer as ContainerProvider._create_fetcher reads it: ``AccessKeyId``,
    ``SecretAccessKey``, ``Token``, ``Expiration`` (ISO 8601 UTC) and ``AccountId``. It
    accepts only the tokens issued to this pod (:meth:`project`, kubelet's part); ``refuse``
    makes it answer an error status with a plain-text body, like any HTTP server would.
    """

    def __init__(self, token_file: Path, expires: Callable[[], float]) -> None:
        self.token_file = token_file
        self.accepted: set[str] = set()
        self.expires = expires
        self.seen: list[tuple[str, str | None]] = []
        self.issued: list[dict[str, str]] = []
        self.refuse: tuple[int, str] | None = None
        self.answer: Callable[[int], dict[str, str]] | None = None
        self.env: dict[str, str] = {}  # the variables EKS injects, once it is serving

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v1/credentials", self.credentials)
        return app

    async def credentials(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.headers.get("Authorization")))
        if request.method != "GET":
            return web.Response(status=405, text="method not allowed")
        if self.refuse is not None:
            status, text = self.refuse
            return web.Response(status=status, text=text)
        if request.headers.get("Authorization") not in self.accepted:
            return web.Response(status=401, text="invalid service account token")
        n = len(self.issued) + 1
        body = self.answer(n) if self.answer else issue(n, self.expires())
        self.issued.append(body)
        return web.json_response({**body, "AccountId": "123456789012"})

    def project(self) -> str:
        """Write a new projected service-account token for this pod into its token file,
        as kubelet does (no trailing newline), and accept it from now on."""
        token = f"eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOlsicG9kcy5la3MuYW1hem9uYXdzLmNvbSJdfQ.{secrets.token_hex(16)}"
        self.token_file.write_text(token, encoding="utf-8")
        self.accepted.add(token)
        return token


@pytest.fixture(name="pod_identity")
async def _pod_identity(aiohttp_server, tmp_path):
    """A Pod Identity Agent on loopback and the environment EKS injects into a pod."""
    token_file = tmp_path / "eks-pod-identity-token"
    agent = PodIdentityAgent(token_file, expires=lambda: time.time() + 6 * HOUR)
    agent.project()
    server = await aiohttp_server(agent.app(), host="127.0.0.1")
    agent.env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": str(server.make_url("/v1/credentials")),
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    return agent


async def test_pod_identity_sends_the_token_file_and_reads_the_answer(pod_identity, session):
    """With the two variables EKS injects, the container path is chosen, GETs the full URI
    with the token file's content as Authorization (botocore ContainerProvider), and takes
    AccessKeyId, SecretAccessKey, Token and Expiration from the JSON answer."""
    kind, fetch = build({}, pod_identity.env, session)
    assert kind == "container"
    creds = await fetch()
    token = pod_identity.token_file.read_text()
    assert pod_identity.seen == [("GET", token)]
    issued = pod_identity.issued[0]
    assert (creds.access_key_id, creds.access_key_secret, creds.security_token) == (
        issued["AccessKeyId"],
        issued["SecretAccessKey"],
        issued["Token"],
    )
    assert creds.expiration == aws_credentials.parse_time(issued["Expiration"])
    assert creds.origin == "container"


async def test_the_token_file_is_read_again_on_each_fetch(pod_identity, session):
    """kubelet rotates the projected token: each fetch sends the file's current content,
    and the rotated token is accepted where the old one would not be."""
    _, fetch = build({}, pod_identity.env, session)
    await fetch()
    rotated = pod_identity.project()
    pod_identity.accepted = {rotated}
    await fetch()
    assert [auth for _, auth in pod_identity.seen][-1] == rotated
    assert len(pod_identity.issued) == 2


async def test_pod_identity_credentials_are_refreshed_before_they_expire(pod_identity, session):
    """The endpoint's credentials (6 h here) are kept: refreshed behind the callers once
    in their last 15 minutes, and replaced by the new set."""
    clock = FakeClock(start=time.time())
    pod_identity.expires = lambda: clock.now + 6 * HOUR
    _, fetch = build({}, pod_identity.env, session)
    creds = Refreshing(fetch, "aws", clock=clock)
    first = await creds.get()
    clock.advance(6 * HOUR - 14 * 60)
    assert await creds.get() is first
    assert creds._background is not None
    await creds._background
    second = await creds.get()
    assert second.access_key_id == pod_identity.issued[1]["AccessKeyId"] != first.access_key_id
    assert second.expiration == aws_credentials.parse_time(pod_identity.issued[1]["Expiration"])
    await creds.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, "invalid service account token"),
        (403, '{"Message": "the role cannot be assumed"}'),
        (404, "404 page not found"),
        (500, "<html>internal error</html>"),
    ],
)
async def test_a_refusing_endpoint_is_bad_credentials_with_its_status(
    pod_identity, session, status, body
):
    """An error answer (botocore: "Received non 200 response") is BadCredentials naming
    the HTTP status, whatever the body (JSON or not), and quoting none of it."""
    pod_identity.refuse = (status, body)
    _, fetch = build({}, pod_identity.env, session)
    with pytest.raises(BadCredentials) as caught:
        await fetch()
    assert caught.value.message == f"the container credentials endpoint refused (HTTP {status})"


async def test_a_stale_token_is_refused_by_the_endpoint(pod_identity, session):
    """A token file holding a token the endpoint no longer accepts (here: another pod's)
    gets its 401 as BadCredentials, and a Refreshing source backs off instead of asking
    again on every call."""
    _, fetch = build({}, pod_identity.env, session)
    pod_identity.token_file.write_text("eyJhbGciOiJSUzI1NiJ9.e30.not-this-pods-token")
    clock = FakeClock(start=time.time())
    creds = Refreshing(fetch, "aws", clock=clock)
    for _ in range(5):
        with pytest.raises(BadCredentials, match=r"HTTP 401"):
            await creds.get()
    assert len(pod_identity.seen) == 1
    pod_identity.project()
    clock.advance(FAILED_RETRY_BASE)
    assert (await creds.get()).access_key_id == pod_identity.issued[0]["AccessKeyId"]


async def test_a_missing_token_file_is_bad_credentials(pod_identity, session):
    """A token file that is not there (the projected volume missing) is BadCredentials
    through the source's Refreshing, naming the file and the exception type."""
    pod_identity.token_file.unlink()
    _, fetch = build({}, pod_identity.env, session)
    creds = Refreshing(fetch, "aws")
    with pytest.raises(
        BadCredentials,
        match=r"container authorization token file \S*-token cannot be read \(FileNotFoundError\)",
    ):
        await creds.get()
    assert pod_identity.seen == []


async def test_an_unreachable_endpoint_is_unavailable(session):
    """No agent listening (the Pod Identity Agent add-on not installed) is Unavailable,
    naming the endpoint, with a network hint."""
    uri = f"http://127.0.0.1:{_free_port()}/v1/credentials"
    _, fetch = build({"type": "container", "container_uri": uri}, {}, session)
    with pytest.raises(Unavailable, match="cannot connect to the container credentials endpoint"):
        await fetch()


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("http://169.254.170.23/v1/credentials", True),  # EKS Pod Identity Agent
        ("http://169.254.170.2/v2/credentials/uuid", True),  # ECS
        ("http://[fd00:ec2::23]/v1/credentials", True),  # EKS Pod Identity Agent, IPv6
        ("http://localhost:8080/creds", True),
        ("http://127.0.0.1:8080/creds", True),
        ("https://creds.example.com/v1/credentials", True),
        ("http://creds.example.com/v1/credentials", False),
        ("http://10.0.0.7/v1/credentials", False),
    ],
)
def test_the_token_is_sent_only_to_the_hosts_the_sdks_allow(uri, allowed):
    """The authorization token goes over plain http only to a loopback address or one of
    the container endpoints' link-local hosts; anything else must be https
    (botocore/utils.py ContainerMetadataFetcher._validate_allowed_url and _ALLOWED_HOSTS).
    Another URI is a configuration error naming the variable, before any request."""
    env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": uri,
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/t",
    }
    if allowed:
        assert build({}, env, None)[0] == "container"
    else:
        with pytest.raises(ConfigError, match=r"AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            build({}, env, None)


# --------------------------------------------------------------------------- web identity (IRSA)


class Sts:
    """STS's AssumeRoleWithWebIdentity as the query API answers it: an unsigned form
    POST (Action, Version, RoleArn, RoleSessionName, WebIdentityToken, DurationSeconds)
    answered with the XML ``AssumeRoleWithWebIdentityResult``, or an ``ErrorResponse``
    with its ``Code``."""

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        self.error: tuple[int, str] | None = None
        self.env: dict[str, str] = {}  # the variables EKS IRSA injects, once it is serving

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.forms.append({k: str(v) for k, v in form.items()})
        if self.error is not None:
            status, code = self.error
            body = (
                '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                f"<Type>Sender</Type><Code>{code}</Code><Message>{PLANTED}</Message></Error>"
                "<RequestId>c6104cbe</RequestId></ErrorResponse>"
            )
            return web.Response(status=status, text=body, content_type="text/xml")
        creds = issue(len(self.forms), time.time() + HOUR)
        body = (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult>"
            "<SubjectFromWebIdentityToken>system:serviceaccount:app:api</SubjectFromWebIdentityToken>"
            "<Audience>sts.amazonaws.com</Audience><Credentials>"
            f"<AccessKeyId>{creds['AccessKeyId']}</AccessKeyId>"
            f"<SecretAccessKey>{creds['SecretAccessKey']}</SecretAccessKey>"
            f"<SessionToken>{creds['Token']}</SessionToken>"
            f"<Expiration>{creds['Expiration']}</Expiration>"
            "</Credentials></AssumeRoleWithWebIdentityResult>"
            "<ResponseMetadata><RequestId>c6104cbe</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>"
        )
        return web.Response(text=body, content_type="text/xml")


@pytest.fixture(name="sts")
async def _sts(aiohttp_server, tmp_path):
    sts = Sts()
    server = await aiohttp_server(sts.app(), host="127.0.0.1")
    token = tmp_path / "token"
    token.write_text(
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YXBwOmFwaSJ9.c2ln"
    )
    sts.env = {
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/api",
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
        "AWS_ENDPOINT_URL_STS": str(server.make_url("")).rstrip("/"),
    }
    return sts


async def test_web_identity_exchanges_the_token_file_with_sts(sts, session):
    """IRSA's variables select web identity; the token file's content is sent with the
    role and a session name, and the XML result's credentials are taken."""
    kind, fetch = build({}, sts.env, session)
    creds = await fetch()
    token = Path(sts.env["AWS_WEB_IDENTITY_TOKEN_FILE"]).read_text()
    assert kind == "web_identity"
    assert sts.forms == [
        {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": "arn:aws:iam::123456789012:role/api",
            "RoleSessionName": "kms-agent",
            "WebIdentityToken": token,
            "DurationSeconds": "3600",
        }
    ]
    assert (creds.access_key_id, creds.security_token, creds.origin) == (
        "ASIAFAKE00000001",
        f"session-token-1-{PLANTED}",
        "web_identity",
    )


async def test_an_sts_refusal_names_its_code_not_its_message(sts, session):
    """A refused exchange is BadCredentials naming STS's error code, with a hint about
    the role's trust policy, never STS's message text."""
    sts.error = (400, "InvalidIdentityToken")
    _, fetch = build({}, sts.env, session)
    with pytest.raises(BadCredentials) as caught:
        await fetch()
    assert "AssumeRoleWithWebIdentity refused: InvalidIdentityToken" in caught.value.message
    assert "trust policy" in (caught.value.hint or "")
    assert PLANTED not in caught.value.message


async def test_an_unreadable_web_identity_token_is_bad_credentials(sts, session):
    """A token file that cannot be read is BadCredentials naming the file; STS is not
    asked."""
    Path(sts.env["AWS_WEB_IDENTITY_TOKEN_FILE"]).unlink()
    _, fetch = build({}, sts.env, session)
    with pytest.raises(BadCredentials, match=r"web identity token file .* cannot be read"):
        await fetch()
    assert sts.forms == []


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("https://sts.us-east-1.amazonaws.com", True),
        ("http://127.0.0.1:4566", True),
        ("http://sts.example.com", False),
        ("sts.us-east-1.amazonaws.com", False),
    ],
)
def test_the_web_identity_token_is_sent_over_https_or_to_loopback(endpoint, allowed):
    """The service-account token goes to STS over https, or plain http only to a
    loopback emulator: the rule every other endpoint of the agent keeps (Alibaba's RRSA
    sts_endpoint included). Another endpoint is a config error naming the key."""
    table = {"role_arn": "arn:aws:iam::1:role/r", "web_identity_token_file": "/t"}
    for settings, env in (
        ({**table, "sts_endpoint": endpoint}, {}),
        (table, {"AWS_ENDPOINT_URL_STS": endpoint}),
    ):
        if allowed:
            assert build(settings, env, None)[0] == "web_identity"
        else:
            with pytest.raises(ConfigError, match=r"credentials\.sts_endpoint: "):
                build(settings, env, None)


def test_auto_takes_the_first_configured_path(tmp_path, monkeypatch):
    """With no type, the first path configured is taken, in the module's documented
    order: environment keys, a shared file, IRSA, the container endpoint, else IMDS.
    (botocore's chain, credentials.py create_credential_resolver with
    ProfileProviderBuilder.providers, puts IRSA's variables before the shared file.)"""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials
    chain = [
        ("static", {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "s"}),
        ("shared_file", {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}),
        (
            "web_identity",
            {"AWS_ROLE_ARN": "arn:aws:iam::1:role/r", "AWS_WEB_IDENTITY_TOKEN_FILE": "/t"},
        ),
        (
            "container",
            {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"},
        ),
    ]
    for i, (kind, _) in enumerate(chain):
        env = {k: v for _, part in chain[i:] for k, v in part.items()}
        assert build({}, env, None)[0] == kind
    assert build({}, {}, None)[0] == "imds"
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\n")
    assert build({}, chain[2][1], None)[0] == "shared_file"  # ~/.aws/credentials exists


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"type": "web_identity"}, "web identity needs role_arn and web_identity_token_file"),
        ({"type": "container"}, "container credentials need"),
        ({"type": "static"}, "static credentials need access_key_id"),
        ({"type": "sso"}, r"credentials\.type: 'sso' is not one of"),
        ({"profle": "x"}, r"credentials\.profle: unknown setting"),
    ],
)
def test_incomplete_credential_settings_are_config_errors(table, message):
    """What a path needs and is not given fails at start-up, naming the keys."""
    with pytest.raises(ConfigError, match=message):
        build(table, {}, None)


# --------------------------------------------------------------------------- IMDSv2


class InstanceMetadata:
    """The EC2 instance metadata service with IMDSv2 required (``HttpTokens=required``).

    As botocore calls it (botocore/utils.py IMDSFetcher._fetch_metadata_token: ``PUT
    /latest/api/token`` with ``x-aws-ec2-metadata-token-ttl-seconds: 21600``;
    InstanceMetadataFetcher._get_iam_role and _get_credentials: ``GET
    /latest/meta-data/iam/security-credentials/`` then ``…/<role>`` with
    ``x-aws-ec2-metadata-token``), and as it answers: the token as text, the role name as
    text, the credentials as JSON with ``Code: Success``, ``Type: AWS-HMAC``,
    ``LastUpdated``, ``AccessKeyId``, ``SecretAccessKey``, ``Token``, ``Expiration``. A
    token is good for its TTL on the service's clock; a GET without a good one is 401; a
    PUT without a valid TTL is 400; with X-Forwarded-For, 403. ``hang_puts`` models the hop
    limit: the PUT's answer never arrives (a container one hop too far).
    """

    BASE = "/latest/meta-data/iam/security-credentials/"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.role: str | None = "app-instance-role"
        self.tokens: dict[str, float] = {}
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.issued: list[dict[str, str]] = []
        self.put_status: int | None = None
        self.hang_puts = False
        self.answer_code = "Success"
        self.answer: Callable[[int], dict[str, str]] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/latest/api/token", self.token)
        app.router.add_get(self.BASE, self.roles)
        app.router.add_get(self.BASE + "{role}", self.credentials)
        return app

    def _record(self, request: web.Request) -> None:
        keep = ("x-aws-ec2-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token")
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() in keep}
        self.calls.append((request.method, request.path, headers))

    async def token(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.hang_puts:
            await asyncio.Event().wait()
        if self.put_status is not None:
            return web.Response(status=self.put_status, text="")
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403, text="Forbidden")
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400, text="Bad Request")
        token = secrets.token_urlsafe(40)
        self.tokens[token] = self.clock() + int(ttl)
        return web.Response(text=token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    def _authorized(self, request: web.Request) -> bool:
        expires = self.tokens.get(request.headers.get("X-aws-ec2-metadata-token", ""))
        return expires is not None and self.clock() < expires

    async def roles(self, request: web.Request) -> web.Response:
        self._record(request)
        if not self._authorized(request):
            return web.Response(status=401, text="Unauthorized")
        if self.role is None:
            return web.Response(status=404, text="<html>404 - Not Found</html>")
        return web.Response(text=self.role)

    async def credentials(self, request: web.Request) -> web.Response:
        self._record(request)
        if not self._authorized(request):
            return web.Response(status=401, text="Unauthorized")
        if request.match_info["role"] != self.role:
            return web.Response(status=404, text="<html>404 - Not Found</html>")
        if self.answer_code != "Success":
            return web.json_response(
                {"Code": self.answer_code, "Message": "Instance profile has no role"}
            )
        n = len(self.issued) + 1
        body = self.answer(n) if self.answer else issue(n, self.clock() + 6 * HOUR)
        self.issued.append(body)
        document = {"Code": "Success", "LastUpdated": iso(self.clock()), "Type": "AWS-HMAC"}
        return web.json_response({**document, **body})


@pytest.fixture(name="imds")
def _imds() -> InstanceMetadata:
    return InstanceMetadata()


@pytest.fixture(name="imds_table")
async def _imds_table(aiohttp_server, imds) -> dict[str, str]:
    server = await aiohttp_server(imds.app(), host="127.0.0.1")
    return {"type": "imds", "imds_endpoint": str(server.make_url("")).rstrip("/")}


async def test_imdsv2_token_then_role_then_credentials(imds, imds_table, session):
    """The IMDSv2 sequence exactly: PUT the token with a 21600 s TTL, GET the role name
    with it, GET that role's credentials with it; the JSON's keys become the
    credentials, its Expiration their expiry."""
    kind, fetch = build(imds_table, {}, session)
    creds = await fetch()
    token = next(iter(imds.tokens))
    base = InstanceMetadata.BASE
    assert imds.calls == [
        ("PUT", "/latest/api/token", {"x-aws-ec2-metadata-token-ttl-seconds": "21600"}),
        ("GET", base, {"x-aws-ec2-metadata-token": token}),
        ("GET", base + "app-instance-role", {"x-aws-ec2-metadata-token": token}),
    ]
    issued = imds.issued[0]
    assert (kind, creds.access_key_id, creds.access_key_secret, creds.security_token) == (
        "imds",
        issued["AccessKeyId"],
        issued["SecretAccessKey"],
        issued["Token"],
    )
    assert creds.expiration == aws_credentials.parse_time(issued["Expiration"])
    assert creds.origin == "imds"


async def test_imds_credentials_are_refreshed_with_a_new_token(aiohttp_server, session):
    """Before the role's credentials expire they are fetched again, with a new session
    token from a new PUT: a token that has itself expired (here, after its 6 h TTL on the
    service's clock) is never reused."""
    clock = FakeClock(start=time.time())
    imds = InstanceMetadata(clock)
    server = await aiohttp_server(imds.app(), host="127.0.0.1")
    table = {"type": "imds", "imds_endpoint": str(server.make_url("")).rstrip("/")}
    _, fetch = build(table, {}, session)
    creds = Refreshing(fetch, "aws", clock=clock)
    first = await creds.get()
    clock.advance(6 * HOUR - 30)  # in the last minute: the caller waits for new ones
    second = await creds.get()
    assert second.access_key_id == imds.issued[1]["AccessKeyId"] != first.access_key_id
    assert [m for m, _, _ in imds.calls].count("PUT") == 2
    assert len(imds.tokens) == 2
    await creds.close()


@pytest.mark.parametrize("status", [403, 404, 405])
async def test_a_refused_token_request_is_bad_credentials(imds, imds_table, session, status):
    """IMDS refusing the token PUT (403: IMDS turned off or a proxy header; 404/405: no
    IMDSv2 there; botocore falls back to IMDSv1 on these, the agent uses IMDSv2 only) is
    BadCredentials naming the status, and no GET follows."""
    imds.put_status = status
    _, fetch = build(imds_table, {}, session)
    with pytest.raises(BadCredentials, match=rf"IMDSv2 token request failed: HTTP {status}"):
        await fetch()
    assert [m for m, _, _ in imds.calls] == ["PUT"]


async def test_an_instance_without_a_role_is_bad_credentials(imds, imds_table, session):
    """No instance profile: the role list is 404, reported as no IAM role attached."""
    imds.role = None
    _, fetch = build(imds_table, {}, session)
    with pytest.raises(BadCredentials, match="no IAM role is attached to this instance"):
        await fetch()


async def test_an_error_document_is_bad_credentials(imds, imds_table, session):
    """A 200 whose JSON says other than ``Code: Success`` (botocore: "IMDS can return a
    200 response that has a JSON formatted error message") is BadCredentials naming the
    role, not credentials."""
    imds.answer_code = "AssumeRoleUnauthorizedAccess"
    _, fetch = build(imds_table, {}, session)
    with pytest.raises(
        BadCredentials, match="IMDS refused the credentials of role 'app-instance-role'"
    ):
        await fetch()


async def test_the_hop_limit_is_a_timeout_not_a_hang(imds, imds_table, session):
    """In a container behind one hop too many, the token PUT's answer never arrives:
    the fetch ends as UpstreamTimeout within the session's timeout (1 s here)."""
    imds.hang_puts = True
    _, fetch = build(imds_table, {}, session)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="metadata service did not answer in time"):
        await fetch()
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- through the agent


@pytest.fixture(name="moto_sts", scope="module")
def _moto_sts():
    """A moto server that checks signatures, session tokens and IAM policies after its
    first calls, which create a role allowed to read secrets, a secret, and four sets of
    that role's temporary credentials (STS AssumeRole) for the fakes to hand out."""
    port = _free_port()
    setup = 3 + 4  # create_role, put_role_policy, create_secret, 4 x assume_role
    proc = _start_until(
        [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        "Running on",
        env={"INITIAL_NO_AUTH_ACTION_COUNT": str(setup)},
    )
    url = f"http://127.0.0.1:{port}"
    keys = {"region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    iam = boto3.client("iam", endpoint_url=url, **keys)
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "pods.eks.amazonaws.com"},
                "Action": ["sts:AssumeRole", "sts:TagSession"],
            }
        ],
    }
    arn = iam.create_role(RoleName="pod", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    read = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}],
    }
    iam.put_role_policy(RoleName="pod", PolicyName="read", PolicyDocument=json.dumps(read))
    sm = boto3.client("secretsmanager", endpoint_url=url, **keys)
    sm.create_secret(Name="app/db", SecretString=PLANTED + "-db")
    sts = boto3.client("sts", endpoint_url=url, **keys)
    issued = [
        sts.assume_role(RoleArn=arn, RoleSessionName=f"pod-{i}")["Credentials"] for i in range(4)
    ]
    yield {"url": url, "credentials": issued}
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


def from_sts(creds: dict[str, Any], expires: float) -> dict[str, str]:
    return {
        "AccessKeyId": creds["AccessKeyId"],
        "SecretAccessKey": creds["SecretAccessKey"],
        "Token": creds["SessionToken"],
        "Expiration": iso(expires),
    }


def aws_source(moto_url: str, credentials: str = "") -> str:
    return f"""
[[sources]]
name = "aws"
provider = "aws"
region = "us-east-1"
endpoint = "{moto_url}"
match = ["*"]
timeout_seconds = 5
max_attempts = 1
{credentials}
"""


async def read(agent, path: str, session: aiohttp.ClientSession) -> tuple[int, bytes]:
    url = f"http://{agent.addresses[0]}{path}"
    async with session.get(url, headers={"X-KMS-Token": TOKEN}) as resp:
        return resp.status, await resp.read()


async def read_through_expiry(agent, second: str) -> list[int]:
    """Read (bypassing the cache) until the source holds the credentials with key id
    ``second``, then once more with them; the statuses of every read."""
    provider = agent.state.router.providers["aws"]
    statuses = []
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 15
    async with aiohttp.ClientSession() as http:
        while provider.credentials.current.access_key_id != second and loop.time() < give_up:
            statuses.append((await read(agent, "/secrets/app/db?format=raw&refresh=true", http))[0])
            await asyncio.sleep(0.1)  # pacing the client loop while the lifetime runs out
        status, body = await read(agent, "/secrets/app/db?format=raw&refresh=true", http)
    assert (status, body) == (200, (PLANTED + "-db").encode())
    assert provider.credentials.current.access_key_id == second
    return [*statuses, status]


async def test_pod_identity_credentials_read_a_secret_and_are_renewed(
    tmp_path, aiohttp_server, moto_sts
):
    """End to end on EKS Pod Identity: the agent, given only the two variables EKS
    injects, reads a secret from moto with the role credentials the endpoint hands out
    (moto checks the signature and the session token); when those near their expiry (3 s
    here) it fetches the next set and every read keeps succeeding."""
    token_file = tmp_path / "eks-pod-identity-token"
    fake = PodIdentityAgent(token_file, expires=lambda: 0)
    fake.project()
    fake.answer = lambda n: from_sts(moto_sts["credentials"][n - 1], time.time() + 3)
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": str(server.make_url("/v1/credentials")),
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    async with running_agent(tmp_path, aws_source(moto_sts["url"]), env) as agent:
        assert agent.state.router.providers["aws"].credential_type == "container"
        statuses = await read_through_expiry(agent, moto_sts["credentials"][1]["AccessKeyId"])
    assert len(fake.issued) == 2
    assert set(statuses) == {200}


async def test_imds_credentials_read_a_secret_and_are_renewed(tmp_path, aiohttp_server, moto_sts):
    """End to end on EC2: the agent reads a secret from moto with the instance role's
    credentials from IMDSv2 and renews them near expiry (3 s here), every read
    succeeding."""
    imds = InstanceMetadata()
    sets = moto_sts["credentials"][2:]  # the first two are the Pod Identity test's
    imds.answer = lambda n: from_sts(sets[n - 1], time.time() + 3)
    server = await aiohttp_server(imds.app(), host="127.0.0.1")
    table = f'[sources.credentials]\ntype = "imds"\nimds_endpoint = "{str(server.make_url("")).rstrip("/")}"\n'
    async with running_agent(tmp_path, aws_source(moto_sts["url"], table)) as agent:
        assert agent.state.router.providers["aws"].credential_type == "imds"
        statuses = await read_through_expiry(agent, sets[1]["AccessKeyId"])
    assert len(imds.issued) == 2
    assert set(statuses) == {200}


async def test_moto_refuses_credentials_the_fake_did_not_get_from_sts(
    tmp_path, aiohttp_server, moto_sts
):
    """The judge is real: a set whose session token was altered is refused by moto and
    the read fails as bad credentials (so the reads above prove the handed-out
    credentials were used, token included)."""
    token_file = tmp_path / "eks-pod-identity-token"
    fake = PodIdentityAgent(token_file, expires=lambda: 0)
    fake.project()
    good = from_sts(moto_sts["credentials"][0], time.time() + HOUR)
    fake.answer = lambda n: {**good, "Token": good["Token"][:-4] + "AAAA"}
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": str(server.make_url("/v1/credentials")),
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    async with running_agent(tmp_path, aws_source(moto_sts["url"]), env) as agent:
        async with aiohttp.ClientSession() as http:
            status, body = await read(agent, "/secrets/app/db", http)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "UpstreamBadCredentials"
    assert PLANTED.encode() not in body
