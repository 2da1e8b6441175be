"""The blocks every cloud's credential sources are built of, parametrised per cloud.

Static keys (the table's, else the environment's), a profile of an INI credentials file,
an OIDC token exchange (the token file read afresh for each exchange: kubelet rotates it),
a metadata service (an optional session token, the credential document's URL, one GET of
a JSON credential document) and the reading of such a document. A cloud module says only
what is its own (setting and variable names, URLs, header and field names, messages) and
composes these in its ``resolve``; its STS calls stay in it.
"""

from __future__ import annotations

import configparser
import time
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import aiohttp

from kms_agent.credentials import (
    Credentials,
    Fetch,
    assume,
    credential_kind,
    parse_time,
    read_secret_file,
)
from kms_agent.errors import BadCredentials, ConfigError
from kms_agent.upstream import Answer, json_object, mapped_errors, send_to

#: Lifetime asked of a metadata session token (seconds; the SDKs of all three ask 6 hours).
METADATA_TOKEN_TTL = 21600

Session = Callable[[], aiohttp.ClientSession]
#: The headers a metadata request carries (a session token, an authorization token).
Headers = Callable[["Service"], Awaitable[dict[str, str]]]
#: Where the credential document is, given the headers: (URL, what a refusal is called).
Locate = Callable[["Service", dict[str, str]], Awaitable[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class Kinds:
    """A cloud's credentials types: the table keys it takes, its types ("auto" first) and
    its chained type (an assume-role table), if any."""

    keys: AbstractSet[str]
    types: tuple[str, ...]
    chain_type: str | None

    def of(self, table: Mapping[str, Any], where: str, discover: Callable[[], str]) -> str:
        """The table's type: its ``type`` (checked with its keys), ``discover()`` for
        "auto"; a table of another type than the chain's must not carry a chain's keys."""
        kind = credential_kind(table, self.keys, self.types, where)
        if self.chain_type is not None and kind != self.chain_type:
            assume.refuse_chain_keys(table, kind, self.chain_type, where)
        return discover() if kind == "auto" else kind


def static(key_id: str, secret: str, token: str | None, origin: str) -> Fetch:
    """Credentials that never change and never expire."""
    creds = Credentials(key_id, secret, token, origin=origin)

    async def fetch() -> Credentials:
        return creds

    return fetch


@dataclass(frozen=True, slots=True)
class KeyNames:
    """Where a cloud's static keys are configured: each a (table key, environment variable)
    pair, the table winning; ``label`` names them in an error."""

    key_id: tuple[str, str]
    secret: tuple[str, str]
    token: tuple[str, str]
    label: str


def static_keys(
    table: Mapping[str, Any], environ: Mapping[str, str], names: KeyNames, where: str
) -> tuple[str, str, str | None]:
    """(key id, secret, token or None) from the table or the environment; a missing key id
    or secret is a ConfigError naming both places."""

    def pick(name: tuple[str, str]) -> str | None:
        value = table.get(name[0]) or environ.get(name[1])
        return str(value) if value else None

    key_id, secret = pick(names.key_id), pick(names.secret)
    if not key_id or not secret:
        raise ConfigError(
            f"{where}: {names.label} need {names.key_id[0]} and {names.secret[0]} "
            f"(or ${names.key_id[1]} and ${names.secret[1]})"
        )
    return key_id, secret, pick(names.token)


@dataclass(frozen=True, slots=True)
class ProfileLayout:
    """A cloud's INI credentials file: the keys of a profile's section, whether values are
    literal (AWS: botocore's RawConfigParser) or ``%``-interpolated (Alibaba's SDK reads it
    with ConfigParser), and how often the keys are re-read (None: they never expire)."""

    key_id: str
    secret: str
    token: str | None
    literal: bool
    recheck: float | None


def profile_file(
    path: Path,
    profile: str,
    layout: ProfileLayout,
    origin: str,
    where: str,
    clock: Callable[[], float] = time.time,
) -> Fetch:
    """The keys of ``[profile]`` in the INI file at ``path``, read on each fetch (with a
    ``recheck`` the source refreshes them, so an edited file needs no restart). A profile
    without both keys is BadCredentials naming file, profile and keys, quoting nothing."""

    async def from_file() -> Credentials:
        text = read_secret_file(path, "credentials file")
        parser = (
            configparser.ConfigParser(interpolation=None)
            if layout.literal
            else configparser.ConfigParser()
        )
        try:
            parser.read_string(text)
            section = parser[profile]
            key_id, secret = section[layout.key_id], section[layout.secret]
            token = section.get(layout.token) if layout.token else None
        except (KeyError, configparser.Error) as exc:
            raise BadCredentials(
                f"{where}: {path} has no [{profile}] {layout.key_id}/{layout.secret} "
                f"({type(exc).__name__})"
            ) from None
        expiration = None if layout.recheck is None else clock() + layout.recheck
        return Credentials(key_id, secret, token, expiration, origin=origin)

    return from_file


def token_exchange(
    token_file: str,
    what: str,
    exchange: Callable[[str], Awaitable[Credentials]],
    *,
    hint: str | None = None,
) -> Fetch:
    """An OIDC exchange: each fetch reads the token file afresh (kubelet rotates the
    projected token) and hands the token to ``exchange`` (the cloud's STS call)."""

    async def fetch() -> Credentials:
        return await exchange(read_secret_file(token_file, what, hint=hint))

    return fetch


def refusal(code: str, status: int) -> str:
    """What a refused exchange is called: the service's error code, else the HTTP status
    (a 200 that carried no usable credentials says so)."""
    if code:
        return code
    return f"HTTP {status}" if status != 200 else "an answer without usable credentials"


@dataclass(frozen=True, slots=True)
class Document:
    """Where a cloud's JSON credential document keeps the values: their keys, whether the
    token may be absent, the key of the object holding them (if nested) and a (key, value)
    the document must not contradict (``Code: Success``), if any."""

    key_id: str
    secret: str
    token: str
    expiration: str
    token_optional: bool = False
    within: str | None = None
    success: tuple[str, str] | None = None

    def credentials(self, body: object, origin: str) -> Credentials | None:
        """The credentials in ``body``, or None when it is not such a document; an
        expiration that is not an ISO 8601 time is BadCredentials."""
        if self.within is not None and isinstance(body, dict):
            body = body.get(self.within)
        if not isinstance(body, dict):
            return None
        if (
            self.success is not None
            and body.get(self.success[0], self.success[1]) != (self.success[1])
        ):
            return None  # it says it failed (a document without the key may still be good)
        key_id, secret, token = body.get(self.key_id), body.get(self.secret), body.get(self.token)
        if not (_text(key_id) and _text(secret) and self.expiration in body):
            return None
        if not _text(token):
            if not self.token_optional:
                return None
            token = None
        return Credentials(
            key_id,
            secret,
            token,
            parse_time(body[self.expiration], f"{origin} credentials"),
            origin=origin,
        )


def _text(value: object) -> TypeGuard[str]:
    """A non-empty string."""
    return isinstance(value, str) and bool(value)


def endpoint_setting(table: Mapping[str, Any], key: str, default: str, where: str) -> str:
    """A metadata service's base URL (``key`` of the table, else ``default``), http(s)."""
    endpoint = str(table.get(key) or default).rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.{key}: {endpoint!r} is not an http(s) URL")
    return endpoint


@dataclass(frozen=True, slots=True)
class Service:
    """A metadata service's calls: on the source's session, through the one send path
    (bounded answers, no redirects followed), named ``what`` in transport errors."""

    http: aiohttp.ClientSession
    what: str

    async def call(self, method: str, url: str, headers: Mapping[str, str] | None = None) -> Answer:
        return await send_to(self.http, method, url, what=self.what, headers=headers)


@dataclass(frozen=True, slots=True)
class SessionToken:
    """An IMDSv2-style session token: PUT to ``path`` with the TTL in ``ttl_header``, then
    sent in ``header``; ``what`` names the service in a refusal."""

    path: str
    ttl_header: str
    header: str
    what: str


def session_token(endpoint: str, spec: SessionToken) -> Headers:
    """The headers carrying a fresh session token of the metadata service at ``endpoint``."""

    async def headers(service: Service) -> dict[str, str]:
        ttl = {spec.ttl_header: str(METADATA_TOKEN_TTL)}
        answer = await service.call("PUT", f"{endpoint}{spec.path}", ttl)
        if answer.status != 200:
            raise BadCredentials(f"{spec.what} token request failed: HTTP {answer.status}")
        return {spec.header: answer.body.decode("utf-8", "replace").strip()}

    return headers


def at(url: str, refused: str) -> Locate:
    """A credential document at a fixed URL."""

    async def locate(_service: Service, _headers: dict[str, str]) -> tuple[str, str]:
        return url, refused

    return locate


def instance_role(
    base: str,
    role: str | None,
    no_role: Callable[[int], BadCredentials],
    refused: Callable[[str], str],
) -> Locate:
    """The credential document of the instance's role, ``base + role``: the configured
    ``role``, else the first the service lists at ``base`` (none listed: ``no_role`` of
    the HTTP status is raised)."""

    async def locate(service: Service, headers: dict[str, str]) -> tuple[str, str]:
        name = role
        if not name:
            answer = await service.call("GET", base, headers)
            ok = answer.status == 200
            listed = answer.body.decode("utf-8", "replace").strip() if ok else ""
            if not listed:
                raise no_role(answer.status)
            name = listed.splitlines()[0]
        return base + name, refused(name)

    return locate


def metadata(
    session: Session,
    service: str,
    headers: Headers,
    locate: Locate,
    document: Document,
    origin: str,
    *,
    hint: str | None = None,
) -> Fetch:
    """Credentials from a metadata service: the headers (a session token, say), where the
    document is, one GET of it (the status first: an error's body need not be JSON), then
    the document read by ``document``. Transport failures are mapped as ``service``'s; an
    answer without credentials is BadCredentials "<refused> (HTTP <status>)"."""

    async def fetch() -> Credentials:
        calls = Service(session(), service)
        with mapped_errors(service):
            sent = await headers(calls)
            url, refused = await locate(calls, sent)
            answer = await calls.call("GET", url, sent)
        status = answer.status
        body = json_object(answer.body, service) if status == 200 else None
        found = document.credentials(body, origin)
        if found is None:
            raise BadCredentials(f"{refused} (HTTP {status})", hint=hint)
        return found

    return fetch
