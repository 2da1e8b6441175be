"""The ``huawei`` provider: Huawei Cloud CSMS (Cloud Secret Management Service), REST v1.

``GET /v1/{project_id}/secrets/{name}/versions/{id|latest}`` reads a version;
a stage (``SYSCURRENT``, ``SYSPREVIOUS`` or custom) is resolved with
``GET …/stages/{stage}`` first. Requests are signed with SDK-HMAC-SHA256 (AK/SK).
CSMS secret names are 1-64 letters, digits, ``_`` and ``-``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from kms_agent.config import Config, SourceConfig
from kms_agent.credentials import Credentials, Refreshing, StaleCredentials
from kms_agent.credentials import huawei as huawei_credentials
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    BadCredentials,
    ConfigError,
    DecryptDenied,
    InvalidUpstreamRequest,
    PendingDeletion,
    SecretNotFound,
    Throttled,
    Unavailable,
)
from kms_agent.model import (
    HUAWEI_NAMES,
    HUAWEI_STAGES,
    SecretMetadata,
    SecretRecord,
    canonical_stage,
)
from kms_agent.providers._cloud import CloudProvider
from kms_agent.providers.options import HuaweiOptions
from kms_agent.signing import Request
from kms_agent.signing.huawei import SdkHmac
from kms_agent.upstream import answer_time

_NOT_FOUND = frozenset({"CSMS.0005", "CSMS.0106"})
_PENDING_DELETION = frozenset({"CSMS.0103", "CSMS.0107"})
#: Huawei's SDK treats temporary credentials as stale this long before expiry.
STALE_BEFORE = 40 * 60


class Provider(CloudProvider):
    kind = "huawei"
    name_rule = HUAWEI_NAMES
    stages = HUAWEI_STAGES
    service = "Huawei Cloud CSMS"
    signer = SdkHmac()

    def __init__(
        self, source: SourceConfig, config: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        where = f"sources.{source.name}"
        env = os.environ if environ is None else environ
        opts = HuaweiOptions.of(source.options)
        self.name = source.name
        self.region = opts.region
        self.project_id = opts.project_id or env.get("HUAWEICLOUD_SDK_PROJECT_ID")
        if not self.project_id:
            raise ConfigError(f"{where}.project_id: required (or $HUAWEICLOUD_SDK_PROJECT_ID)")
        default = f"https://kms.{self.region}.myhuaweicloud.com" if self.region else None
        self._endpoints(opts, where, "endpoint", opts.endpoint, default)
        self._limits(opts)
        self.credential_type, fetch = huawei_credentials.resolve(
            opts.credentials, env, session=self._http, where=f"{where}.credentials"
        )
        self.credentials = Refreshing(fetch, self.name, stale_before=STALE_BEFORE)

    def _described(self) -> dict[str, str]:
        return {"project_id": str(self.project_id)}

    # ------------------------------------------------------------------ calls

    async def _call(
        self,
        path: str,
        query: dict[str, str] | None = None,
        name: str = "",
        parse: Callable[[Any, str], Any] | None = None,
    ) -> Any:
        headers = {"Content-Type": "application/json", "X-Project-Id": str(self.project_id)}
        request = Request("GET", path, query or {}, headers)
        return await self._send(request, self._parser(name, parse), name=name)

    def _own(self, answer: dict[str, Any]) -> bool:
        """CSMS and APIG refuse with ``error_code``/``error_msg`` (or an ``error`` object)."""
        return (
            "error_code" in answer or "error_msg" in answer or isinstance(answer.get("error"), dict)
        )

    def _judge(
        self, status: int, answer: dict[str, Any], name: str, creds: Credentials
    ) -> AgentError:
        inner = answer.get("error")
        nested: dict[str, Any] = inner if isinstance(inner, dict) else answer
        code = str(nested.get("error_code") or nested.get("code") or f"HTTP{status}")
        message = str(nested.get("error_msg") or nested.get("message") or "")[:300]
        said = f"Huawei Cloud CSMS: {code}"
        if code in _NOT_FOUND:
            return SecretNotFound(
                f"{said}: secret {name!r} (or that version) does not exist in project "
                f"{self.project_id}",
                hint="check the name, the version or stage, and the project/region",
            )
        if code in _PENDING_DELETION:
            return PendingDeletion(
                f"{said}: secret {name!r} is scheduled for deletion",
                hint="cancel the scheduled deletion (restore it) or read another secret",
            )
        if code == "CSMS.0401":
            return DecryptDenied(
                f"{said}: the secret's KMS key cannot decrypt it (disabled, pending deletion, "
                "or no kms:cmk:decrypt for this identity)",
                hint="enable the secret's KMS key (see its kms_key_id in `kms-agent doctor`) "
                "and allow kms:cmk:decrypt on it; the default key csms/default cannot be disabled",
            )
        if status == 429 or code.startswith("APIG.0308") or "throttl" in message.lower():
            return Throttled(f"{said}: throttled", hint="lower rate_limit_qps or raise cache.ttl")
        if status == 401 or code.startswith(("APIGW.03", "APIG.03")):
            if creds.security_token and creds.expiration is not None:
                return StaleCredentials(f"{said}: temporary credentials no longer accepted")
            return BadCredentials(
                f"{said}: the AK/SK signature or token was refused ({message[:80]})",
                hint="check the AK/SK (or the agency of the ECS instance) and the host's clock",
            )
        if status == 403:
            return AccessDenied(
                f"{said}: the identity may not read secret {name!r}",
                hint="grant the IAM identity csms:secret:getVersion (and csms:secret:list to "
                f"list) in project {self.project_id}, e.g. with the CSMS ReadOnlyAccess policy",
            )
        if status >= 500:
            return Unavailable(f"{said}: the service failed")
        return InvalidUpstreamRequest(f"{said}: {message or 'request refused'}")

    # ------------------------------------------------------------------ interface

    def _check(self, name: str) -> str:
        if not self.name_rule.accepts(name):
            raise InvalidUpstreamRequest(
                f"{name!r} cannot be a CSMS secret name",
                hint="CSMS secret names are 1-64 letters, digits, _ and -; route other names "
                "to another source with match globs",
            )
        return quote(name, safe="")

    async def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        base = f"/v1/{self.project_id}/secrets/{self._check(name)}"
        if version_id is None:
            stage = canonical_stage(version_stage, self.stages)
            if stage:
                body = await self._call(f"{base}/stages/{quote(stage, safe='')}", name=name)
                with self._reading():
                    version_id = str(body["stage"]["version_id"])
        version = version_id or "latest"
        record: SecretRecord = await self._call(
            f"{base}/versions/{quote(version, safe='')}", name=name, parse=self._version
        )
        return record

    def _version(self, body: Any, name: str) -> SecretRecord:
        """The version in a GetSecretValue answer (read inside the attempt: a wrong-shaped
        200 fails it, and is retried elsewhere)."""
        with self._reading():
            item = body["version"]
            meta = item["version_metadata"]
            binary = bool(item.get("secret_binary")) and not item.get("secret_string")
            return self._record(
                meta.get("secret_name", name),
                item["secret_binary"] if binary else item["secret_string"],
                binary=binary,
                version_id=meta["id"],
                stages=meta.get("version_stages", []),
                created=meta.get("create_time"),
                extra={"kms_key_id": meta.get("kms_key_id", "")},
            )

    async def describe(self, name: str) -> SecretMetadata:
        body = await self._call(f"/v1/{self.project_id}/secrets/{self._check(name)}", name=name)
        secret = body.get("secret", {})
        keys = ("kms_key_id", "state", "scheduled_delete_time")
        return SecretMetadata(
            name=name,
            source=self.name,
            created=answer_time(secret.get("create_time")),
            versions=(),
            extra={k: str(secret[k]) for k in keys if secret.get(k)},
        )

    async def list_names(self, prefix: str) -> list[str]:
        names: list[str] = []
        marker = ""
        while True:
            query = {"limit": "200"} | ({"marker": marker} if marker else {})
            body = await self._call(f"/v1/{self.project_id}/secrets", query)
            names += [
                str(s["name"])
                for s in body.get("secrets", [])
                if str(s.get("name", "")).startswith(prefix)
            ]
            marker = str((body.get("page_info") or {}).get("next_marker") or "")
            if not marker:
                return sorted(names)

    async def check(self) -> None:
        """A signed list proves credentials and reachability; a 403 proves them too."""
        try:
            await self._call(f"/v1/{self.project_id}/secrets", {"limit": "1"})
        except AccessDenied:
            return
