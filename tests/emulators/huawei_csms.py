"""A wire-faithful Huawei Cloud CSMS emulator (REST v1) with the ECS metadata service.

It verifies SDK-HMAC-SHA256 signatures the way the API gateway does (signed headers,
X-Sdk-Date within 15 minutes, body hash, security token of temporary credentials) with its
own canonicalization, checked against huaweicloudsdkcore in the tests. It models projects,
secrets with versions and stages, KMS keys — the default key ``csms/default`` is created on
first use and can be neither disabled nor deleted; a secret under a disabled key fails to
decrypt — secrets pending deletion, per-identity permissions, throttling, and faults.

Modelled, not confirmed by a public source, and flagged: a permission refusal is 403
``CSMS.0302``; throttling is 429 ``APIG.0308`` (the gateway's, as documented for other
services).

Run standalone: ``python -m tests.emulators.huawei_csms --port 8444``.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import hmac
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from aiohttp import web

TIME_WINDOW = 15 * 60
DEFAULT_KEY_ALIAS = "csms/default"


class CsmsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code)
        self.status, self.code, self.message = status, code, message


@dataclass
class Key:
    id: str
    alias: str
    state: str = "enabled"  # enabled | disabled | pending_deletion


@dataclass
class Version:
    id: str
    value: bytes
    binary: bool
    stages: set[str]
    created_ms: int


@dataclass
class Secret:
    name: str
    key_id: str
    versions: list[Version]
    created_ms: int
    state: str = "ENABLED"  # ENABLED | DISABLED | PENDING_DELETE
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Identity:
    ak: str
    sk: str
    readable: list[str]  # secret name globs for csms:secret:getVersion
    may_list: bool = True
    security_token: str | None = None
    expires: float | None = None


class CsmsEmulator:
    def __init__(
        self,
        *,
        project_id: str = "0123456789abcdef0123456789abcdef",
        qps: int = 50,
        clock: Any = time.time,
    ) -> None:
        self.project_id, self.qps, self.clock = project_id, qps, clock
        self.keys: dict[str, Key] = {}
        self.secrets: dict[str, Secret] = {}
        self.identities: dict[str, Identity] = {}
        self.ecs_identity_readable: list[str] | None = None
        self.temp_duration = 3600.0
        self.faults: deque[str] = deque()
        self.recorded: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.rejections: list[str] = []
        self.calls: list[tuple[float, str]] = []
        self.metadata_calls = 0
        self.metadata_tokens: set[str] = set()
        self._window: deque[float] = deque()

    # ------------------------------------------------------------------ set-up

    def default_key(self) -> Key:
        """The service's default key, created on first use."""
        for key in self.keys.values():
            if key.alias == DEFAULT_KEY_ALIAS:
                return key
        key = Key(str(uuid.uuid4()), DEFAULT_KEY_ALIAS)
        self.keys[key.id] = key
        return key

    def add_key(self, alias: str) -> Key:
        key = Key(str(uuid.uuid4()), alias)
        self.keys[key.id] = key
        return key

    def set_key_state(self, key_id: str, state: str) -> None:
        key = self.keys[key_id]
        if key.alias == DEFAULT_KEY_ALIAS and state != "enabled":
            raise ValueError("the default key csms/default cannot be disabled or deleted")
        key.state = state

    def add_identity(self, readable: list[str], *, may_list: bool = True) -> tuple[str, str]:
        ak, sk = "HPUA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
        self.identities[ak] = Identity(ak, sk, readable, may_list)
        return ak, sk

    def add_temporary(self, readable: list[str], lifetime: float) -> Identity:
        ident = Identity("HST" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30), readable,
                         security_token="gQ" + secrets.token_urlsafe(60), expires=self.clock() + lifetime)  # fmt: skip
        self.identities[ident.ak] = ident
        return ident

    def expire_temporary(self) -> int:
        n = 0
        for ident in self.identities.values():
            if ident.security_token:
                ident.expires = self.clock() - 1
                n += 1
        return n

    def add_secret(self, name: str, value: str | bytes, *, key: Key | None = None) -> Version:
        key = key or self.default_key()
        data = value.encode() if isinstance(value, str) else value
        now = int(self.clock() * 1000)
        version = Version(
            f"v{uuid.uuid4().hex[:8]}", data, isinstance(value, bytes), {"SYSCURRENT"}, now
        )
        self.secrets[name] = Secret(name, key.id, [version], now)
        return version

    def put_version(self, name: str, value: str) -> Version:
        secret = self.secrets[name]
        for v in secret.versions:
            v.stages.discard("SYSPREVIOUS")
            if "SYSCURRENT" in v.stages:
                v.stages.discard("SYSCURRENT")
                v.stages.add("SYSPREVIOUS")
        version = Version(
            f"v{uuid.uuid4().hex[:8]}",
            value.encode(),
            False,
            {"SYSCURRENT"},
            int(self.clock() * 1000),
        )
        secret.versions.append(version)
        return version

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/{project}/secrets", self._list)
        app.router.add_get("/v1/{project}/secrets/{name}", self._show)
        app.router.add_get("/v1/{project}/secrets/{name}/versions/{version}", self._version)
        app.router.add_get("/v1/{project}/secrets/{name}/stages/{stage}", self._stage)
        app.router.add_put("/meta-data/latest/api/token", self._metadata_token)
        app.router.add_get("/openstack/latest/securitykey", self._securitykey)
        return app

    @staticmethod
    def _reply(status: int, body: dict[str, Any]) -> web.Response:
        return web.json_response(body, status=status)

    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        self.recorded.append(
            (request.method, request.rel_url.raw_path_qs, list(request.headers.items()), body)
        )
        if self.faults:
            fault = self.faults.popleft()
            if fault == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)
            if fault == "garbage":
                return web.Response(text="<html>bad gateway</html>", content_type="text/html")
            if fault == "throttle":
                return self._throttled()
            return self._reply(
                int(fault), {"error_code": "CSMS.0001", "error_msg": "Internal server error."}
            )
        try:
            identity = self._verify(request, body)
            if request.match_info["project"] != self.project_id:
                raise CsmsError(400, "CSMS.0003", "The request is invalid: unknown project.")
            now = self.clock()
            while self._window and now - self._window[0] >= 1.0:
                self._window.popleft()
            if len(self._window) >= self.qps:
                return self._throttled()
            self._window.append(now)
            self.calls.append((now, request.path))
            return self._reply(200, handler(identity, request))
        except CsmsError as exc:
            self.rejections.append(exc.code)
            return self._reply(exc.status, {"error_code": exc.code, "error_msg": exc.message})

    def _throttled(self) -> web.Response:
        self.rejections.append("APIG.0308")
        return self._reply(
            429,
            {
                "error_code": "APIG.0308",
                "error_msg": f"The throttling threshold has been reached: policy user over ratelimit,limit:{self.qps},time:1 second",
            },
        )

    def _verify(self, request: web.Request, body: bytes) -> Identity:
        auth = request.headers.get("Authorization", "")
        prefix = "SDK-HMAC-SHA256 "
        try:
            if not auth.startswith(prefix):
                raise ValueError
            parts = dict(p.strip().split("=", 1) for p in auth[len(prefix) :].split(","))
            ak, signed, given = parts["Access"], parts["SignedHeaders"], parts["Signature"]
        except (ValueError, KeyError):
            raise CsmsError(
                401,
                "APIGW.0301",
                "Incorrect IAM authentication information: Authorization header is malformed.",
            ) from None
        names = signed.split(";")
        if "x-sdk-date" not in names or "host" not in names:
            raise CsmsError(
                401,
                "APIGW.0301",
                "Incorrect IAM authentication information: host and x-sdk-date must be signed.",
            )
        date = request.headers.get("X-Sdk-Date", "")
        try:
            when = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise CsmsError(
                401, "APIGW.0301", "Incorrect IAM authentication information: bad X-Sdk-Date."
            ) from None
        path = "/".join(
            quote(seg, safe="~") for seg in unquote(request.rel_url.raw_path).split("/")
        )
        path = path if path.endswith("/") else path + "/"
        query = sorted(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        canonical_query = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in query)
        headers = "".join(f"{n}:{request.headers.get(n, '').strip()}\n" for n in names)
        payload = request.headers.get("X-Sdk-Content-Sha256") or hashlib.sha256(body).hexdigest()
        canonical = f"{request.method}\n{path}\n{canonical_query}\n{headers}\n{signed}\n{payload}"
        to_sign = f"SDK-HMAC-SHA256\n{date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        identity = self.identities.get(ak)
        if identity is None:
            raise CsmsError(
                401, "APIGW.0301", "Incorrect IAM authentication information: ak not found."
            )
        expected = hmac.new(identity.sk.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise CsmsError(
                401,
                "APIGW.0301",
                "Incorrect IAM authentication information: verify aksk signature fail.",
            )
        if abs(self.clock() - when) > TIME_WINDOW:
            raise CsmsError(
                401,
                "APIGW.0301",
                "Incorrect IAM authentication information: the request has expired.",
            )
        if identity.security_token is not None:
            token = request.headers.get("X-Security-Token", "")
            if not hmac.compare_digest(token.encode(), identity.security_token.encode()):
                raise CsmsError(
                    401,
                    "APIGW.0301",
                    "Incorrect IAM authentication information: security token mismatch.",
                )
            if identity.expires is not None and self.clock() >= identity.expires:
                raise CsmsError(
                    401,
                    "APIGW.0301",
                    "Incorrect IAM authentication information: the token has expired.",
                )
        return identity

    # ------------------------------------------------------------------ CSMS

    def _secret(
        self, identity: Identity, name: str, action: str = "csms:secret:getVersion"
    ) -> Secret:
        if not any(fnmatch.fnmatchcase(name, g) for g in identity.readable):
            raise CsmsError(403, "CSMS.0302", f"Policy doesn't allow {action} to be performed.")
        secret = self.secrets.get(name)
        if secret is None:
            raise CsmsError(400, "CSMS.0106", "The secret name not found int the db.")
        if secret.state == "PENDING_DELETE":
            raise CsmsError(400, "CSMS.0103", "The secret is in the scheduled deletion state.")
        return secret

    def _version_body(self, secret: Secret, version: Version) -> dict[str, Any]:
        key = self.keys[secret.key_id]
        if key.state != "enabled":
            raise CsmsError(
                400,
                "CSMS.0401",
                "Can not get the protected secret value using the provided KMS key.",
            )
        return {"version": {
            "version_metadata": {
                "id": version.id, "create_time": version.created_ms, "expire_time": None,
                "kms_key_id": secret.key_id, "secret_name": secret.name,
                "version_stages": sorted(version.stages),
            },
            "secret_string": None if version.binary else version.value.decode(),
            "secret_binary": base64.b64encode(version.value).decode() if version.binary else None,
        }}  # fmt: skip

    async def _version(self, request: web.Request) -> web.StreamResponse:
        def handle(identity: Identity, req: web.Request) -> dict[str, Any]:
            secret = self._secret(identity, req.match_info["name"])
            wanted = req.match_info["version"]
            for v in secret.versions:
                if (wanted == "latest" and "SYSCURRENT" in v.stages) or v.id == wanted:
                    return self._version_body(secret, v)
            raise CsmsError(400, "CSMS.0005", "The resource does not exist.")

        return await self._guard(request, handle)

    async def _stage(self, request: web.Request) -> web.StreamResponse:
        def handle(identity: Identity, req: web.Request) -> dict[str, Any]:
            secret = self._secret(identity, req.match_info["name"])
            stage = req.match_info["stage"]
            for v in secret.versions:
                if stage in v.stages:
                    return {"stage": {"name": stage, "version_id": v.id, "secret_name": secret.name,
                                      "update_time": v.created_ms}}  # fmt: skip
            raise CsmsError(400, "CSMS.0005", "The resource does not exist.")

        return await self._guard(request, handle)

    async def _show(self, request: web.Request) -> web.StreamResponse:
        def handle(identity: Identity, req: web.Request) -> dict[str, Any]:
            name = req.match_info["name"]
            if not any(fnmatch.fnmatchcase(name, g) for g in identity.readable):
                raise CsmsError(
                    403, "CSMS.0302", "Policy doesn't allow csms:secret:get to be performed."
                )
            secret = self.secrets.get(name)
            if secret is None:
                raise CsmsError(400, "CSMS.0106", "The secret name not found int the db.")
            return {"secret": {"id": secret.id, "name": secret.name, "state": secret.state,
                               "kms_key_id": secret.key_id, "create_time": secret.created_ms,
                               "secret_type": "COMMON"}}  # fmt: skip

        return await self._guard(request, handle)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        def handle(identity: Identity, req: web.Request) -> dict[str, Any]:
            if not identity.may_list:
                raise CsmsError(
                    403, "CSMS.0302", "Policy doesn't allow csms:secret:list to be performed."
                )
            limit = int(req.query.get("limit", "50"))
            names = sorted(self.secrets)
            marker = req.query.get("marker", "")
            if marker:
                names = [n for n in names if n > marker]
            page = names[:limit]
            more = len(names) > limit
            return {"secrets": [{"name": n, "state": self.secrets[n].state, "kms_key_id": self.secrets[n].key_id} for n in page],
                    "page_info": {"next_marker": page[-1] if more else None, "previous_marker": marker or None, "current_count": len(page)}}  # fmt: skip

        return await self._guard(request, handle)

    async def _metadata_token(self, request: web.Request) -> web.Response:
        if not request.headers.get("X-Metadata-Token-Ttl-Seconds", "").isdigit():
            return web.Response(status=400, text="X-Metadata-Token-Ttl-Seconds required")
        token = secrets.token_urlsafe(24)
        self.metadata_tokens.add(token)
        return web.Response(text=token)

    async def _securitykey(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Metadata-Token") not in self.metadata_tokens:
            return web.Response(status=401, text="metadata token required")
        self.metadata_calls += 1
        if self.ecs_identity_readable is None:
            return web.Response(status=404, text="no agency bound")
        ident = self.add_temporary(self.ecs_identity_readable, self.temp_duration)
        expires = datetime.fromtimestamp(ident.expires or 0, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return web.json_response({"credential": {"access": ident.ak, "secret": ident.sk,
                                                 "securitytoken": ident.security_token, "expires_at": expires}})  # fmt: skip


def main() -> None:  # pragma: no cover - for local development
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8444)
    args = parser.parse_args()
    emulator = CsmsEmulator()
    ak, sk = emulator.add_identity(["*"])
    emulator.add_secret("db-password", "hunter2")
    print(
        f"HUAWEICLOUD_SDK_AK={ak}\nHUAWEICLOUD_SDK_SK={sk}\nHUAWEICLOUD_SDK_PROJECT_ID={emulator.project_id}"
    )
    print(f'endpoint = "http://127.0.0.1:{args.port}"')
    web.run_app(emulator.app(), host="127.0.0.1", port=args.port)


if __name__ == "__main__":  # pragma: no cover
    main()
