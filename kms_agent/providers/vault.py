"""The ``vault`` provider: HashiCorp Vault / OpenBao KV version 2.

A secret name is a KV path under ``mount``; the value served is the version's ``data``
object as JSON (so ``?field=KEY`` reads one key). Stages map onto versions: the current
stage is the latest version, the previous stage ``current_version - 1``.
Auth: a token, AppRole, or a Kubernetes service-account JWT; tokens from a login are
renewed (``renew-self``) before they expire, and logged in again when renewal fails or
the server refuses them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import structlog

from kms_agent.config import Config, SourceConfig
from kms_agent.credentials import Credentials, Refreshing, StaleCredentials, read_secret_file
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    BadCredentials,
    ConfigError,
    InvalidUpstreamRequest,
    SecretNotFound,
    Throttled,
    Unavailable,
)
from kms_agent.model import (
    AWS_STAGES,
    VAULT_NAMES,
    SecretMetadata,
    SecretRecord,
    canonical_stage,
)
from kms_agent.providers._cloud import CloudProvider
from kms_agent.providers.options import VaultOptions
from kms_agent.signing import Request
from kms_agent.upstream import answer_time

log = structlog.get_logger("kms_agent.providers.vault")


#: How often a token file is re-read when nothing refused its token (seconds).
TOKEN_FILE_RECHECK = 60.0


class VaultToken:
    """Vault's :class:`~kms_agent.signing.Signer`: no signature, the token as a header."""

    def sign(self, request: Request, credentials: Credentials, now: float) -> dict[str, str]:
        return {**request.headers, "X-Vault-Token": credentials.access_key_secret}


class Provider(CloudProvider):
    kind = "vault"
    #: Vault answers some calls with an empty body.
    EMPTY_ANSWER_OK = True
    service = "Vault"
    signer = VaultToken()
    name_rule = VAULT_NAMES
    #: KV v2 has versions, not stages: the latest version answers as current, the one
    #: before as previous, in AWS's spelling.
    stages = AWS_STAGES

    def __init__(
        self, source: SourceConfig, config: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        where = f"sources.{source.name}"
        env = os.environ if environ is None else environ
        opts = VaultOptions.of(source.options)
        self.name = source.name
        address = opts.address or env.get("VAULT_ADDR")
        if not address and opts.endpoints is None:
            raise ConfigError(
                f"{where}.address: the Vault/OpenBao URL is required (or $VAULT_ADDR)"
            )
        self._endpoints(opts, where, "address", address or None, None)
        self.mount = opts.mount.strip("/")
        self.namespace = opts.namespace
        self.auth = opts.auth
        self.auth_mount = (opts.auth if opts.auth_mount is None else opts.auth_mount).strip("/")
        self._token = opts.token or env.get("VAULT_TOKEN")
        self._token_file = opts.token_file
        self._role_id = opts.role_id
        self._secret_id = opts.secret_id
        self._secret_id_file = opts.secret_id_file
        self._role = opts.role
        self._jwt_file = opts.jwt_file
        self.verify_answers = opts.verify_answers
        self._limits(opts)
        self.ca_file = opts.ca_file
        if self.auth == "token" and not (self._token or self._token_file):
            raise ConfigError(
                f"{where}.token: token auth needs token or token_file (or $VAULT_TOKEN)"
            )
        self._renewable = False
        self.logins = 0
        self.credentials = Refreshing(self._authenticate, self.name)
        self.credential_type = self.auth

    # ------------------------------------------------------------------ auth

    async def _authenticate(self) -> Credentials:
        """Renew the current login token if possible, else log in (or read the token)."""
        if self.auth == "token":
            if self._token_file is None:
                return Credentials("vault-token", str(self._token), origin="token")
            # A token file is re-read: within TOKEN_FILE_RECHECK in the background, and at
            # once when Vault refuses the token (see _refused), so a rotation needs no restart.
            return Credentials(
                "vault-token",
                read_secret_file(str(self._token_file), "Vault token file"),
                expiration=time.time() + TOKEN_FILE_RECHECK,
                origin="token_file",
            )
        current = self.credentials.current  # the token being refreshed, if any
        if current is not None and self._renewable:
            status, body = await self._unlimited("/v1/auth/token/renew-self", current)
            if status == 200 and isinstance(body.get("auth"), dict):
                return self._from_auth(body["auth"], "renewed")
            log.info("vault_renew_failed", source=self.name, status=status)
        if self.auth == "approle":
            secret_id = self._secret_id or read_secret_file(
                str(self._secret_id_file), "AppRole secret_id file"
            )
            payload = {"role_id": self._role_id, "secret_id": secret_id}
        else:
            payload = {
                "role": self._role,
                "jwt": read_secret_file(self._jwt_file, "service-account token file"),
            }
        status, body = await self._unlimited(f"/v1/auth/{self.auth_mount}/login", None, payload)
        if status != 200 or not isinstance(body.get("auth"), dict):
            errors = "; ".join(str(e) for e in body.get("errors", []))[:200]
            raise BadCredentials(
                f"Vault {self.auth} login refused (HTTP {status}: {errors})",
                hint="check the role and its credentials, and the auth mount path",
            )
        self.logins += 1
        return self._from_auth(body["auth"], self.auth)

    def _from_auth(self, auth: dict[str, Any], origin: str) -> Credentials:
        lease = int(auth.get("lease_duration") or 0)
        self._renewable = bool(auth.get("renewable"))
        expiration = time.time() + lease if lease > 0 else None
        return Credentials(
            "vault-token", str(auth["client_token"]), expiration=expiration, origin=origin
        )

    async def _unlimited(
        self, path: str, creds: Credentials | None, payload: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """A POST of the auth flow (login, renewal): made while a call waits for the token,
        so outside the limiter (that call holds its place), within the source's timeout."""
        body = json.dumps(payload).encode() if payload is not None else b""
        answer = await self._exchange(self._request("POST", path, body=body), creds, self.timeout)
        if answer.status == 200:
            return 200, self._json(answer.body)
        said = self._said(answer.body)
        if said is None:
            raise self._foreign(answer.status)  # a proxy's page: no word from Vault
        return answer.status, said

    def _request(
        self, method: str, path: str, query: dict[str, str] | None = None, body: bytes = b""
    ) -> Request:
        headers = {"X-Vault-Request": "true"}
        if self.namespace:
            headers["X-Vault-Namespace"] = self.namespace
        if body:
            headers["Content-Type"] = "application/json"
        return Request(method, path, query or {}, headers, body)

    # ------------------------------------------------------------------ calls

    async def _call(
        self, path: str, name: str = "", query: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return await self._send(self._request("GET", path, query), self._json, name=name)

    def _own(self, answer: dict[str, Any]) -> bool:
        """Vault refuses with ``{"errors": [...]}`` (or a deleted version's ``data``)."""
        return isinstance(answer.get("errors"), list) or isinstance(answer.get("data"), dict)

    def _judge(
        self, status: int, answer: dict[str, Any], name: str, creds: Credentials
    ) -> AgentError:
        errors = "; ".join(str(e) for e in answer.get("errors", []))[:200]
        said = f"Vault: HTTP {status}"
        if status == 404:
            meta = (answer.get("data") or {}).get("metadata") or {}
            if meta.get("destroyed") or meta.get("deletion_time"):
                return SecretNotFound(
                    f"{said}: that version of {name!r} was deleted",
                    hint="undelete it (kv undelete) or read another version",
                )
            return SecretNotFound(
                f"{said}: no secret at {self.mount}/{name}",
                hint=f"check the path under the KV v2 mount {self.mount!r}",
            )
        if status == 403:
            if self.auth != "token":
                return StaleCredentials(f"{said}: the token was refused ({errors})")
            return AccessDenied(
                f"{said}: the token may not read {self.mount}/{name} ({errors})",
                hint=f'the token\'s policy needs: path "{self.mount}/data/{name}" '
                '{ capabilities = ["read"] }',
            )
        if status == 429:
            return Throttled(f"{said}: rate limited by Vault")
        if status >= 500:
            return Unavailable(f"{said}: {errors or 'the server failed'} (sealed or in standby?)")
        return InvalidUpstreamRequest(f"{said}: {errors or 'request refused'}")

    def _refused(self, error: AgentError, creds: Credentials, held: Refreshing) -> AgentError:
        """A token refused (403) after its file was rotated is stale, not a denial: the
        retry reads the new token."""
        if isinstance(error, AccessDenied) and self._rotated(creds):
            error = StaleCredentials(f"{error.message} (the token file holds a newer token)")
        return super()._refused(error, creds, held)

    def _rotated(self, creds: Credentials) -> bool:
        """Whether the token file now holds another token than ``creds`` (a rotation)."""
        if self._token_file is None:
            return False
        try:
            return read_secret_file(str(self._token_file), "Vault token file") != (
                creds.access_key_secret
            )
        except BadCredentials:
            return False

    # ------------------------------------------------------------------ interface

    def _path(self, name: str) -> str:
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise InvalidUpstreamRequest(
                f"{name!r} is not a KV path", hint="no empty, . or .. segments"
            )
        return quote(name, safe="/")

    async def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        path = self._path(name)
        version = version_id
        stage = canonical_stage(version_stage, self.stages)
        if version is not None and not version.isdigit():
            raise InvalidUpstreamRequest(f"Vault KV versions are numbers, not {version!r}")
        if version is None and stage == self.stages.previous:
            meta = await self._call(f"/v1/{self.mount}/metadata/{path}", name)
            with self._reading():
                current = int(meta["data"]["current_version"])
            if current < 2:
                raise SecretNotFound(f"{name!r} has no previous version")
            version = str(current - 1)
        elif version is None and stage:
            raise InvalidUpstreamRequest(f"Vault has no stage {version_stage!r}; use a version id")
        query = {"version": version} if version else None
        read = self._call(f"/v1/{self.mount}/data/{path}", name, query)
        if self.verify_answers:
            body, listing = await asyncio.gather(
                read, self._call(f"/v1/{self.mount}/metadata/{path}", name)
            )
        else:
            body, listing = await read, None
        with self._reading():
            data = body["data"]["data"]
            meta = body["data"]["metadata"]
            if listing is not None:
                self._check_answer(name, version, meta, listing["data"])
            return self._record(
                name,
                json.dumps(data, separators=(",", ":")),
                binary=False,
                version_id=meta["version"],
                stages=(self.stages.current,) if version is None else (),
                created=meta.get("created_time"),
            )

    @staticmethod
    def _check_answer(
        name: str, asked: str | None, meta: dict[str, Any], listing: dict[str, Any]
    ) -> None:
        """Raise Unavailable unless the data answer is the version ``listing`` (the path's
        metadata, read beside it) says it is: the version asked for, or the current one,
        created at the same instant."""
        version = str(meta["version"])
        expected = asked if asked is not None else str(listing["current_version"])
        created = (listing.get("versions") or {}).get(version, {}).get("created_time")
        if version != expected or created != meta.get("created_time"):
            raise Unavailable(
                f"Vault answered for {name!r} with a version its metadata does not have "
                "(another secret's answer, or a write in between); the answer was not used",
                hint="if this repeats, something between the agent and Vault crosses answers",
            )

    async def describe(self, name: str) -> SecretMetadata:
        body = await self._call(f"/v1/{self.mount}/metadata/{self._path(name)}", name)
        data = body.get("data", {})
        versions = tuple((str(v), ()) for v in sorted(data.get("versions", {}), key=int))
        created = answer_time(data.get("created_time"))
        return SecretMetadata(name=name, source=self.name, created=created, versions=versions)

    async def list_names(self, prefix: str) -> list[str]:
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        path = f"/v1/{self.mount}/metadata/{quote(directory, safe='/')}"
        try:
            body = await self._call(path, query={"list": "true"})
        except SecretNotFound:
            return []
        keys = body.get("data", {}).get("keys", [])
        base = f"{directory}/" if directory else ""
        return sorted(
            base + k for k in keys if not k.endswith("/") and (base + k).startswith(prefix)
        )

    async def check(self) -> None:
        await self._call("/v1/auth/token/lookup-self")
