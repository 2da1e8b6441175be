"""The pipeline: the fixed order every request on a secrets listener is checked in.

connection limit (the protocol) → forwarding headers → caller identity → method → body →
route → cache → provider. Each step is a small function; the first that refuses decides
the answer, written by :mod:`kms_agent.respond` in the route's dialect. One access line or
one counted hit per request, through :func:`account`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import structlog

from kms_agent import grammar, render, respond
from kms_agent.auth import Caller, IdentityPending
from kms_agent.cache import Entry, Outcome
from kms_agent.errors import (
    AccessDeniedByPolicy,
    AgentError,
    BadRequest,
    FieldNotFound,
    Forbidden,
    MethodNotAllowed,
    ProxiedRequest,
    RoleNotAllowed,
    RouteNotFound,
    SecretNotJson,
    Unauthorized,
)
from kms_agent.grammar import Dialect, Kind, Request, Route
from kms_agent.model import check_name_for
from kms_agent.policy import DESCRIBE_SECRET, GET_SECRET_VALUE, LIST_SECRETS, Decision
from kms_agent.protocol import BASE_HEADERS, Head
from kms_agent.state import AgentState

if TYPE_CHECKING:
    from kms_agent.protocol import Connection

log = structlog.get_logger("kms_agent.access")
errlog = structlog.get_logger("kms_agent.server")

_AUTH_FAILURES: dict[type[AgentError], str] = {
    Unauthorized: "missing_token",
    Forbidden: "invalid_token",
    ProxiedRequest: "forwarded",
}
#: Characters of a caller's name written in an access line.
LOGGED_NAME = 128
#: Access lines of refused (4xx) requests written per second; the rest are summarised.
REFUSED_LINES_PER_SECOND = 20
#: Targets whose parse a connection remembers (most callers repeat a few).
MEMO_MAX = 8
_UNMATCHED = Route("unmatched", Kind.HEALTH, Dialect.NATIVE)
#: A caller not (yet) identified: public routes, and refusals before the identity step.
ANONYMOUS = Caller(())
#: The policy action each kind of request is (kinds not here need none).
_ACTIONS = {
    Kind.SECRET: GET_SECRET_VALUE,
    Kind.LIST: LIST_SECRETS,
    Kind.VAULT_METADATA: DESCRIBE_SECRET,
}


class _Memo:
    """A target's route and, once its checks passed, its parsed request; and the head
    that passed them, with the token set it passed under (the protocol hands the very same
    head again for the very same bytes: it passes the same checks under the same tokens)."""

    __slots__ = ("caller", "checked", "found", "query", "request", "tokens")

    def __init__(self, found: tuple[Route, bytes] | None, query: bytes) -> None:
        self.found = found
        self.query = query
        self.request: Request | None = None
        self.checked: Head | None = None
        self.tokens: object = None
        self.caller: Caller = ANONYMOUS


class Front:
    """One secrets listener's pipeline over the shared state."""

    def __init__(self, state: AgentState, dialect: Dialect) -> None:
        self.state = state
        self.dialect = dialect
        self._config: object = None
        self._routes = grammar.routes(dialect)
        self.interesting = BASE_HEADERS
        self._lines_at = 0
        self._lines = 0
        self._sync()

    def _sync(self) -> None:
        """Routes and the headers to keep follow the config (reloads swap it whole)."""
        state = self.state
        self._config = state.config
        self._routes = grammar.routes(self.dialect, state.config.server.response_type)
        self.interesting = BASE_HEADERS | frozenset((*state.auth.header_keys, b"authorization"))

    # ------------------------------------------------------------------ the steps

    def answer(
        self, head: Head, conn: Connection, *, waited: bool = False
    ) -> bytes | Awaitable[bytes]:
        """The answer to one request: bytes now (hits, refusals), or later (loads, and a
        service-account token whose signing key or review must be waited for)."""
        start = time.perf_counter()
        state = self.state
        if state.config is not self._config:
            self._sync()
        if conn.memo_key is not self._config:
            conn.memo.clear()
            conn.memo_key = self._config
        memo = conn.memo.get(head.target)
        if (
            memo is not None
            and memo.checked is head
            and memo.tokens is state.auth.token_set
            and (memo.caller.expires_at is None or memo.caller.valid(time.time()))
        ):
            request = memo.request
            caller = memo.caller
            assert request is not None
            if request.hot and self._allowed(request, caller):
                # A plain read this caller may make: a fresh hit is answered here, at once.
                entry = state.cache.fresh(request.key)
                if entry is not None and not state.config.logging.log_hits:
                    return self._hit(request, entry, head, start)
            try:
                return self.serve(request, head, start, caller)
            except AgentError as err:
                return self.fail(
                    err, request.route, request.route.dialect, head, start, request, caller
                )
        if head.error is not None:
            return self.fail(head.error, _UNMATCHED, self.dialect, head, start)
        target_error: AgentError | None = None
        if memo is None:
            try:
                path, query = grammar.split_target(head.target)
            except AgentError as err:
                # Refused in its place in the order: after the token and method checks
                # (CONNECT's authority-form target is a 405 like every other method).
                target_error, path, query = err, b"", b""
            memo = _Memo(self._routes.find(path) if target_error is None else None, query)
        found = memo.found
        route: Route = found[0] if found is not None else _UNMATCHED
        dialect = route.dialect if found is not None else self.dialect
        caller = ANONYMOUS
        try:
            headers = head.headers
            if b"x-forwarded-for" in headers or b"forwarded" in headers:
                raise ProxiedRequest(
                    "requests carrying X-Forwarded-For or Forwarded are refused",
                    hint="call the agent directly on loopback, not through a proxy",
                )
            if not route.public:
                try:
                    caller = state.auth.identify(
                        headers, conn.peer_principals, peer_only=state.config.policies.enabled
                    )
                except IdentityPending:
                    if waited:
                        raise Forbidden(
                            "the service-account token could not be verified",
                            hint="its signing key is not in the cluster's JWKS",
                        ) from None
                    return self._identify_then_answer(head, conn, route, dialect, start)
                if conn.peer_pid is not None:
                    caller = Caller(caller.principals, caller.expires_at,
                                    (*caller.detail, ("peer_pid", str(conn.peer_pid))))  # fmt: skip
                conn.trust()
            if head.method != b"GET":
                raise MethodNotAllowed(
                    f"method {head.method.decode('latin-1')[:16]} is not allowed",
                    hint="the agent only reads: use GET",
                )
            length = headers.get(b"content-length", b"0").strip()
            if b"transfer-encoding" in headers or length not in (b"0", b""):
                raise BadRequest("request bodies are not accepted", hint="send GET without a body")
            if target_error is not None:
                raise target_error
            if found is None:
                raise RouteNotFound(
                    f"no route {head.target[:LOGGED_NAME].decode('latin-1')!r}",
                    hint=f"routes: {self._routes.describe()}",
                )
            request = memo.request
            if request is None:
                # Parsed once the checks before it passed; remembered for this connection.
                request = memo.request = grammar.parse(found, memo.query, state.router.route)
                if len(conn.memo) >= MEMO_MAX:
                    conn.memo.clear()
                conn.memo[head.target] = memo
            if not route.public:
                memo.checked, memo.tokens, memo.caller = head, state.auth.token_set, caller
            return self.serve(request, head, start, caller)
        except AgentError as err:
            return self.fail(err, route, dialect, head, start, caller=caller)

    async def _identify_then_answer(
        self, head: Head, conn: Connection, route: Route, dialect: Dialect, start: float
    ) -> bytes:
        """Wait for what the caller's service-account token needs (a rate-limited JWKS
        refresh, or its TokenReview), then answer it as if it had come now."""
        try:
            await self.state.auth.identify_async(head.headers)
        except AgentError as err:
            return self.fail(err, route, dialect, head, start)
        result = self.answer(head, conn, waited=True)
        return result if isinstance(result, bytes) else await result

    def _decision(self, request: Request, caller: Caller) -> Decision | None:
        """What the policies say of ``caller`` making ``request``; None when none applies
        (no policies, or a kind of request that needs no action)."""
        policies = self.state.config.policies
        action = _ACTIONS.get(request.route.kind)
        if not policies.enabled or action is None:
            return None
        if request.route.kind is Kind.LIST:
            return policies.decide_list(caller.principals)
        return policies.decide(caller.principals, action, request.name)

    def _allowed(self, request: Request, caller: Caller) -> bool:
        """Whether the policies let ``caller`` make ``request`` (no policies: yes)."""
        decision = self._decision(request, caller)
        return decision is None or decision.allowed

    def authorize(self, request: Request, caller: Caller) -> None:
        """Raise AccessDeniedByPolicy unless a policy lets ``caller`` make ``request``;
        decided before the cache is asked, so a value cached for one caller reaches another
        only if it too may read it."""
        decision = self._decision(request, caller)
        if decision is None or decision.allowed:
            return
        action = _ACTIONS[request.route.kind]
        self.state.metrics.policy_denials.labels(decision.reason).inc()
        why = (
            f"denied by {decision.statement}"
            if decision.reason == "explicit_deny"
            else "no policy statement allows it"
        )
        raise AccessDeniedByPolicy(
            f"{caller.principal or 'this caller'} may not {action} here: {why}",
            hint=decision.hint
            or f"grant {action} to {caller.principal} in [policies], or ask who runs the agent",
        )

    def serve(
        self, request: Request, head: Head, start: float, caller: Caller = ANONYMOUS
    ) -> bytes | Awaitable[bytes]:
        kind = request.route.kind
        self.authorize(request, caller)
        if kind is Kind.SECRET:
            role = request.role_arn
            if (
                role is not None
                and role not in self.state.router.providers[request.source].assume_roles
            ):
                raise RoleNotAllowed(
                    f"Failed to create caching client from role: {role[:200]}",
                    hint=f"the agent reads as a caller's role only if it is in "
                    f"sources.{request.source}.assume_roles",
                )
            if not request.refresh:
                entry = self.state.cache.fresh(request.key)
                if entry is not None:
                    return self.secret(request, entry, Outcome.HIT, head, start, caller)
            return self._load(request, head, start, caller)
        if kind is Kind.LIST:
            return self._list(request, head, start, caller)
        if kind is Kind.VAULT_METADATA:
            return self._metadata(request, head, start)
        return self.plain(request, head, start)

    async def _load(self, request: Request, head: Head, start: float, caller: Caller) -> bytes:
        try:
            entry, outcome = await self.state.cache.load(request.key, force_refresh=request.refresh)
        except AgentError as err:
            return self.fail(
                err, request.route, request.route.dialect, head, start, request, caller
            )
        return self.secret(request, entry, outcome, head, start, caller)

    # ------------------------------------------------------------------ answers

    def _hit(self, request: Request, entry: Entry, head: Head, start: float) -> bytes:
        """A fresh hit not logged one by one: its bytes, counted for the summary line."""
        state = self.state
        data = respond.secret(entry, request.shape, state.next_request_id(), close=head.close)
        count_hit(state, request.route.template, time.perf_counter() - start)
        return data

    def secret(
        self,
        request: Request,
        entry: Entry,
        outcome: Outcome,
        head: Head,
        start: float,
        caller: Caller = ANONYMOUS,
    ) -> bytes:
        state = self.state
        if outcome is Outcome.HIT and request.field is None and not state.config.logging.log_hits:
            return self._hit(request, entry, head, start)
        request_id = state.next_request_id()
        stale_age = state.cache.now() - entry.fetched_at if outcome is Outcome.STALE else None
        try:
            if request.field is not None:
                data = _field(request, entry, request_id, stale_age, head.close)
            else:
                data = respond.secret(
                    entry, request.shape, request_id, stale_age=stale_age, close=head.close
                )
        except AgentError as err:
            return self.fail(err, request.route, request.route.dialect, head, start, request)
        elapsed = time.perf_counter() - start
        route = request.route.template
        if outcome is Outcome.HIT and not state.config.logging.log_hits:
            count_hit(state, route, elapsed)
        else:
            ctx: dict[str, Any] = {"source": request.source, "cache": outcome.value}
            if caller.principals:
                ctx["principal"] = caller.principal
                ctx.update(caller.detail)
            if stale_age is not None:
                ctx["age"] = round(stale_age, 3)
            self.account(route, request_id, request.name, 200, elapsed, ctx)
        return data

    def plain(self, request: Request, head: Head, start: float) -> bytes:
        """Health, readiness, ping and the Vault CLI's preflight answers."""
        state = self.state
        request_id = state.next_request_id()
        kind = request.route.kind
        status = 200
        if kind is Kind.PING:
            # The AWS and Alibaba agents send no Content-Type on anything, "healthy" too.
            ctype = respond.TEXT if request.route.dialect is Dialect.NATIVE else respond.NONE
            data = respond.response(200, ctype, b"healthy", request_id, close=head.close)
        elif kind is Kind.READY:
            status, body = state.readiness()
            data = respond.json_response(status, body, request_id, close=head.close)
        elif kind is Kind.HEALTH and request.route.dialect is Dialect.VAULT:
            data = respond.json_response(200, _vault_health(), request_id, close=head.close)
        elif kind is Kind.HEALTH:
            data = respond.json_response(200, {"status": "ok"}, request_id, close=head.close)
        elif kind is Kind.VAULT_SELF:
            data = respond.json_response(200, _vault_self(request_id), request_id, close=head.close)
        else:  # Kind.VAULT_MOUNTS
            data = respond.json_response(
                200, _vault_mount(request_id), request_id, close=head.close
            )
        self.account(request.route.template, request_id, None, status,
                     time.perf_counter() - start, {})  # fmt: skip
        return data

    async def _list(self, request: Request, head: Head, start: float, caller: Caller) -> bytes:
        state = self.state
        out: list[dict[str, str]] = []
        # Only what the caller may read (or describe) is shown.
        shown = state.config.policies.may_list(caller.principals)
        try:
            for provider in state.router.route_prefix(request.prefix):
                for name in await provider.list_names(request.prefix):
                    # A name is visible through a source only if requests for it route there.
                    if _routes_to(state, name, provider.name) and shown(name):
                        out.append({"name": name, "source": provider.name})
        except AgentError as err:
            return self.fail(err, request.route, request.route.dialect, head, start, request)
        request_id = state.next_request_id()
        data = respond.json_response(
            200, {"secrets": out}, request_id, close=head.close,
        )  # fmt: skip
        self.account(request.route.template, request_id, request.prefix, 200,
                     time.perf_counter() - start, {})  # fmt: skip
        return data

    async def _metadata(self, request: Request, head: Head, start: float) -> bytes:
        """KV v2 metadata of a secret, from the source's describe (not cached)."""
        state = self.state
        try:
            meta = await state.router.providers[request.source].describe(request.name)
        except AgentError as err:
            return self.fail(err, request.route, request.route.dialect, head, start, request)
        request_id = state.next_request_id()
        versions = {
            str(i + 1) if not vid.isdigit() else vid: {
                "created_time": render.iso_time(meta.created),
                "deletion_time": "",
                "destroyed": False,
            }
            for i, (vid, _stages) in enumerate(meta.versions)
        }
        current = max((int(v) for v in versions), default=0)
        body = {
            "request_id": request_id, "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": {
                "cas_required": False, "created_time": render.iso_time(meta.created),
                "current_version": current, "custom_metadata": None,
                "delete_version_after": "0s", "max_versions": 0, "oldest_version": 0,
                "updated_time": render.iso_time(meta.created), "versions": versions,
            },
            "wrap_info": None, "warnings": None, "auth": None,
        }  # fmt: skip
        self.account(request.route.template, request_id, request.name, 200,
                     time.perf_counter() - start, {"source": request.source})  # fmt: skip
        return respond.json_response(200, body, request_id, close=head.close)

    def fail(
        self,
        err: AgentError,
        route: Route,
        dialect: Dialect,
        head: Head,
        start: float,
        request: Request | None = None,
        caller: Caller = ANONYMOUS,
    ) -> bytes:
        """``err`` answered in ``dialect``, with its access line."""
        state = self.state
        request_id = state.next_request_id()
        data, status = respond.error(err, dialect, request_id, close=head.close)
        if head.method == b"HEAD":  # its answer has no body (HEAD is always refused)
            data = data[: data.index(b"\r\n\r\n") + 4]
        reason = _AUTH_FAILURES.get(type(err))
        if reason is not None:
            state.metrics.auth_failures.labels(reason).inc()
        ctx: dict[str, Any] = {"error": err.code}
        if caller.principals:
            ctx["principal"] = caller.principal
            ctx.update(caller.detail)
        if request is not None and request.source:
            ctx["source"] = request.source
        name = request.name if request is not None else None
        self.account(route.template, request_id, name, status, time.perf_counter() - start, ctx)
        return data

    def crashed(self, head: Head) -> bytes:
        """A bug on the request path: logged with its traceback, answered 500, closed."""
        request_id = self.state.next_request_id()
        errlog.exception("request_failed", request_id=request_id)
        head.close = True
        err = AgentError("internal error; see the agent's log for this request id")
        return respond.error(err, self.dialect, request_id, close=True)[0]

    def refusal(self, err: AgentError) -> bytes:
        """The answer to a connection refused at the limit (then closed)."""
        return respond.error(err, self.dialect, self.state.next_request_id(), close=True)[0]

    # ------------------------------------------------------------------ accounting

    def account(
        self,
        route: str,
        request_id: str,
        name: str | None,
        status: int,
        elapsed: float,
        ctx: dict[str, Any],
    ) -> None:
        """Metrics and the access line for one answered request. Refused requests' lines
        are limited to :data:`REFUSED_LINES_PER_SECOND`; the rest are counted and
        summarised (a flood of bad requests never floods the log)."""
        state = self.state
        state.metrics.observe_request(route, status, elapsed)
        outcome = ctx.get("cache")
        if outcome is not None:
            state.metrics.cache_outcome(outcome)
        logging_cfg = state.config.logging
        if not (logging_cfg.access_log or status >= 400 or outcome is not None):
            return
        if 400 <= status < 500:
            now = int(time.monotonic())
            if now != self._lines_at:
                self._lines_at, self._lines = now, 0
            self._lines += 1
            if self._lines > REFUSED_LINES_PER_SECOND:
                state.refused_counts[status] = state.refused_counts.get(status, 0) + 1
                state.metrics.log_lines_suppressed.inc()
                return
        if name is not None and len(name) > LOGGED_NAME:
            name = name[:LOGGED_NAME] + "..."
        log.info(
            "request",
            request_id=request_id,
            route=route,
            name=name,
            status=status,
            duration_ms=round(elapsed * 1000, 3),
            **ctx,
        )


def count_hit(state: AgentState, route: str, elapsed: float) -> None:
    """A cache hit not logged one by one: metrics, and the count for the summary line."""
    state.metrics.observe_hit(route, elapsed)
    counts = state.hit_counts
    counts[route] = counts.get(route, 0) + 1


def _routes_to(state: AgentState, name: str, source: str) -> bool:
    try:
        provider = state.router.route(name)
        check_name_for(name, provider.name_rule)
    except AgentError:
        return False
    return provider.name == source


def _field(
    request: Request, entry: Entry, request_id: str, stale_age: float | None, close: bool
) -> bytes:
    """One key of a JSON secret: its value alone (``format=raw``) or in the native shape."""
    record = entry.record
    key = request.field or ""
    data = render.json_object(record)
    if data is None:
        raise SecretNotJson(
            f"secret {record.name!r} is not a JSON object, so it has no field "
            f"{key[: grammar.SHOWN]!r}",
            hint="leave out ?field= to read the whole value",
        )
    if key not in data:
        raise FieldNotFound(
            f"secret {record.name!r} has no field {key[: grammar.SHOWN]!r}",
            hint=f"its fields are: {', '.join(sorted(data)[:20])}",
        )
    value = data[key]
    extra = b""
    if stale_age is not None:
        extra += b'Age: %d\r\nWarning: 110 kms-agent "Response is Stale"\r\n' % int(stale_age)
    if request.shape == "raw":
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        return respond.response(200, respond.TEXT, text.encode(), request_id, extra=extra,
                                close=close)  # fmt: skip
    body = render.native_dict(record)
    body["field"] = key
    body["value"] = value
    if stale_age is not None:
        body["stale"] = True
    return respond.json_response(200, body, request_id, extra=extra, close=close)


def _vault_health() -> dict[str, Any]:
    return {
        "initialized": True,
        "sealed": False,
        "standby": False,
        "performance_standby": False,
        "server_time_utc": int(time.time()),
        "version": "kms-agent",
    }


def _vault_mount(request_id: str) -> dict[str, Any]:
    """What the Vault CLI's preflight asks: the mount serving a path, as KV version 2."""
    mount = {
        "accessor": "kv_kms_agent",
        "config": {"default_lease_ttl": 0, "force_no_cache": False, "max_lease_ttl": 0},
        "description": "secrets served by kms-agent",
        "external_entropy_access": False,
        "local": True,
        "options": {"version": "2"},
        "path": f"{grammar.VAULT_MOUNT}/",
        "seal_wrap": False,
        "type": "kv",
        "uuid": "",
    }
    return {
        "request_id": request_id, "lease_id": "", "renewable": False, "lease_duration": 0,
        "data": mount, "wrap_info": None, "warnings": None, "auth": None,
    }  # fmt: skip


def _vault_self(request_id: str) -> dict[str, Any]:
    """``auth/token/lookup-self`` for a caller whose token the agent accepted (the token
    itself is never echoed)."""
    data = {
        "accessor": "", "creation_time": 0, "creation_ttl": 0, "display_name": "kms-agent",
        "entity_id": "", "expire_time": None, "explicit_max_ttl": 0, "id": "",
        "issue_time": "", "meta": None, "num_uses": 0, "orphan": True,
        "path": "auth/token/lookup-self", "policies": ["default"], "renewable": False,
        "ttl": 0, "type": "service",
    }  # fmt: skip
    return {
        "request_id": request_id, "lease_id": "", "renewable": False, "lease_duration": 0,
        "data": data, "wrap_info": None, "warnings": None, "auth": None,
    }  # fmt: skip
