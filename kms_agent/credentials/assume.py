"""Role chaining, the part every cloud shares.

An assume-role credentials table (Alibaba ``type = "ram_role_arn"``, AWS ``type =
"assume_role"``) names a role and a nested ``base`` table of any other credentials type. The
base credentials are held and refreshed like any source's (:class:`Refreshing`); each fetch
of the role's credentials signs one STS AssumeRole call with them. This module owns the
table's keys, their limits and defaults, the chain and what a refusal means; the cloud
modules own the STS call.

Limits: ``duration_seconds`` 900-43200 (AWS STS ``roleDurationSecondsType``; Alibaba's
AssumeRole has the same range, the role's maximum session duration permitting);
``role_session_name`` 2-64 of letters, digits and ``_ . @ -`` (what both clouds accept).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kms_agent.credentials import Credentials, Fetch, Refreshing, StaleCredentials
from kms_agent.errors import BadCredentials, ConfigError

SESSION_NAME = "kms-agent"
MIN_DURATION, MAX_DURATION, DEFAULT_DURATION = 900, 43200, 3600
#: The keys of an assume-role table (``type`` included); anything else is named as unknown.
KEYS = frozenset(
    {
        "type",
        "role_arn",
        "role_session_name",
        "external_id",
        "policy",
        "duration_seconds",
        "sts_endpoint",
        "base",
    }
)
#: Keys that only an assume-role table takes.
ONLY_HERE = frozenset({"external_id", "policy", "base"})
_SESSION_NAME = re.compile(r"[A-Za-z0-9_.@-]{2,64}")
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}")

#: Exchange base credentials for the role's (one STS AssumeRole call).
Assume = Callable[[Credentials], Awaitable[Credentials]]
#: One signed STS AssumeRole call: (the role's credentials, or None and what STS said).
Call = Callable[[Credentials], Awaitable[tuple[Credentials | None, str]]]


@dataclass(frozen=True, slots=True)
class Chain:
    """The validated settings of an assume-role table."""

    role_arn: str
    session_name: str
    duration: int
    external_id: str | None = field(repr=False)
    policy: str | None = field(repr=False)
    base: Mapping[str, Any] = field(repr=False)

    def params(self) -> dict[str, str]:
        """The AssumeRole parameters, spelled alike by Alibaba's STS and AWS's."""
        params = {
            "RoleArn": self.role_arn,
            "RoleSessionName": self.session_name,
            "DurationSeconds": str(self.duration),
        }
        if self.external_id is not None:
            params["ExternalId"] = self.external_id
        if self.policy is not None:
            params["Policy"] = self.policy
        return params


def duration_seconds(table: Mapping[str, Any], where: str) -> int:
    """``duration_seconds`` of a table (default 3600), checked against 900-43200."""
    value = table.get("duration_seconds", DEFAULT_DURATION)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.duration_seconds: must be a whole number of seconds")
    if not MIN_DURATION <= value <= MAX_DURATION:
        raise ConfigError(
            f"{where}.duration_seconds: {value} must be {MIN_DURATION}-{MAX_DURATION}"
        )
    return value


def session_name(table: Mapping[str, Any], where: str) -> str:
    """``role_session_name`` (default "kms-agent"), in the shape both clouds accept."""
    name = table.get("role_session_name", SESSION_NAME)
    if not isinstance(name, str) or not _SESSION_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}.role_session_name: must be 2-64 letters, digits, '_', '.', '@' or '-'"
        )
    return name


def refuse_chain_keys(table: Mapping[str, Any], kind: str, chain_type: str, where: str) -> None:
    """A table of another type must not carry the keys only a chain takes."""
    stray = ONLY_HERE & set(table)
    if stray:
        raise ConfigError(
            f"{where}.{min(stray)}: only taken with type = {chain_type!r} (this table is {kind!r})"
        )


def settings(table: Mapping[str, Any], chain_type: str, where: str) -> Chain:
    """Validate an assume-role table; unknown keys and bad values are named by path."""
    unknown = set(table) - KEYS
    if unknown:
        raise ConfigError(
            f"{where}.{min(unknown)}: unknown setting for type = {chain_type!r}; allowed: "
            f"{', '.join(sorted(KEYS))}"
        )
    role = table.get("role_arn")
    if not isinstance(role, str) or not role:
        raise ConfigError(f"{where}.role_arn: required with type = {chain_type!r}")
    external_id = table.get("external_id")
    if external_id is not None and (
        not isinstance(external_id, str) or not _EXTERNAL_ID.fullmatch(external_id)
    ):
        raise ConfigError(
            f"{where}.external_id: must be 2-1224 letters, digits or any of _+=,.@:/-"
        )
    policy = table.get("policy")
    if policy is not None:
        try:
            parsed = json.loads(policy) if isinstance(policy, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError(
                f"{where}.policy: must be a session policy as a JSON object in a string"
            )
    base = table.get("base", {})
    if not isinstance(base, dict):
        raise ConfigError(f"{where}.base: must be a table ([{where}.base]) of credentials")
    return Chain(
        role_arn=role,
        session_name=session_name(table, where),
        duration=duration_seconds(table, where),
        external_id=external_id,
        policy=policy,
        base=base,
    )


def assumer(call: Call, chain: Chain, stale_codes: tuple[str, ...], signed_by: str) -> Assume:
    """AssumeRole of ``chain.role_arn`` by ``call``; a refusal is BadCredentials naming the
    role and STS's code, or StaleCredentials when the signer's temporary credentials were
    refused themselves (a code starting with one of ``stale_codes``)."""

    async def assume(signer: Credentials) -> Credentials:
        found, code = await call(signer)
        if found is not None:
            return found
        said = f"STS AssumeRole of {chain.role_arn} refused: {code}"
        if signer.security_token and code.startswith(stale_codes):
            raise StaleCredentials(f"{said} (the base credentials are no longer valid)")
        raise BadCredentials(
            said,
            hint=f"check that the role's trust policy lets the base credentials ({signed_by}) "
            "assume it, the external_id it requires, and that they may call sts:AssumeRole",
        )

    return assume


def signed_with(held: Refreshing, assume: Assume) -> Fetch:
    """The role's credentials, assumed with ``held``'s current ones; when STS refuses those
    as stale they are invalidated, so the next attempt fetches them anew."""

    async def fetch() -> Credentials:
        creds = await held.get()
        try:
            return await assume(creds)
        except StaleCredentials:
            held.invalidate(creds)
            raise

    return fetch


class _Chained:
    """A role chain's fetch: holds the base credentials' own Refreshing, which is closed
    with the source's (see :class:`~kms_agent.credentials.Holding`)."""

    def __init__(self, base: Refreshing, assume: Assume) -> None:
        self.base = base
        self._fetch = signed_with(base, assume)

    async def __call__(self) -> Credentials:
        return await self._fetch()

    async def close(self) -> None:
        await self.base.close()


def chained(base: Fetch, assume: Assume, where: str) -> Fetch:
    """The role's credentials: base credentials (held and refreshed on their own) sign each
    AssumeRole. ``assume`` raises :class:`StaleCredentials` when STS refused the base
    credentials as expired or revoked; they are then fetched anew on the next attempt."""
    return _Chained(Refreshing(base, f"{where}.base"), assume)
