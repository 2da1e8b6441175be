"""A wire-faithful Alibaba Cloud KMS emulator (shared gateway, API 2016-01-20), with STS
AssumeRoleWithOIDC and the ECS instance metadata service, for tests and local development.

It verifies requests the way KMS does — ACS3-HMAC-SHA256 and the older RPC HMAC-SHA1
signature, the ±15 minute timestamp window, nonce replay, STS tokens — evaluates RAM-style
identity policies per access key, and answers in the real JSON shapes and error codes.
Its canonicalization is written here independently of the agent's signer, and the tests
check it against requests signed by Alibaba's own SDKs.

Modelled, not confirmed by a public source (see shared/PROTOCOLS.md), and flagged:
GetSecretValue on a secret pending deletion answers ``Rejected.ResourceInDeleteWindow``
(409); a secret under a customer managed key without ``kms:Decrypt`` answers
``Forbidden.NoPermission`` naming ``kms:Decrypt`` and the key; ListSecrets lists the secrets
whose ARN the identity may ``kms:ListSecrets`` on.

Run standalone: ``python -m tests.emulators.alibaba_kms --port 8443`` prints an AccessKey
and serves two demo secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import fnmatch
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

TIME_WINDOW = 15 * 60
GET_SECRET_VALUE_QPS = 450


def rfc3986(text: str) -> str:
    return quote(text, safe="~")


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class KmsError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(code)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass
class Version:
    id: str
    data: bytes
    data_type: str
    stages: set[str]
    created: float


@dataclass
class Secret:
    name: str
    versions: list[Version]
    created: float
    product: str | None = None  # a default secret, owned by this cloud product
    key_id: str | None = None  # a customer managed key (paid mode); None = service key
    state: str = "Normal"
    planned_delete: float | None = None
    secret_type: str = "Generic"


@dataclass
class Identity:
    access_key_id: str
    secret: str
    policy: dict[str, Any]
    principal: str
    security_token: str | None = None
    expires: float | None = None


@dataclass
class Role:
    arn: str
    policy: dict[str, Any]
    provider_arn: str
    subject: str


@dataclass
class Faults:
    """Knobs for reliability tests; each answer consumes one entry of ``next``."""

    latency: float = 0.0
    next: deque[str] = field(default_factory=deque)  # "500", "503", "reset", "garbage", "throttle", "hang"


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def allowed(policy: dict[str, Any], action: str, resource: str) -> bool:
    """RAM evaluation: an explicit Deny wins, then any Allow, else deny. Action and Resource
    are globs; a Resource without ``acs:`` matches the part after ``<account>:``."""

    def matches(stmt: dict[str, Any]) -> bool:
        acts = _as_list(stmt.get("Action", []))
        res = _as_list(stmt.get("Resource", []))
        short = resource.split(":", 4)[-1] if resource.startswith("acs:") else resource
        act_ok = any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in acts)
        res_ok = any(
            fnmatch.fnmatchcase(resource if r.startswith("acs:") or r == "*" else short, r)
            for r in res
        )
        return act_ok and res_ok

    statements = policy.get("Statement", [])
    if any(s.get("Effect") == "Deny" and matches(s) for s in statements):
        return False
    return any(s.get("Effect") == "Allow" and matches(s) for s in statements)


class KmsEmulator:
    def __init__(
        self,
        *,
        region: str = "cn-hangzhou",
        account_id: str = "1234567890123456",
        qps: int = GET_SECRET_VALUE_QPS,
        clock: Any = time.time,
    ) -> None:
        self.region, self.account_id, self.qps, self.clock = region, account_id, qps, clock
        self.identities: dict[str, Identity] = {}
        self.roles: dict[str, Role] = {}
        self.oidc_tokens: dict[str, tuple[str, str]] = {}  # token -> (provider arn, subject)
        self.secrets: dict[str, Secret] = {}
        self.ecs_role: tuple[str, dict[str, Any]] | None = None
        self.temp_duration: float | None = None  # override STS/ECS credential lifetime
        self.faults = Faults()
        self.nonces: dict[str, float] = {}
        self.metadata_tokens: set[str] = set()
        self.calls: list[tuple[float, str, str]] = []  # (time, action, access key) accepted
        self.rejections: list[str] = []  # codes of every refused request
        #: Every request to / as received: (method, raw path and query, headers, body).
        self.recorded: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.sts_calls = 0
        self.metadata_calls = 0
        self._window: dict[str, deque[float]] = {}

    # ------------------------------------------------------------------ set-up (not KMS APIs)

    def arn(self, name: str) -> str:
        return f"acs:kms:{self.region}:{self.account_id}:secret/{name}"

    def add_access_key(self, policy: dict[str, Any], principal: str = "user/app") -> tuple[str, str]:
        ak = "LTAI" + secrets.token_hex(8)
        sk = secrets.token_urlsafe(24)
        self.identities[ak] = Identity(ak, sk, policy, principal)
        return ak, sk

    def add_secret(
        self,
        name: str,
        value: str | bytes,
        *,
        product: str | None = None,
        key_id: str | None = None,
        data_type: str = "text",
    ) -> Version:
        now = self.clock()
        data = value.encode() if isinstance(value, str) else value
        version = Version(uuid.uuid4().hex, data, data_type, {"ACSCurrent"}, now)
        self.secrets[name] = Secret(name, [version], now, product=product, key_id=key_id)
        return version

    def put_version(self, name: str, value: str) -> Version:
        secret = self.secrets[name]
        for v in secret.versions:
            v.stages.discard("ACSPrevious")
            if "ACSCurrent" in v.stages:
                v.stages.discard("ACSCurrent")
                v.stages.add("ACSPrevious")
        version = Version(uuid.uuid4().hex, value.encode(), "text", {"ACSCurrent"}, self.clock())
        secret.versions.append(version)
        return version

    def schedule_deletion(self, name: str, days: int = 7) -> None:
        secret = self.secrets[name]
        secret.state = "PendingDelete"
        secret.planned_delete = self.clock() + days * 86400

    def add_role(self, arn: str, policy: dict[str, Any], provider_arn: str, subject: str) -> None:
        self.roles[arn] = Role(arn, policy, provider_arn, subject)

    def issue_oidc_token(self, provider_arn: str, subject: str) -> str:
        token = "eyJ" + secrets.token_urlsafe(48)
        self.oidc_tokens[token] = (provider_arn, subject)
        return token

    def expire_temporary_credentials(self) -> int:
        """Make every STS credential issued so far expired (as if time passed)."""
        n = 0
        for identity in self.identities.values():
            if identity.security_token is not None:
                identity.expires = self.clock() - 1
                n += 1
        return n

    def max_calls_in_window(self, action: str = "GetSecretValue", window: float = 1.0) -> int:
        """The most accepted calls of ``action`` seen in any ``window`` seconds."""
        times = sorted(t for t, a, _ in self.calls if a == action)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def _temporary(self, policy: dict[str, Any], principal: str, duration: float) -> Identity:
        ak = "STS." + secrets.token_hex(10)
        ident = Identity(
            ak, secrets.token_urlsafe(24), policy, principal,
            security_token="CAIS" + secrets.token_urlsafe(40),
            expires=self.clock() + (self.temp_duration or duration),
        )  # fmt: skip
        self.identities[ak] = ident
        return ident

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/", self._root)
        app.router.add_put("/latest/api/token", self._metadata_token)
        app.router.add_get("/latest/meta-data/ram/security-credentials/", self._metadata_role)
        app.router.add_get("/latest/meta-data/ram/security-credentials/{role}", self._metadata_creds)
        return app

    def _reply(self, status: int, body: dict[str, Any]) -> web.Response:
        return web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json"
        )

    def _error(self, exc: KmsError, request_id: str) -> web.Response:
        self.rejections.append(exc.code)
        body = {"HttpStatus": exc.status, "Code": exc.code, "Message": exc.message,
                "RequestId": request_id, **exc.extra}  # fmt: skip
        return self._reply(exc.status, body)

    async def _faults(self, request: web.Request) -> web.StreamResponse | None:
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        if not self.faults.next:
            return None
        fault = self.faults.next.popleft()
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault == "hang":
            await asyncio.Event().wait()
        if fault == "garbage":
            return web.Response(status=200, body=b"<html>upstream proxy error", content_type="text/html")
        if fault == "throttle":
            return self._error(KmsError(429, "Rejected.Throttling", "Request was denied due to request throttling."), "x")
        code = "ServiceUnavailableTemporary" if fault == "503" else "InternalFailure"
        return self._error(KmsError(int(fault), code, "The request processing has failed."), "x")

    async def _root(self, request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4()).upper()
        faulted = await self._faults(request)
        if faulted is not None:
            return faulted
        body = await request.read()
        self.recorded.append((request.method, request.rel_url.raw_path_qs, list(request.headers.items()), body))
        query = dict(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        try:
            if query.get("Action") == "AssumeRoleWithOIDC":
                return self._assume_role_with_oidc(query, request_id)
            params = dict(query)
            if request.content_type == "application/x-www-form-urlencoded" and body:
                params.update(parse_qsl(body.decode(), keep_blank_values=True))
            auth = request.headers.get("Authorization", "")
            if auth.startswith("ACS3-HMAC-SHA256 "):
                identity, action = self._verify_acs3(request, auth, query, body)
            elif "Signature" in params:
                identity, action = self._verify_rpc_v1(request.method, params)
            else:
                raise KmsError(400, "MissingParameter", "The input parameter Signature that is mandatory for processing this request is not supplied.")
            return self._dispatch(identity, action, params, request_id)
        except KmsError as exc:
            return self._error(exc, request_id)

    # ------------------------------------------------------------------ signatures

    def _identity(self, ak: str, token: str | None) -> Identity:
        identity = self.identities.get(ak)
        if identity is None or (identity.expires is not None and self.clock() >= identity.expires):
            raise KmsError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        if identity.security_token is not None and not (
            token and hmac.compare_digest(token, identity.security_token)
        ):
            raise KmsError(400, "InvalidSecurityToken.MismatchWithAccessKey", "The security token does not match the access key.")
        return identity

    def _check_time_and_nonce(self, stamp: str, nonce: str) -> None:
        try:
            when = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            raise KmsError(400, "IllegalTimestamp", f"The input parameter Timestamp {stamp!r} is not in ISO 8601 UTC.") from None
        now = self.clock()
        if abs(now - when) > TIME_WINDOW:
            raise KmsError(400, "IllegalTimestamp", "The request timestamp is outside the 15 minute window.")
        for old in [n for n, t in self.nonces.items() if now - t > 2 * TIME_WINDOW]:
            del self.nonces[old]
        if not nonce or nonce in self.nonces:
            raise KmsError(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
        self.nonces[nonce] = now

    def _verify_acs3(
        self, request: web.Request, auth: str, query: dict[str, str], body: bytes
    ) -> tuple[Identity, str]:
        try:
            fields = dict(part.split("=", 1) for part in auth[len("ACS3-HMAC-SHA256 ") :].split(","))
            ak, signed, given = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
        except (ValueError, KeyError):
            raise KmsError(400, "IncompleteSignature", "The Authorization header is malformed.") from None
        names = signed.split(";")
        for required in ("host", "x-acs-action", "x-acs-version", "x-acs-date",
                         "x-acs-signature-nonce", "x-acs-content-sha256"):  # fmt: skip
            if required not in names:
                raise KmsError(400, "IncompleteSignature", f"The header {required} must be signed.")
        if names != sorted(names):
            raise KmsError(400, "IncompleteSignature", "SignedHeaders must be sorted.")
        headers = request.headers
        if headers.get("x-acs-content-sha256") != hashlib.sha256(body).hexdigest():
            raise KmsError(400, "IncompleteSignature", "x-acs-content-sha256 does not match the body.")
        canonical_query = "&".join(f"{rfc3986(k)}={rfc3986(v)}" for k, v in sorted(query.items()))
        canonical_headers = "".join(
            f"{n}:{','.join(sorted(v.strip() for v in headers.getall(n, [])))}\n" for n in names
        )
        canonical = "\n".join(
            [request.method, request.rel_url.raw_path or "/", canonical_query, canonical_headers,
             signed, headers["x-acs-content-sha256"]]
        )  # fmt: skip
        to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
        identity = self._identity(ak, headers.get("x-acs-security-token"))
        expected = hmac.new(identity.secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given):
            raise KmsError(400, "SignatureDoesNotMatch", f"Specified signature is not matched with our calculation. server string to sign is:{to_sign}")
        self._check_time_and_nonce(headers["x-acs-date"], headers["x-acs-signature-nonce"])
        if headers.get("x-acs-version") != "2016-01-20":
            raise KmsError(400, "InvalidVersion", "Specified parameter Version is not valid.")
        return identity, headers["x-acs-action"]

    def _verify_rpc_v1(self, method: str, params: dict[str, str]) -> tuple[Identity, str]:
        for required in ("AccessKeyId", "SignatureMethod", "SignatureVersion", "SignatureNonce",
                         "Timestamp", "Action", "Version"):  # fmt: skip
            if required not in params:
                raise KmsError(400, "MissingParameter", f"The input parameter {required} that is mandatory for processing this request is not supplied.")
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            raise KmsError(400, "InvalidParameter", "Only HMAC-SHA1 signature version 1.0 is served here.")
        unsigned = {k: v for k, v in params.items() if k != "Signature"}
        canonical = "&".join(f"{rfc3986(k)}={rfc3986(v)}" for k, v in sorted(unsigned.items()))
        to_sign = f"{method}&{rfc3986('/')}&{rfc3986(canonical)}"
        identity = self._identity(params["AccessKeyId"], params.get("SecurityToken"))
        digest = hmac.new(f"{identity.secret}&".encode(), to_sign.encode(), hashlib.sha1).digest()
        if not hmac.compare_digest(base64.b64encode(digest).decode(), params["Signature"]):
            raise KmsError(400, "SignatureDoesNotMatch", f"Specified signature is not matched with our calculation. server string to sign is:{to_sign}")
        self._check_time_and_nonce(params["Timestamp"], params["SignatureNonce"])
        if params["Version"] != "2016-01-20":
            raise KmsError(400, "InvalidVersion", "Specified parameter Version is not valid.")
        return identity, params["Action"]

    # ------------------------------------------------------------------ KMS actions

    def _dispatch(
        self, identity: Identity, action: str, params: dict[str, str], request_id: str
    ) -> web.Response:
        handler = {
            "GetSecretValue": self._get_secret_value,
            "DescribeSecret": self._describe_secret,
            "ListSecrets": self._list_secrets,
        }.get(action)
        if handler is None:
            raise KmsError(400, "InvalidAction.NotFound", f"Specified api {action} is not found.")
        self.calls.append((self.clock(), action, identity.access_key_id))  # arrivals
        body = handler(identity, params)
        return self._reply(200, {**body, "RequestId": request_id})

    def _secret_for(self, identity: Identity, action: str, params: dict[str, str]) -> Secret:
        name = params.get("SecretName", "")
        if not name:
            raise KmsError(400, "MissingParameter", "The input parameter SecretName that is mandatory for processing this request is not supplied.")
        if name.startswith("acs:kms:"):
            name = name.split(":secret/", 1)[-1]
        if not allowed(identity.policy, f"kms:{action}", self.arn(name)):
            raise KmsError(403, "Forbidden.NoPermission", f"This operation for {self.arn(name)} is forbidden by permission system.")
        secret = self.secrets.get(name)
        if secret is None:
            raise KmsError(404, "Forbidden.ResourceNotFound", "The resource is not found.")
        return secret

    def _throttle(self, identity: Identity) -> None:
        account = identity.principal.split("/")[0] + self.account_id
        window = self._window.setdefault(account, deque())
        now = self.clock()
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.qps:
            raise KmsError(429, "Rejected.Throttling", "Request was denied due to request throttling.")
        window.append(now)

    def _get_secret_value(self, identity: Identity, params: dict[str, str]) -> dict[str, Any]:
        self._throttle(identity)
        secret = self._secret_for(identity, "GetSecretValue", params)
        if secret.key_id is not None:
            key_arn = f"acs:kms:{self.region}:{self.account_id}:key/{secret.key_id}"
            if not allowed(identity.policy, "kms:Decrypt", key_arn):
                raise KmsError(403, "Forbidden.NoPermission", f"This operation (kms:Decrypt) for {key_arn} is forbidden by permission system.", KeyId=secret.key_id)
        if secret.state == "PendingDelete":
            raise KmsError(409, "Rejected.ResourceInDeleteWindow", "The resource is planned to be deleted.")
        version_id, stage = params.get("VersionId"), params.get("VersionStage")
        if not version_id and not stage:
            stage = "ACSCurrent"
        for v in secret.versions:
            if (not version_id or v.id == version_id) and (not stage or stage in v.stages):
                data = base64.b64encode(v.data).decode() if v.data_type == "binary" else v.data.decode()
                return {
                    "SecretName": secret.name, "VersionId": v.id, "SecretData": data,
                    "SecretDataType": v.data_type,
                    "VersionStages": {"VersionStage": sorted(v.stages)},
                    "CreateTime": iso(v.created), "SecretType": secret.secret_type,
                }  # fmt: skip
        raise KmsError(404, "Forbidden.ResourceNotFound", "The specified secret version is not found.")

    def _describe_secret(self, identity: Identity, params: dict[str, str]) -> dict[str, Any]:
        secret = self._secret_for(identity, "DescribeSecret", params)
        body = {
            "Arn": self.arn(secret.name), "SecretName": secret.name,
            "EncryptionKeyId": secret.key_id or "", "CreateTime": iso(secret.created),
            "UpdateTime": iso(secret.versions[-1].created), "SecretType": secret.secret_type,
        }  # fmt: skip
        if secret.product:
            body["OwingService"] = secret.product
        if secret.planned_delete:
            body["PlannedDeleteTime"] = iso(secret.planned_delete)
        return body

    def _list_secrets(self, identity: Identity, params: dict[str, str]) -> dict[str, Any]:
        prefixes: list[str] = []
        if params.get("Filters"):
            try:
                for f in json.loads(params["Filters"]):
                    if f["Key"] == "SecretName":
                        prefixes += f["Values"]
            except (ValueError, KeyError, TypeError):
                raise KmsError(400, "InvalidParameter", "Specified parameter Filters is not valid.") from None
        try:
            page, size = int(params.get("PageNumber", "1")), int(params.get("PageSize", "10"))
        except ValueError:
            raise KmsError(400, "InvalidParameter", "PageNumber and PageSize must be integers.") from None
        if not 1 <= size <= 100 or page < 1:
            raise KmsError(400, "InvalidParameter", "PageSize must be 1-100.")
        visible = [
            s for name, s in sorted(self.secrets.items())
            if allowed(identity.policy, "kms:ListSecrets", self.arn(name))
            and (not prefixes or any(name.startswith(p) for p in prefixes))
        ]  # fmt: skip
        may_list = allowed(identity.policy, "kms:ListSecrets", self.arn("*")) or any(
            allowed(identity.policy, "kms:ListSecrets", self.arn(n)) for n in self.secrets
        )
        if not may_list:
            raise KmsError(403, "Forbidden.NoPermission", "This operation for kms:ListSecrets is forbidden by permission system.")
        chunk = visible[(page - 1) * size : page * size]
        return {
            "PageNumber": page, "PageSize": size, "TotalCount": len(visible),
            "SecretList": {"Secret": [
                {"SecretName": s.name, "CreateTime": iso(s.created), "SecretType": s.secret_type}
                for s in chunk
            ]},
        }  # fmt: skip

    # ------------------------------------------------------------------ STS and metadata

    def _assume_role_with_oidc(self, query: dict[str, str], request_id: str) -> web.Response:
        self.sts_calls += 1
        role = self.roles.get(query.get("RoleArn", ""))
        token = self.oidc_tokens.get(query.get("OIDCToken", ""))
        if token is None:
            raise KmsError(400, "AuthenticationFail.OIDCToken.Invalid", "The OIDC token is invalid.")
        if role is None or token != (role.provider_arn, role.subject) or query.get("OIDCProviderArn") != role.provider_arn:
            raise KmsError(403, "AuthenticationFail.NoPermission", "The role's trust policy does not allow this token.")
        duration = float(query.get("DurationSeconds", "3600"))
        ident = self._temporary(role.policy, f"assumed-role/{role.arn.rsplit('/', 1)[-1]}", duration)
        return self._reply(200, {"RequestId": request_id, "Credentials": {
            "AccessKeyId": ident.access_key_id, "AccessKeySecret": ident.secret,
            "SecurityToken": ident.security_token, "Expiration": iso(ident.expires or 0),
        }, "AssumedRoleUser": {"Arn": role.arn}})  # fmt: skip

    async def _metadata_token(self, request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aliyun-ecs-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400, text="ttl seconds 1-21600 required")
        token = secrets.token_urlsafe(32)
        self.metadata_tokens.add(token)
        return web.Response(text=token)

    def _metadata_auth(self, request: web.Request) -> None:
        if request.headers.get("X-aliyun-ecs-metadata-token") not in self.metadata_tokens:
            raise web.HTTPUnauthorized(text="metadata token required")

    async def _metadata_role(self, request: web.Request) -> web.Response:
        self._metadata_auth(request)
        if self.ecs_role is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.ecs_role[0])

    async def _metadata_creds(self, request: web.Request) -> web.Response:
        self._metadata_auth(request)
        self.metadata_calls += 1
        if self.ecs_role is None or request.match_info["role"] != self.ecs_role[0]:
            raise web.HTTPNotFound()
        ident = self._temporary(self.ecs_role[1], f"ecs-role/{self.ecs_role[0]}", 6 * 3600)
        return web.json_response({
            "AccessKeyId": ident.access_key_id, "AccessKeySecret": ident.secret,
            "SecurityToken": ident.security_token, "Expiration": iso(ident.expires or 0),
            "LastUpdated": iso(self.clock()), "Code": "Success",
        })  # fmt: skip


def main() -> None:  # pragma: no cover - for local development
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--qps", type=int, default=GET_SECRET_VALUE_QPS,
                        help="GetSecretValue quota (the real one by default; the bench raises it)")
    parser.add_argument("--secrets", type=int, default=0, help="also create bench/s0..N-1")
    args = parser.parse_args()
    emulator = KmsEmulator(qps=args.qps)
    for i in range(args.secrets):
        emulator.add_secret(f"bench/s{i}", "x" * 120)
    ak, sk = emulator.add_access_key(
        {"Statement": [{"Effect": "Allow", "Action": ["kms:GetSecretValue", "kms:List*", "kms:DescribeSecret"], "Resource": ["*"]}]}
    )
    emulator.add_secret("aigw!secret-abc", "demo-value", product="aigw")
    emulator.add_secret("db-password", "hunter2")
    print(f"ALIBABA_CLOUD_ACCESS_KEY_ID={ak}\nALIBABA_CLOUD_ACCESS_KEY_SECRET={sk}")
    print(f'endpoint = "http://127.0.0.1:{args.port}"', flush=True)
    web.run_app(emulator.app(), host="127.0.0.1", port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
