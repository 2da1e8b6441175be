"""The ``alibaba`` provider: Alibaba Cloud KMS secrets over the shared gateway.

OpenAPI 2016-01-20, RPC style: parameters in the query string, empty body, signed with
ACS3-HMAC-SHA256. GetSecretValue, DescribeSecret and ListSecrets only: the agent reads.
Default secrets created by cloud products are named ``<ProductCode>!<SecretIdentifier>``.

The gateway (how a request is carried and signed) is separate from the provider (what is
asked and how answers map onto the vocabulary), so the dedicated gateway of a KMS instance,
a different protocol, can be added beside :class:`SharedGateway`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiohttp
import structlog
import yarl

from kms_agent.config import Config, SourceConfig
from kms_agent.credentials import Credentials, Refreshing, StaleCredentials
from kms_agent.credentials import alibaba as alibaba_credentials
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
    ALIBABA_NAMES,
    ALIBABA_STAGES,
    DataType,
    SecretMetadata,
    SecretRecord,
    SecretValue,
    canonical_stage,
)
from kms_agent.providers._cloud import CloudProvider
from kms_agent.signing import alibaba as acs3
from kms_agent.upstream import (
    check_endpoint,
    mapped_errors,
    option,
)

log = structlog.get_logger("kms_agent.providers.alibaba")

API_VERSION = "2016-01-20"
#: Alibaba's documented GetSecretValue quota on the shared gateway, per account.
SHARED_GATEWAY_QPS = 450.0
DEFAULT_QPS = 100.0
_STALE_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId.NotFound", "InvalidSecurityToken.Expired", "SecurityTokenExpired"}
)


def policy_statement(action: str, resource: str) -> str:
    return json.dumps({"Effect": "Allow", "Action": action, "Resource": resource})


class SharedGateway:
    """Signed RPC calls to kms[-vpc].<region>.aliyuncs.com (or an explicit endpoint)."""

    def __init__(
        self, endpoint: str, credentials: Refreshing, session: aiohttp.ClientSession
    ) -> None:
        self.endpoint = endpoint
        self.host = yarl.URL(endpoint).raw_authority
        self._credentials = credentials
        self._session = session

    async def call(
        self, action: str, params: dict[str, str], timeout: float
    ) -> tuple[int, dict[str, Any], Credentials]:
        creds = await self._credentials.get()
        headers = {
            "host": self.host,
            "x-acs-action": action,
            "x-acs-version": API_VERSION,
            "x-acs-date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "x-acs-signature-nonce": secrets.token_hex(16),
            "x-acs-content-sha256": acs3.EMPTY_SHA256,
            "accept": "application/json",
        }
        if creds.security_token:
            headers["x-acs-accesskey-id"] = creds.access_key_id
            headers["x-acs-security-token"] = creds.security_token
        headers["authorization"] = acs3.authorization(
            method="POST",
            path="/",
            query=params,
            headers=headers,
            body=b"",
            access_key_id=creds.access_key_id,
            access_key_secret=creds.access_key_secret,
        )
        url = yarl.URL(f"{self.endpoint}/?{acs3.canonical_query(params)}", encoded=True)
        with mapped_errors(f"Alibaba Cloud KMS at {self.host}"):
            async with self._session.post(
                url, headers=headers, data=b"", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                body = await resp.json(content_type=None)
        if not isinstance(body, dict):
            raise Unavailable(f"Alibaba Cloud KMS at {self.host} answered with a non-object")
        return resp.status, body, creds


class Provider(CloudProvider):
    name_rule = ALIBABA_NAMES
    stages = ALIBABA_STAGES

    def __init__(
        self, source: SourceConfig, config: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        where = f"sources.{source.name}"
        opts = dict(source.options)
        self.name = source.name
        self.region = option(opts, "region", str, where, None)
        self.network = option(opts, "network", str, where, "public")
        if self.network not in ("public", "vpc"):
            raise ConfigError(f"{where}.network: {self.network!r} is not 'public' or 'vpc'")
        endpoint = option(opts, "endpoint", str, where, None)
        if endpoint is None:
            if not self.region:
                raise ConfigError(
                    f"{where}.region: give the region (like 'cn-hangzhou') or an endpoint"
                )
            prefix = "kms-vpc" if self.network == "vpc" else "kms"
            endpoint = f"https://{prefix}.{self.region}.aliyuncs.com"
        self.endpoint = check_endpoint(endpoint, f"{where}.endpoint")
        self.region = self.region or "cn-hangzhou"
        self.account_id = str(option(opts, "account_id", (str, int), where, "*"))
        self._limits(
            opts, where, default_qps=DEFAULT_QPS, max_qps=SHARED_GATEWAY_QPS,
            why_max="the shared gateway's GetSecretValue quota per account (shared by all clients)",
        )  # fmt: skip
        table = option(opts, "credentials", dict, where, {})
        if opts:
            raise ConfigError(
                f"{where}.{min(opts)}: unknown setting; the alibaba provider takes region, "
                "network, endpoint, account_id, rate_limit_qps, timeout_seconds, max_attempts, "
                "credentials"
            )
        self.credential_type, fetch = alibaba_credentials.resolve(
            table,
            os.environ if environ is None else environ,
            region=self.region,
            network=self.network,
            session=self._http,
            where=f"{where}.credentials",
        )
        self.credentials = Refreshing(fetch, self.name)
        self.gateway: SharedGateway | None = None

    def __repr__(self) -> str:
        return f"alibaba.Provider({self.name!r}, {self.endpoint!r}, {self.credential_type})"

    async def open(self) -> None:
        self.gateway = SharedGateway(self.endpoint, self.credentials, self._http())
        log.info(
            "alibaba_source_opened",
            source=self.name,
            endpoint=self.endpoint,
            credentials=self.credential_type,
        )

    # ------------------------------------------------------------------ calls

    async def _call(self, action: str, params: dict[str, str], name: str = "") -> dict[str, Any]:
        assert self.gateway is not None, "open() first"
        gateway = self.gateway

        async def attempt(remaining: float) -> dict[str, Any]:
            status, body, creds = await gateway.call(action, params, remaining)
            if status == 200 and "Code" not in body:
                return body
            raise self._error(status, body, name, creds)

        return await self._limited(attempt)

    def _error(
        self, status: int, body: dict[str, Any], name: str, creds: Credentials
    ) -> AgentError:
        code = str(body.get("Code", f"HTTP{status}"))
        message = str(body.get("Message", ""))[:300]
        request_id = body.get("RequestId", "")
        said = f"Alibaba Cloud KMS: {code}" + (f" (request {request_id})" if request_id else "")
        secret_arn = f"acs:kms:{self.region}:{self.account_id}:secret/{name}"
        if code == "Forbidden.ResourceNotFound":
            return SecretNotFound(
                f"{said}: secret {name!r} does not exist in {self.region}",
                hint="check the name (default secrets carry their product prefix, like aigw!...) "
                "and that the source's region is the secret's region",
            )
        if code == "Forbidden.NoPermission" and "kms:Decrypt" in message:
            key = body.get("KeyId") or "the secret's customer managed key"
            return DecryptDenied(
                f"{said}: the identity may read the secret but not decrypt it with {key}",
                hint="step 2 of the troubleshooting order: a secret encrypted under a customer "
                "managed key also needs kms:Decrypt on that key. Grant: "
                + policy_statement("kms:Decrypt", f"acs:kms:{self.region}:{self.account_id}:key/*"),
            )
        if code.startswith("Forbidden"):
            return AccessDenied(
                f"{said}: the identity ({creds.origin}) may not read secret {name!r}",
                hint="step 1 of the troubleshooting order: grant the RAM identity "
                "kms:GetSecretValue on the secret. Grant: "
                + policy_statement("kms:GetSecretValue", secret_arn),
            )
        if code == "Rejected.ResourceInDeleteWindow":
            return PendingDeletion(
                f"{said}: secret {name!r} is scheduled for deletion",
                hint="step 3 of the troubleshooting order: restore it with RestoreSecret within "
                "its recovery window, or read another secret",
            )
        if "Throttling" in code:
            self.stats.throttled += 1
            return Throttled(
                f"{said}: throttled",
                hint=f"the shared gateway allows {SHARED_GATEWAY_QPS:g} GetSecretValue QPS per "
                "account, shared by every client; lower rate_limit_qps or raise cache.ttl",
            )
        if code in _STALE_CREDENTIAL_CODES and creds.security_token:
            self.credentials.invalidate(creds)
            return StaleCredentials(f"{said}: temporary credentials no longer accepted")
        if code.startswith(
            (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "IncompleteSignature",
                "InvalidSecurityToken",
                "IllegalTimestamp",
                "SignatureNonceUsed",
            )
        ):
            return BadCredentials(
                f"{said}: the request's credentials or signature were refused",
                hint="check the AccessKey (or the role the agent assumes) and the host's clock",
            )
        if status >= 500 or code in ("InternalFailure", "ServiceUnavailableTemporary"):
            return Unavailable(f"{said}: the service failed")
        return InvalidUpstreamRequest(f"{said}: {message or 'request refused'}")

    # ------------------------------------------------------------------ interface

    async def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        params = {"SecretName": name}
        if version_id:
            params["VersionId"] = version_id
        if version_stage or not version_id:
            stage = canonical_stage(version_stage, self.stages, by_id=True)
            params["VersionStage"] = stage or self.stages.current
        body = await self._call("GetSecretValue", params, name)
        try:
            data_type: DataType = "binary" if body.get("SecretDataType") == "binary" else "text"
            data = str(body["SecretData"])
            raw = base64.b64decode(data) if data_type == "binary" else data.encode("utf-8")
            stages = body.get("VersionStages", {}).get("VersionStage", [])
            return SecretRecord(
                name=str(body.get("SecretName", name)),
                value=SecretValue(raw),
                data_type=data_type,
                version_id=str(body["VersionId"]),
                version_stages=tuple(str(s) for s in stages),
                created=_parse_time(body.get("CreateTime")),
                source=self.name,
                secret_type=str(body.get("SecretType", "Generic")),
                extra={"request_id": str(body.get("RequestId", ""))},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise Unavailable(
                f"Alibaba Cloud KMS answered GetSecretValue without {exc!s:.40}"
            ) from None

    async def describe(self, name: str) -> SecretMetadata:
        body = await self._call("DescribeSecret", {"SecretName": name}, name)
        extra = {
            k: str(body[k])
            for k in ("Arn", "EncryptionKeyId", "OwingService", "PlannedDeleteTime")
            if body.get(k)
        }
        return SecretMetadata(
            name=name,
            source=self.name,
            created=_parse_time(body.get("CreateTime")),
            versions=(),
            secret_type=str(body.get("SecretType", "Generic")),
            extra=extra,
        )

    async def list_names(self, prefix: str) -> list[str]:
        names: list[str] = []
        page = 1
        while True:
            params = {"PageNumber": str(page), "PageSize": "100"}
            if prefix:
                params["Filters"] = json.dumps([{"Key": "SecretName", "Values": [prefix]}])
            body = await self._call("ListSecrets", params)
            batch = body.get("SecretList", {}).get("Secret", [])
            names += [
                str(s["SecretName"])
                for s in batch
                if str(s.get("SecretName", "")).startswith(prefix)
            ]
            total = int(body.get("TotalCount", 0))
            if not batch or page * 100 >= total:
                return sorted(names)
            page += 1

    async def check(self) -> None:
        """Credentials usable and the endpoint answering a signed request. A refusal to list
        still proves both (the identity may only read specific secrets)."""
        try:
            await self._call("ListSecrets", {"PageNumber": "1", "PageSize": "1"})
        except AccessDenied:
            return


def _parse_time(text: Any) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0
