"""The ``aws`` provider: AWS Secrets Manager over the JSON 1.1 protocol, signed with SigV4."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from kms_agent.config import Config, SourceConfig
from kms_agent.credentials import Credentials, Refreshing, StaleCredentials
from kms_agent.credentials import aws as aws_credentials
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    BadCredentials,
    ConfigError,
    DecryptDenied,
    InvalidUpstreamRequest,
    PendingDeletion,
    RoleNotAllowed,
    SecretNotFound,
    Throttled,
    Unavailable,
)
from kms_agent.model import (
    AWS_NAMES,
    AWS_STAGES,
    SecretMetadata,
    SecretRecord,
    canonical_stage,
)
from kms_agent.providers._cloud import CloudProvider
from kms_agent.providers.options import AwsOptions
from kms_agent.signing import Request
from kms_agent.signing.aws import SigV4
from kms_agent.upstream import answer_time, object_or_none

SERVICE = "secretsmanager"
TARGET = "secretsmanager"
_HEADERS = {"Content-Type": "application/x-amz-json-1.1"}
_CREDENTIAL_ERRORS = (
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignature",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
)


class Provider(CloudProvider):
    kind = "aws"
    name_rule = AWS_NAMES
    stages = AWS_STAGES
    service = "AWS Secrets Manager"

    def __init__(
        self, source: SourceConfig, config: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        where = f"sources.{source.name}"
        env = os.environ if environ is None else environ
        opts = AwsOptions.of(source.options)
        self.name = source.name
        region = opts.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not region:
            raise ConfigError(f"{where}.region: required (or $AWS_REGION)")
        self.region: str = region
        endpoint = opts.endpoint or env.get("AWS_ENDPOINT_URL_SECRETSMANAGER")
        self._endpoints(
            opts, where, "endpoint", endpoint, f"https://secretsmanager.{self.region}.amazonaws.com"
        )
        self._limits(opts)
        self.assume_roles = frozenset(opts.assume_roles)
        self._environ = env
        #: The credentials of each role a caller asked for, assumed with the source's own.
        self._as_roles: dict[str, Refreshing] = {}
        self.credential_type, fetch = aws_credentials.resolve(
            opts.credentials,
            env,
            region=self.region,
            session=self._http,
            where=f"{where}.credentials",
        )
        self.credentials = Refreshing(fetch, self.name)
        self.signer = SigV4(self.region, SERVICE)

    async def _call(
        self,
        action: str,
        payload: dict[str, Any],
        name: str = "",
        held: Refreshing | None = None,
        parse: Callable[[Any, str], Any] | None = None,
    ) -> Any:
        """One API call, signed with ``held`` (a role's credentials), else the source's;
        its JSON answer, or ``parse(answer, name)`` of it (read inside the attempt)."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        request = Request(
            "POST", "/", headers={**_HEADERS, "X-Amz-Target": f"{TARGET}.{action}"}, body=body
        )
        return await self._send(request, self._parser(name, parse), name=name, held=held)

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, name: str, creds: Credentials
    ) -> AgentError:
        """The error for Secrets Manager's answer, remembering its status and type (the AWS
        agent's dialect passes them through)."""
        said = _error_body(body, headers)
        if said is None:
            return self._foreign(status)
        err = self._classify(status, said, name, creds)
        err.upstream(status, said["code"], said["message"][:1000] or None)
        return err

    def _classify(
        self, status: int, body: dict[str, str], name: str, creds: Credentials
    ) -> AgentError:
        code, message = body.get("code", f"HTTP{status}"), body.get("message", "")[:300]
        said = f"AWS Secrets Manager: {code}"
        if code == "ResourceNotFoundException":
            return SecretNotFound(
                f"{said}: secret {name!r} not found in {self.region}",
                hint="check the name or ARN and the source's region",
            )
        if code == "InvalidRequestException" and "delet" in message.lower():
            return PendingDeletion(
                f"{said}: secret {name!r} is marked for deletion",
                hint="restore it with RestoreSecret, or read another secret",
            )
        if code == "DecryptionFailure" or (
            code == "AccessDeniedException" and "kms:Decrypt" in message
        ):
            return DecryptDenied(
                f"{said}: the secret's KMS key does not allow Decrypt",
                hint="allow kms:Decrypt on the secret's KMS key for this role "
                "(key policy and IAM policy)",
            )
        if code == "AccessDeniedException":
            return AccessDenied(
                f"{said}: the identity may not read secret {name!r}",
                hint="allow secretsmanager:GetSecretValue on the secret's ARN: "
                + json.dumps(
                    {
                        "Effect": "Allow",
                        "Action": "secretsmanager:GetSecretValue",
                        "Resource": f"arn:aws:secretsmanager:{self.region}:*:secret:{name}-*",
                    }
                ),
            )
        if code in ("ThrottlingException", "TooManyRequestsException") or status == 429:
            return Throttled(f"{said}: throttled", hint="lower rate_limit_qps or raise cache.ttl")
        if code in ("ExpiredTokenException", "ExpiredToken") and creds.expiration is not None:
            return StaleCredentials(f"{said}: temporary credentials expired")
        if code in _CREDENTIAL_ERRORS or status in (401, 403):
            return BadCredentials(
                f"{said}: the credentials or signature were refused",
                hint="check the credentials the agent uses and the host's clock",
            )
        if status >= 500:
            return Unavailable(f"{said}: the service failed")
        return InvalidUpstreamRequest(f"{said}: {message or 'request refused'}")

    async def get_as(
        self,
        role_arn: str,
        name: str,
        *,
        version_id: str | None = None,
        version_stage: str | None = None,
    ) -> SecretRecord:
        """:meth:`get` as ``role_arn`` (one of ``assume_roles``), its credentials assumed
        with the source's own and kept until near their expiry."""
        if role_arn not in self.assume_roles:
            raise RoleNotAllowed(f"{role_arn[:200]} is not in sources.{self.name}.assume_roles")
        held = self._as_roles.get(role_arn)
        if held is None:
            fetch = aws_credentials.as_role(
                self.credentials, role_arn, environ=self._environ, region=self.region,
                session=self._http, where=f"sources.{self.name}.assume_roles",
            )  # fmt: skip
            held = self._as_roles[role_arn] = Refreshing(fetch, f"{self.name} as {role_arn}")
        return await self.get(name, version_id=version_id, version_stage=version_stage, held=held)

    async def get(
        self,
        name: str,
        *,
        version_id: str | None = None,
        version_stage: str | None = None,
        held: Refreshing | None = None,
    ) -> SecretRecord:
        payload: dict[str, Any] = {"SecretId": name}
        if version_id:
            payload["VersionId"] = version_id
        stage = canonical_stage(version_stage, self.stages, by_id=True)
        if stage:
            payload["VersionStage"] = stage
        elif not version_id:
            payload["VersionStage"] = self.stages.current
        record: SecretRecord = await self._call(
            "GetSecretValue", payload, name, held, self._version
        )
        return record

    def _version(self, body: Any, name: str) -> SecretRecord:
        """The version in a GetSecretValue answer (read inside the attempt: a wrong-shaped
        200 fails it, and is retried elsewhere)."""
        with self._reading():
            binary = "SecretBinary" in body and "SecretString" not in body
            return self._record(
                body.get("Name", name),
                body["SecretBinary"] if binary else body["SecretString"],
                binary=binary,
                version_id=body["VersionId"],
                stages=body.get("VersionStages", []),
                created=body.get("CreatedDate"),
                extra={"arn": body.get("ARN", "")},
            )

    async def close(self) -> None:
        for held in self._as_roles.values():
            await held.close()
        await super().close()

    async def describe(self, name: str) -> SecretMetadata:
        body = await self._call("DescribeSecret", {"SecretId": name}, name)
        versions = tuple(
            (str(v), tuple(s)) for v, s in (body.get("VersionIdsToStages") or {}).items()
        )
        extra = {k: str(body[k]) for k in ("ARN", "KmsKeyId", "DeletedDate") if body.get(k)}
        return SecretMetadata(
            name=name,
            source=self.name,
            created=answer_time(body.get("CreatedDate")),
            versions=versions,
            extra=extra,
        )

    async def list_names(self, prefix: str) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            payload: dict[str, Any] = {"MaxResults": 100}
            if prefix:
                payload["Filters"] = [{"Key": "name", "Values": [prefix]}]
            if token:
                payload["NextToken"] = token
            body = await self._call("ListSecrets", payload)
            names += [
                str(s["Name"])
                for s in body.get("SecretList", [])
                if str(s.get("Name", "")).startswith(prefix)
            ]
            token = str(body.get("NextToken") or "")
            if not token:
                return sorted(names)

    async def check(self) -> None:
        try:
            await self._call("ListSecrets", {"MaxResults": 1})
        except AccessDenied:
            return


def _error_body(body: bytes, headers: Mapping[str, str]) -> dict[str, str] | None:
    """Secrets Manager's refusal: JSON 1.1 ``__type`` (else the ``x-amzn-ErrorType``
    header, which also comes with an empty body), or the XML moto and gateways send for
    auth failures; None when no code is found (not Secrets Manager's own refusal). Codes
    lose their namespace (``…#Code``) and URL suffix (``Code:http://…``)."""
    answer = object_or_none(body) or {}
    kind = str(answer.get("__type") or headers.get("x-amzn-ErrorType", ""))
    message = str(answer.get("message") or answer.get("Message") or "")
    if not kind:
        text = body.decode("utf-8", "replace")
        kind = aws_credentials.xml_text(text, "Code")
        message = aws_credentials.xml_text(text, "Message")
    code = kind.split(":", 1)[0].rsplit("#", 1)[-1]
    return {"code": code, "message": message} if code else None
