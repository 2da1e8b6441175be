"""A fault proxy between the agent and one upstream (an emulator, moto or OpenBao).

It forwards requests unchanged (the Host header included, so signatures still verify) and,
by its current :class:`Fault`, delays, fails, throttles in the vendor's own error format,
garbles, truncates, resets, hangs, refuses connections, or crosses answers between secrets.
The mode can be flipped at any time; every request that reaches it is counted with its
time, so a test can say how many upstream calls per second a fault drew.
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

import aiohttp
from aiohttp import web

from kms_agent.upstream import new_session

#: Hop-by-hop and framing headers: the proxy sets its own.
_DROP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)


class Fault(enum.Enum):
    NONE = "none"
    SLOW = "slow"  # latency well under the deadline: must be invisible
    LATENCY = "latency"  # latency past the agent's deadline
    HTTP500 = "http500"
    HTTP503 = "http503"
    THROTTLE = "throttle"  # the vendor's own throttling answer
    GARBAGE = "garbage"  # 200 with an HTML body
    TRUNCATED = "truncated"  # the real answer cut in half, then the connection dropped
    RESET = "reset"  # TCP RST on reading the request
    HANG = "hang"  # never answers (until the mode changes)
    REFUSE = "refuse"  # nothing listens: connections refused
    CROSS = "cross"  # another secret's answer
    FLAP = "flap"  # every other request answered 500
    DENIED = "denied"  # the vendor's permission refusal (permanent)
    BAD_CREDENTIALS = "bad_credentials"  # the vendor's refusal of the credentials (permanent)


#: Faults after which the source is healthy but says no: callers get errors, not values.
PERMANENT = frozenset({Fault.DENIED, Fault.BAD_CREDENTIALS})


@dataclass(frozen=True)
class Vendor:
    """How one upstream names the secret of a request, and says throttled/denied/bad
    credentials (status, JSON body), as its real service does."""

    name: str
    secret_of: Callable[[web.Request, bytes], str | None]
    throttle: tuple[int, dict[str, object]]
    denied: tuple[int, dict[str, object]]
    bad_credentials: tuple[int, dict[str, object]]


def _alibaba_secret(request: web.Request, body: bytes) -> str | None:
    form = parse_qs(body.decode("latin-1")) if body else {}
    return request.query.get("SecretName") or next(iter(form.get("SecretName", [])), None)


def _aws_secret(request: web.Request, body: bytes) -> str | None:
    try:
        return str(json.loads(body)["SecretId"])
    except (ValueError, KeyError, TypeError):
        return None


def _huawei_secret(request: web.Request, body: bytes) -> str | None:
    parts = request.path.split("/")  # /v1/{project}/secrets/{name}/versions/{v}
    return unquote(parts[4]) if len(parts) > 4 and parts[3] == "secrets" else None


def _vault_secret(request: web.Request, body: bytes) -> str | None:
    prefix = "/v1/secret/data/"
    return request.path[len(prefix) :] if request.path.startswith(prefix) else None


VENDORS = {
    "alibaba": Vendor(
        "alibaba",
        _alibaba_secret,
        (429, {"Code": "Rejected.Throttling", "Message": "Request was denied due to request throttling.", "RequestId": "fp"}),
        (403, {"Code": "Forbidden.NoPermission", "Message": "This operation is forbidden by permission system.", "RequestId": "fp"}),
        (404, {"Code": "InvalidAccessKeyId.NotFound", "Message": "Specified access key is not found.", "RequestId": "fp"}),
    ),
    "huawei": Vendor(
        "huawei",
        _huawei_secret,
        (429, {"error_code": "APIG.0308", "error_msg": "The throttling threshold has been reached: policy user over ratelimit,limit:50,time:1 second"}),
        (403, {"error_code": "CSMS.0302", "error_msg": "Policy doesn't allow csms:secret:getVersion to be performed."}),
        (401, {"error_code": "APIGW.0301", "error_msg": "Incorrect IAM authentication information: ak not found."}),
    ),
    "aws": Vendor(
        "aws",
        _aws_secret,
        (400, {"__type": "ThrottlingException", "message": "Rate exceeded"}),
        (400, {"__type": "AccessDeniedException", "message": "User is not authorized to perform: secretsmanager:GetSecretValue"}),
        (400, {"__type": "UnrecognizedClientException", "message": "The security token included in the request is invalid."}),
    ),
    "vault": Vendor(
        "vault",
        _vault_secret,
        (429, {"errors": ['request path "secret/data/x": rate limit quota exceeded']}),
        (403, {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}),
        (403, {"errors": ["permission denied"]}),
    ),
}  # fmt: skip


@dataclass
class FaultProxy:
    """``await proxy.start()``, point a source's endpoint at ``proxy.url``, set
    ``proxy.fault``; ``proxy.calls`` holds the monotonic time of every request it read."""

    target: str
    vendor: Vendor
    fault: Fault = Fault.NONE
    latency: float = 1.5
    calls: list[float] = field(default_factory=list)
    port: int = 0
    _flip: int = 0
    _answers: dict[str, tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _transports: set[asyncio.Transport] = field(default_factory=set)
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # The agent's own session settings (no silent re-sends), with time for a hang.
        self._session = new_session(connect_timeout=5.0, total_timeout=60.0)
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def set(self, fault: Fault) -> None:
        """Switch the mode: hung requests are released (dropped), and refusing starts or
        ends (the listener closed with every open connection, or opened again)."""
        was, self.fault = self.fault, fault
        self._changed.set()
        self._changed = asyncio.Event()
        if fault is Fault.REFUSE and was is not Fault.REFUSE:
            assert self._site is not None
            await self._site.stop()
            self._site = None
            for transport in list(self._transports):
                _reset(transport)
        elif was is Fault.REFUSE and fault is not Fault.REFUSE:
            await self._listen()

    def calls_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.calls if start <= t < end)

    async def close(self) -> None:
        self._changed.set()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append(time.monotonic())
        transport = request.transport
        assert transport is not None
        if len(self._transports) > 256:
            self._transports = {t for t in self._transports if not t.is_closing()}
        self._transports.add(transport)
        fault = self.fault
        if fault is Fault.FLAP:
            self._flip += 1
            fault = Fault.HTTP500 if self._flip % 2 else Fault.NONE
        if fault is Fault.RESET:
            _reset(transport)
            return web.Response()  # never written: the connection is gone
        if fault is Fault.HANG:
            await self._changed.wait()
            _reset(transport)
            return web.Response()
        if fault in (Fault.HTTP500, Fault.HTTP503):
            return web.Response(status=500 if fault is Fault.HTTP500 else 503, text="backend down")
        if fault is Fault.GARBAGE:
            return web.Response(
                status=200, body=b"<html>upstream proxy error", content_type="text/html"
            )
        if fault in (Fault.THROTTLE, Fault.DENIED, Fault.BAD_CREDENTIALS):
            refusal_status, refusal = {
                Fault.THROTTLE: self.vendor.throttle,
                Fault.DENIED: self.vendor.denied,
                Fault.BAD_CREDENTIALS: self.vendor.bad_credentials,
            }[fault]
            ctype = (
                "application/x-amz-json-1.1" if self.vendor.name == "aws" else "application/json"
            )
            return web.Response(
                status=refusal_status, body=json.dumps(refusal).encode(), content_type=ctype
            )
        if fault in (Fault.SLOW, Fault.LATENCY):
            await asyncio.sleep(0.2 if fault is Fault.SLOW else self.latency)
        status, payload, headers = await self._forward(request, body)
        secret = self.vendor.secret_of(request, body)
        if status == 200 and secret is not None:
            self._answers[secret] = (status, payload, headers)
        if fault is Fault.CROSS and secret is not None:
            other = next((a for s, a in reversed(self._answers.items()) if s != secret), None)
            if other is not None:
                status, payload, headers = other
        if fault is Fault.TRUNCATED:
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            _reset(transport)
            return response
        return web.Response(status=status, body=payload, headers=headers)

    async def _forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, bytes, dict[str, str]]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=body or None,
            skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent", "Accept"),
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP}
            return resp.status, payload, out


def _reset(transport: asyncio.Transport) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()
