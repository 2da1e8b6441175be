"""The HTTP API on the secrets listener.

A request is checked in a fixed order, each step a small function: forwarding headers
(refused: a proxy in front would turn the agent into an SSRF target), token (except the
health routes), method (GET only), route. Errors render in one place as
``{"error": {"code", "message", "hint", "request_id"}}``; one access line per request.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from kms_agent import render
from kms_agent.auth import Authenticator
from kms_agent.cache import Cache, Entry, Key, Outcome
from kms_agent.config import Config
from kms_agent.errors import (
    AgentError,
    BadRequest,
    FieldNotFound,
    Forbidden,
    MethodNotAllowed,
    ProxiedRequest,
    RefreshRateLimited,
    RouteNotFound,
    SecretNotJson,
    Unauthorized,
)
from kms_agent.metrics import Metrics
from kms_agent.model import NAME_RE, NAME_RULE, SecretRecord, check_name
from kms_agent.providers import Router

log = structlog.get_logger("kms_agent.access")
errlog = structlog.get_logger("kms_agent.server")

PUBLIC_PATHS = frozenset({"/healthz", "/ping", "/readyz"})
NO_STORE = "no-store"
VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_TRUE = {"true": True, "false": False, "1": True, "0": False}


@dataclass(slots=True, frozen=True)
class Loaded:
    """The outcome of a load the fast path awaited but does not answer (an error or a
    stale value): handed with the connection to aiohttp, which answers it without
    loading again."""

    key: Key
    result: Entry | AgentError
    outcome: Outcome


@dataclass(slots=True)
class AgentState:
    """What the handlers share. Swapped attributes (config, cache settings) are atomic."""

    config: Config
    router: Router
    cache: Cache
    auth: Authenticator
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    draining: bool = False
    not_ready_reason: str = "starting"
    request_prefix: str = field(default_factory=lambda: secrets.token_hex(4))
    request_counter: int = 0
    #: Cache hits not logged one by one, by route, since the last summary line.
    hit_counts: dict[str, int] = field(default_factory=dict)
    #: Loads handed over by the fast path, by transport, until aiohttp's lookup takes them.
    handed: dict[object, Loaded] = field(default_factory=dict)

    def next_request_id(self) -> str:
        self.request_counter += 1
        return f"{self.request_prefix}-{self.request_counter:x}"


STATE = web.AppKey("state", AgentState)
_AUTH_FAILURES: dict[type[AgentError], str] = {
    Unauthorized: "missing_token",
    Forbidden: "invalid_token",
    ProxiedRequest: "forwarded",
}
_CTX = web.RequestKey("ctx", dict[str, Any])


# --------------------------------------------------------------------------- helpers


def error_response(err: AgentError, request_id: str) -> web.Response:
    body: dict[str, Any] = {"code": err.code, "message": err.message, "request_id": request_id}
    if err.hint:
        body["hint"] = err.hint
    resp = web.Response(
        body=json.dumps({"error": body}, ensure_ascii=False).encode(),
        status=err.status,
        content_type=render.JSON_TYPE,
    )
    if isinstance(err, RefreshRateLimited):
        resp.headers["Retry-After"] = str(max(1, round(err.retry_after + 0.499)))
    return resp


def _params(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    query = request.query
    out: dict[str, str] = {}
    for key, value in query.items():
        if key not in allowed:
            raise BadRequest(
                f"unknown query parameter {key!r}",
                hint=f"this route takes: {', '.join(sorted(allowed)) or 'no parameters'}",
            )
        if key in out:
            raise BadRequest(f"query parameter {key!r} is given more than once")
        out[key] = value
    return out


def _flag(params: Mapping[str, str], key: str) -> bool:
    text = params.get(key)
    if text is None:
        return False
    value = _TRUE.get(text.lower())
    if value is None:
        raise BadRequest(f"query parameter {key}={text!r} is not a boolean; use true or false")
    return value


def _version_part(params: Mapping[str, str], key: str) -> str | None:
    text = params.get(key)
    if text is None:
        return None
    if VERSION_RE.fullmatch(text) is None:
        raise BadRequest(
            f"query parameter {key}={text[:80]!r} is not valid",
            hint="version ids and stages are 1-128 letters, digits, '.', '_' or '-'",
        )
    return text


async def lookup(
    request: web.Request,
    name: str,
    version_id: str | None,
    version_stage: str | None,
    refresh: bool,
) -> Entry:
    state = request.app[STATE]
    check_name(name)
    provider = state.router.route(name)
    key: Key = (provider.name, name, version_id, version_stage)
    ctx = request[_CTX]
    ctx["source"] = provider.name
    # A request the fast path loaded already, then handed over for aiohttp to answer.
    handed = state.handed.pop(request.transport, None) if state.handed else None
    if handed is not None and handed.key == key and not refresh:
        if isinstance(handed.result, AgentError):
            raise handed.result
        entry, outcome = handed.result, handed.outcome
    elif not refresh and (hit := state.cache.fresh(key)) is not None:
        ctx["cache"] = "hit"
        return hit
    else:
        entry, outcome = await state.cache.load(key, force_refresh=refresh)
    ctx["cache"] = outcome.value
    if outcome is Outcome.STALE:
        ctx["age"] = state.cache.now() - entry.fetched_at
    return entry


def rendered(entry: Entry, shape: str) -> render.Rendered:
    """``entry``'s body in ``shape`` ("raw", "native" or a compat shape), built once."""
    bodies = entry.bodies
    if isinstance(bodies, render.Rendered):
        if bodies.shape == shape:
            return bodies
        bodies = (bodies,)
    else:
        for found in bodies:
            if found.shape == shape:
                return found
    found = render.rendered(entry.record, shape)
    entry.bodies = (*bodies, found) if bodies else found
    return found


def shape_body(entry: Entry, shape: str) -> bytes:
    return rendered(entry, shape).body(entry.record.value.reveal())


def _secret_response(request: web.Request, body: bytes, content_type: str) -> web.Response:
    resp = web.Response(body=body, content_type=content_type, headers={"Cache-Control": NO_STORE})
    age = request[_CTX].get("age")
    if age is not None:
        resp.headers["Age"] = str(int(age))
        resp.headers["Warning"] = '110 kms-agent "Response is Stale"'
    return resp


# --------------------------------------------------------------------------- middleware


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(route: str, handler: Handler, *, public: bool = False) -> Handler:
    """The request checks, error rendering, metrics and access line around one handler.

    A wrapper per route rather than an aiohttp middleware: no middleware chain is built
    per request, and the route template is a constant here instead of a lookup.
    """

    async def wrapper(request: web.Request) -> web.StreamResponse:
        return await guard(request, handler, route, public)

    return wrapper


async def guard(
    request: web.Request, handler: Handler, route: str, public: bool
) -> web.StreamResponse:
    state = request.app[STATE]
    start = time.perf_counter()
    request_id = state.next_request_id()
    ctx: dict[str, Any] = {}
    request[_CTX] = ctx
    resp: web.StreamResponse | None = None
    failure: AgentError | None = None
    try:
        headers = request.headers
        if "X-Forwarded-For" in headers or "Forwarded" in headers:
            raise ProxiedRequest(
                "requests carrying X-Forwarded-For or Forwarded are refused",
                hint="call the agent directly on loopback, not through a proxy",
            )
        if not public:
            state.auth.check(headers)
        if request.method != "GET":
            raise MethodNotAllowed(
                f"method {request.method} is not allowed", hint="the agent only reads: use GET"
            )
        resp = await handler(request)
    except AgentError as exc:
        failure = exc
    except web.HTTPException as exc:
        failure = (
            RouteNotFound(
                f"no route {request.path[:200]!r}",
                hint="routes: /secrets/{name}, /secrets?prefix=, /secretsmanager/get?secretId=, "
                "/v1/{name}, /healthz, /ping, /readyz",
            )
            if exc.status == 404
            else BadRequest(exc.reason)
        )
    except Exception as exc:
        errlog.exception("request_failed", request_id=request_id, error_type=type(exc).__name__)
        failure = AgentError("internal error; see the agent's log for this request id")
    if failure is not None or resp is None:
        failure = failure or AgentError("no response")
        ctx["error"] = failure.code
        resp = error_response(failure, request_id)
        reason = _AUTH_FAILURES.get(type(failure))
        if reason is not None:
            state.metrics.auth_failures.labels(reason).inc()
    resp.headers["X-Request-Id"] = request_id
    account(
        state,
        route,
        request_id,
        request.method,
        request.match_info.get("name") or request.query.get("secretId"),
        resp.status,
        time.perf_counter() - start,
        ctx,
    )
    return resp


def count_hit(state: AgentState, route: str, status: int, elapsed: float) -> None:
    """A cache hit not logged one by one: metrics, and the count for the summary line.
    The hot path calls this directly (the fast path knows it has a hit)."""
    state.metrics.observe_request(route, status, elapsed)
    state.metrics.cache_outcome("hit")
    state.hit_counts[route] = state.hit_counts.get(route, 0) + 1


def account(
    state: AgentState,
    route: str,
    request_id: str,
    method: str,
    name: str | None,
    status: int,
    elapsed: float,
    ctx: dict[str, Any],
) -> None:
    """Metrics and the access line for one answered request (both listeners' paths)."""
    outcome = ctx.get("cache")
    logging_cfg = state.config.logging
    if outcome == "hit" and not logging_cfg.log_hits and status < 400:
        count_hit(state, route, status, elapsed)
        return
    state.metrics.observe_request(route, status, elapsed)
    if outcome is not None:
        state.metrics.cache_outcome(outcome)
    if logging_cfg.access_log or status >= 400 or outcome is not None:
        log.info(
            "request",
            request_id=request_id,
            method=method,
            route=route,
            name=name,
            status=status,
            duration_ms=round(elapsed * 1000, 3),
            **ctx,
        )


# --------------------------------------------------------------------------- handlers

_NATIVE_PARAMS = frozenset({"version_id", "version_stage", "refresh", "field", "format"})
_COMPAT_PARAMS = frozenset({"secretId", "versionId", "versionStage", "refreshNow"})
_V1_PARAMS = frozenset({"versionId", "versionStage", "refreshNow"})


async def get_secret(request: web.Request) -> web.StreamResponse:
    params = _params(request, _NATIVE_PARAMS)
    fmt = params.get("format", "json")
    if fmt not in ("json", "raw"):
        raise BadRequest(f"format={fmt[:40]!r} is not known; use format=raw or leave it out")
    entry = await lookup(
        request,
        request.match_info["name"],
        _version_part(params, "version_id"),
        _version_part(params, "version_stage"),
        _flag(params, "refresh"),
    )
    record = entry.record
    if "field" in params:
        return _field_response(request, record, params["field"], raw=fmt == "raw")
    if fmt == "raw":
        content_type = "text/plain" if record.data_type == "text" else "application/octet-stream"
        resp = _secret_response(request, record.value.reveal(), content_type)
        if record.data_type == "text":
            resp.charset = "utf-8"
        return resp
    if "age" in request[_CTX]:
        return _secret_response(
            request, render.native_stale(record, request[_CTX]["age"]), render.JSON_TYPE
        )
    return _secret_response(request, shape_body(entry, "native"), render.JSON_TYPE)


def _field_response(
    request: web.Request, record: SecretRecord, key: str, *, raw: bool
) -> web.Response:
    data: Any = None
    if record.data_type == "text":
        try:
            data = json.loads(record.value.reveal())
        except ValueError:
            data = None
    if not isinstance(data, dict):
        raise SecretNotJson(
            f"secret {record.name!r} is not a JSON object, so it has no field {key[:80]!r}",
            hint="leave out ?field= to read the whole value",
        )
    if key not in data:
        raise FieldNotFound(
            f"secret {record.name!r} has no field {key[:80]!r}",
            hint=f"its fields are: {', '.join(sorted(data)[:20])}",
        )
    value = data[key]
    if raw:
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        resp = _secret_response(request, text.encode(), "text/plain")
        resp.charset = "utf-8"
        return resp
    body = render.native_dict(record)
    body["field"] = key
    body["value"] = value
    if "age" in request[_CTX]:
        body["stale"] = True
    return _secret_response(
        request, json.dumps(body, ensure_ascii=False).encode(), render.JSON_TYPE
    )


async def _compat(request: web.Request, name: str, params: Mapping[str, str]) -> web.Response:
    state = request.app[STATE]
    entry = await lookup(
        request,
        name,
        _version_part(params, "versionId"),
        _version_part(params, "versionStage"),
        _flag(params, "refreshNow"),
    )
    shape = state.config.server.response_type
    return _secret_response(request, shape_body(entry, shape), render.JSON_TYPE)


async def secretsmanager_get(request: web.Request) -> web.StreamResponse:
    params = _params(request, _COMPAT_PARAMS)
    name = params.get("secretId")
    if not name:
        raise BadRequest("secretId is required", hint="call /secretsmanager/get?secretId=NAME")
    return await _compat(request, name, params)


async def v1_get(request: web.Request) -> web.StreamResponse:
    params = _params(request, _V1_PARAMS)
    return await _compat(request, request.match_info["name"], params)


async def list_secrets(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    params = _params(request, frozenset({"prefix"}))
    prefix = params.get("prefix", "")
    if prefix and NAME_RE.fullmatch(prefix) is None:
        raise BadRequest(f"prefix {prefix[:80]!r} is not valid: use {NAME_RULE}")
    out: list[dict[str, str]] = []
    for provider in state.router.route_prefix(prefix):
        for name in await provider.list_names(prefix):
            # A name is visible through a source only if requests for it route there.
            if NAME_RE.fullmatch(name) and state.router.route(name) is provider:
                out.append({"name": name, "source": provider.name})
    return web.json_response({"secrets": out}, headers={"Cache-Control": NO_STORE})


async def healthz(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def ping(_request: web.Request) -> web.StreamResponse:
    return web.Response(text="healthy")


async def readyz(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.ready and not state.draining:
        return web.json_response({"status": "ready"})
    reason = "draining" if state.draining else state.not_ready_reason
    return web.json_response({"status": "not_ready", "reason": reason}, status=503)


async def no_route(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("/secrets/{name:.+}", "/secrets/{name}", get_secret),
    ("/secrets", "/secrets", list_secrets),
    ("/secretsmanager/get", "/secretsmanager/get", secretsmanager_get),
    ("/v1/{name:.+}", "/v1/{name}", v1_get),
    ("/healthz", "/healthz", healthz),
    ("/ping", "/ping", ping),
    ("/readyz", "/readyz", readyz),
)


def create_app(state: AgentState) -> web.Application:
    app = web.Application(client_max_size=1024)
    app[STATE] = state
    # Every method reaches the guard, which answers non-GET with our 405; anything else
    # falls through to a catch-all that the guard turns into our JSON 404.
    for path, template, handler in ROUTES:
        public = template in PUBLIC_PATHS
        app.router.add_route("*", path, guarded(template, handler, public=public))
    app.router.add_route("*", "/{tail:.*}", guarded("unmatched", no_route))
    return app
