"""The ``alibaba`` provider: Alibaba Cloud KMS secrets over the shared gateway, or a KMS
3.0 instance's dedicated gateway (``gateway = "dedicated"``).

OpenAPI 2016-01-20, RPC style: parameters in the query string, empty body, signed with
ACS3-HMAC-SHA256. GetSecretValue, DescribeSecret and ListSecrets only: the agent reads.
Default secrets created by cloud products are named ``<ProductCode>!<SecretIdentifier>``.

Both ways in share the send path of every cloud (:mod:`kms_agent.providers._cloud`):
RAM credentials sign OpenAPI calls with ACS3 (:class:`~kms_agent.signing.alibaba.Acs3`),
a ClientKey signs the instance API's protobuf calls (dkms-gcs,
:class:`~kms_agent.signing.dkms.ClientKeySigner`); :meth:`Provider.classify` reads either
refusal, and one error rule (:func:`kms_agent.dkms_gcs.error_kind`) maps both.

The dedicated gateway with RAM auth (Alibaba's recommended way in) is the same OpenAPI,
signing and error vocabulary sent to ``<instance>.cryptoservice.kms.aliyuncs.com``, whose
certificate chains to the instance's private CA: ``ca_file`` is required, TLS is always
verified against it, and its rate limit is what the instance was bought with (no 450 cap).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from kms_agent import dkms_gcs
from kms_agent.config import Config, SourceConfig
from kms_agent.credentials import Credentials, Refreshing, StaleCredentials
from kms_agent.credentials import alibaba as alibaba_credentials
from kms_agent.credentials.client_key import ClientKey, load_client_key
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
    SecretMetadata,
    SecretRecord,
    canonical_stage,
)
from kms_agent.providers._cloud import CloudProvider
from kms_agent.providers.options import SHARED_GATEWAY_QPS, AlibabaOptions
from kms_agent.signing import Signer, dkms
from kms_agent.signing import alibaba as acs3
from kms_agent.upstream import answer_time, object_or_none

API_VERSION = "2016-01-20"
#: What a ClientKey source's readiness check reads (a not-found answer is the pass).
CHECK_NAME = "kms-agent-readiness-check"
#: Where a KMS instance's dedicated gateway answers (reachable from its VPC only).
DEDICATED_HOST = "{instance_id}.cryptoservice.kms.aliyuncs.com"


def policy_statement(action: str, resource: str) -> str:
    return json.dumps({"Effect": "Allow", "Action": action, "Resource": resource})


class Provider(CloudProvider):
    kind = "alibaba"
    name_rule = ALIBABA_NAMES
    stages = ALIBABA_STAGES
    service = "Alibaba Cloud KMS"

    def __init__(
        self, source: SourceConfig, config: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        where = f"sources.{source.name}"
        opts = AlibabaOptions.of(source.options)
        env = os.environ if environ is None else environ
        self.name = source.name
        self.gateway_kind = opts.gateway
        self.ca_file = opts.ca_file
        #: With a ClientKey (auth = "client_key"), the instance API (dkms-gcs) is used;
        #: without, RAM credentials and the OpenAPI (either gateway).
        self.client_key: ClientKey | None = None
        if opts.auth == "client_key":
            assert opts.client_key_file is not None  # AlibabaOptions.validate
            self.client_key = load_client_key(
                opts.client_key_file,
                password_file=opts.client_key_password_file,
                password_env=opts.client_key_password_env,
                environ=env,
                where=f"{where}.client_key_file",
            )
        endpoint = opts.endpoint
        default = None
        if opts.gateway == "dedicated":
            if opts.endpoints is None:
                endpoint = _dedicated_endpoint(endpoint, opts.instance_id, where)
            self.ca_file = _instance_ca(opts.ca_file, where)
        elif opts.region:
            prefix = "kms-vpc" if opts.network == "vpc" else "kms"
            default = f"https://{prefix}.{opts.region}.aliyuncs.com"
        self._endpoints(opts, where, "endpoint", endpoint, default)
        self.region = opts.region or "cn-hangzhou"
        self.account_id = str(opts.account_id)
        self._limits(opts)
        if self.client_key is not None:
            if opts.credentials:
                raise ConfigError(
                    f"{where}.credentials: a ClientKey source signs with its key, not with RAM "
                    'credentials; remove the table, or use auth = "ram"'
                )
            # The key id is all a ClientKey source's credentials are; its signer holds the key.
            held = Credentials(self.client_key.key_id, "", origin="client_key")

            async def key_id() -> Credentials:
                return held

            self.credential_type = "client_key"
            self.credentials = Refreshing(key_id, self.name)
            self.signer: Signer = dkms.ClientKeySigner(self.client_key.private_key)
        else:
            self.credential_type, fetch = alibaba_credentials.resolve(
                opts.credentials,
                env,
                region=self.region,
                network=opts.network,
                session=self._http,
                where=f"{where}.credentials",
            )
            self.credentials = Refreshing(fetch, self.name)
            self.signer = acs3.Acs3()

    # ------------------------------------------------------------------ calls

    async def _call(
        self,
        action: str,
        params: dict[str, str],
        name: str = "",
        parse: Callable[[Any, str], Any] | None = None,
    ) -> Any:
        request = acs3.rpc(action, API_VERSION, params)
        return await self._send(request, self._parser(name, parse), name=name)

    def _refuses(self, body: bytes) -> bool:
        """The OpenAPI can say ``Code`` in a 200 (older gateways did); that is a refusal."""
        if self.client_key is not None:
            return False
        answer = object_or_none(body)
        return answer is not None and "Code" in answer

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, name: str, creds: Credentials
    ) -> AgentError:
        if self.client_key is not None:
            return dkms_gcs.classify(status, body, endpoint=self._base().host, name=name)
        return super().classify(status, headers, body, name, creds)

    def _decoded(self, body: bytes) -> dkms_gcs.GetSecretValueResponse:
        try:
            return dkms_gcs.GetSecretValueResponse.decode(body)
        except dkms_gcs.MalformedMessage as exc:
            raise Unavailable(f"the KMS instance at {self._base().host} answered {exc}") from None

    def _own(self, answer: dict[str, Any]) -> bool:
        """The OpenAPI refuses with a ``Code``."""
        return "Code" in answer

    def _judge(
        self, status: int, body: dict[str, Any], name: str, creds: Credentials
    ) -> AgentError:
        code = str(body.get("Code", f"HTTP{status}"))
        message = str(body.get("Message", ""))[:300]
        request_id = body.get("RequestId", "")
        said = f"Alibaba Cloud KMS: {code}" + (f" (request {request_id})" if request_id else "")
        secret_arn = f"acs:kms:{self.region}:{self.account_id}:secret/{name}"
        if code.startswith(alibaba_credentials.STALE_CODES) and creds.security_token:
            return StaleCredentials(f"{said}: temporary credentials no longer accepted")
        kind = dkms_gcs.error_kind(status, code, message)  # the rule of both gateways
        if kind is SecretNotFound:
            return SecretNotFound(
                f"{said}: secret {name!r} does not exist in {self.region}",
                hint="check the name (default secrets carry their product prefix, like aigw!...) "
                "and that the source's region is the secret's region",
            )
        if kind is DecryptDenied:
            key = body.get("KeyId") or "the secret's customer managed key"
            return DecryptDenied(
                f"{said}: the identity may read the secret but not decrypt it with {key}",
                hint="step 2 of the troubleshooting order: a secret encrypted under a customer "
                "managed key also needs kms:Decrypt on that key. Grant: "
                + policy_statement("kms:Decrypt", f"acs:kms:{self.region}:{self.account_id}:key/*"),
            )
        if kind is AccessDenied:
            return AccessDenied(
                f"{said}: the identity ({creds.origin}) may not read secret {name!r}",
                hint="step 1 of the troubleshooting order: grant the RAM identity "
                "kms:GetSecretValue on the secret. Grant: "
                + policy_statement("kms:GetSecretValue", secret_arn),
            )
        if kind is PendingDeletion:
            return PendingDeletion(
                f"{said}: secret {name!r} is scheduled for deletion",
                hint="step 3 of the troubleshooting order: restore it with RestoreSecret within "
                "its recovery window, or read another secret",
            )
        if kind is Throttled:
            limit = (
                f"the shared gateway allows {SHARED_GATEWAY_QPS:g} GetSecretValue QPS per "
                "account, shared by every client"
                if self.gateway_kind == "shared"
                else "the KMS instance's QPS is what was bought, shared by every client"
            )
            return Throttled(
                f"{said}: throttled", hint=f"{limit}; lower rate_limit_qps or raise cache.ttl"
            )
        if kind is BadCredentials:
            return BadCredentials(
                f"{said}: the request's credentials or signature were refused",
                hint="check the AccessKey (or the role the agent assumes) and the host's clock",
            )
        if kind is Unavailable:
            return Unavailable(f"{said}: the service failed")
        return InvalidUpstreamRequest(f"{said}: {message or 'request refused'}")

    # ------------------------------------------------------------------ interface

    async def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        if self.client_key is not None:
            return await self._get_with_client_key(name, version_id, version_stage)
        params = {"SecretName": name}
        if version_id:
            params["VersionId"] = version_id
        if version_stage or not version_id:
            stage = canonical_stage(version_stage, self.stages, by_id=True)
            params["VersionStage"] = stage or self.stages.current
        record: SecretRecord = await self._call("GetSecretValue", params, name, self._version)
        return record

    def _version(self, body: Any, name: str) -> SecretRecord:
        """The version in a GetSecretValue answer (read inside the attempt: a wrong-shaped
        200 fails it, and is retried elsewhere)."""
        with self._reading():
            return self._record(
                body.get("SecretName", name),
                body["SecretData"],
                binary=body.get("SecretDataType") == "binary",
                version_id=body["VersionId"],
                stages=body.get("VersionStages", {}).get("VersionStage", []),
                created=body.get("CreateTime"),
                secret_type=body.get("SecretType"),
                extra={"request_id": body.get("RequestId", "")},
            )

    async def _get_with_client_key(
        self, name: str, version_id: str | None, version_stage: str | None
    ) -> SecretRecord:
        """GetSecretValue through the instance API (dkms-gcs), signed with the ClientKey."""
        assert self.client_key is not None
        stage = ""
        if version_stage or not version_id:
            stage = canonical_stage(version_stage, self.stages, by_id=True) or self.stages.current
        request = dkms_gcs.GetSecretValueRequest(
            secret_name=name, version_stage=stage, version_id=version_id or ""
        )

        def parse(raw: bytes) -> SecretRecord:
            return self._instance_version(self._decoded(raw), name)

        return await self._send(dkms.request("GetSecretValue", request.encode()), parse, name=name)

    def _instance_version(self, got: dkms_gcs.GetSecretValueResponse, name: str) -> SecretRecord:
        """The version in a GetSecretValue answer (read inside the attempt: a wrong-shaped
        200 fails it, and is retried elsewhere)."""
        with self._reading():
            return self._record(
                got.secret_name or name,
                got.secret_data,
                binary=got.secret_data_type == "binary",  # noqa: S105 (a data type)
                version_id=got.version_id,
                stages=got.version_stages,
                created=got.create_time,
                secret_type=got.secret_type,
                extra={"request_id": got.request_id},
            )

    async def describe(self, name: str) -> SecretMetadata:
        self._ram_only("DescribeSecret")
        body = await self._call("DescribeSecret", {"SecretName": name}, name)
        extra = {
            k: str(body[k])
            for k in ("Arn", "EncryptionKeyId", "OwingService", "PlannedDeleteTime")
            if body.get(k)
        }
        return SecretMetadata(
            name=name,
            source=self.name,
            created=answer_time(body.get("CreateTime")),
            versions=(),
            secret_type=str(body.get("SecretType", "Generic")),
            extra=extra,
        )

    def _ram_only(self, action: str) -> None:
        if self.client_key is not None:
            raise InvalidUpstreamRequest(
                f"{action} is not in the KMS instance API a ClientKey reaches (GetSecretValue "
                "only)",
                hint='use auth = "ram" (the OpenAPI on the dedicated gateway) to list and describe',
            )

    async def list_names(self, prefix: str) -> list[str]:
        self._ram_only("ListSecrets")
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
        still proves both (the identity may only read specific secrets); with a ClientKey,
        a read of a name no secret has (its not-found proves the key and the network)."""
        if self.client_key is not None:
            with contextlib.suppress(SecretNotFound, AccessDenied):
                await self._get_with_client_key(CHECK_NAME, None, None)
            return
        try:
            await self._call("ListSecrets", {"PageNumber": "1", "PageSize": "1"})
        except AccessDenied:
            return


def _dedicated_endpoint(endpoint: str | None, instance_id: str | None, where: str) -> str:
    """The instance's gateway URL: ``endpoint`` as given, else from ``instance_id``."""
    if endpoint:
        return endpoint
    if not instance_id or not re.fullmatch(r"kst-[a-z0-9]{3,}[a-z0-9.]*", instance_id):
        raise ConfigError(
            f"{where}.instance_id: give the KMS instance's id (like 'kst-hzz62ee817bvyyr5x9c'), "
            "or the endpoint '<instance>.cryptoservice.kms.aliyuncs.com'"
        )
    return "https://" + DEDICATED_HOST.format(instance_id=instance_id)


def _instance_ca(ca_file: str | None, where: str) -> str:
    """The instance CA, which the dedicated gateway's certificate chains to: required, and
    loadable now (a start-up error, not a first-request surprise)."""
    if not ca_file:
        raise ConfigError(
            f"{where}.ca_file: the dedicated gateway needs the KMS instance's CA certificate",
            hint="download it from the KMS console (the instance's details page) and give its "
            "path; TLS to the instance is always verified against it",
        )
    try:
        ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.ca_file: {ca_file!r} cannot be loaded as a CA certificate "
            f"({type(exc).__name__})",
            hint="give the PEM file of the instance CA from the KMS console",
        ) from None
    return ca_file
