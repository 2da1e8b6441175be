"""The agent's listeners: the secrets listeners (the protocol and pipeline, one per
``server.listen`` entry, each speaking its dialect) and the metrics/health listener
(aiohttp). Binding, the connection limit, the descriptor limit and shutdown live here."""

from __future__ import annotations

import asyncio
import grp
import os
import resource
import stat
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from kms_agent.config import Config, ListenAddress, ServerConfig, listen_key
from kms_agent.errors import ConfigError
from kms_agent.front import Front
from kms_agent.grammar import Dialect
from kms_agent.protocol import Connection, Connections, Limits
from kms_agent.state import AgentState

log = structlog.get_logger("kms_agent.listeners")

#: Connections the kernel queues before accept(). asyncio's default is 100, few for a node
#: agent whose pods all reconnect at once. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096
#: Descriptors kept free beyond the connection limit: sources' sessions, files, watchers.
FD_RESERVE = 64


def limits(config: Config) -> Limits:
    server = config.server
    return Limits(
        max_line=server.max_header_bytes,
        max_field=server.max_header_bytes,
        max_headers=server.max_headers,
        max_head=server.max_head_bytes,
        head_timeout=server.head_timeout,
        keepalive_timeout=server.keepalive_timeout,
    )


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft descriptor limit to the hard one; refuse a connection limit the
    process could not honour (accept would fail, and refusals could not be answered)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if max_connections + FD_RESERVE > soft:
        raise ConfigError(
            f"server.max_connections: {max_connections} needs {max_connections + FD_RESERVE} "
            f"file descriptors, and this process may open {soft}",
            hint=f"lower server.max_connections to {max(1, soft - FD_RESERVE)}, "
            "or raise the descriptor limit (ulimit -n, LimitNOFILE=)",
        )
    return soft


class SecretsListeners:
    """Every ``server.listen`` entry, sharing one connection limit."""

    def __init__(self, state: AgentState) -> None:
        self.state = state
        metrics = state.metrics
        self.connections = Connections(
            lambda: state.config.server.max_connections,
            lambda reason: metrics.connections_closed.labels(reason).inc(),
        )
        self.servers: list[asyncio.AbstractServer] = []
        self.fronts: list[Front] = []
        self.addresses: list[str] = []

    async def start(self, listen: tuple[tuple[str, ListenAddress], ...] | None = None) -> None:
        """Bind ``server.listen`` (or ``listen``, the same shape)."""
        config = self.state.config
        raise_fd_limit(config.server.max_connections)
        lim = limits(config)
        for i, (dialect, address) in enumerate(listen or config.server.listeners):
            front = Front(self.state, Dialect(dialect))
            self.fronts.append(front)

            def factory(front: Front = front) -> Connection:
                return Connection(front, self.connections, lim)

            try:
                server = await _bind(factory, address)
            except OSError as exc:
                raise ConfigError(
                    f"{listen_key(i, len(config.server.listen))}: cannot listen on {address} "
                    f"({exc.strerror or exc})",
                    hint="another process (another kms-agent?) may hold it; "
                    "pick another with --listen",
                ) from None
            if address.unix_path:
                _own_socket(address.unix_path, config.server)
            self.servers.append(server)
            self.addresses += _addresses(server)

    async def stop(self, grace: float) -> None:
        """Stop accepting; idle connections close now, busy ones within ``grace``."""
        for server in self.servers:
            server.close()
        self.connections.close_idle()
        await self.connections.wait_closed(grace)


class MetricsListener:
    """``/metrics``, ``/healthz`` and ``/readyz`` (aiohttp), for scrapers and probes."""

    def __init__(self, state: AgentState) -> None:
        self.state = state
        self.runner: web.AppRunner | None = None
        self.addresses: list[str] = []

    async def start(self) -> None:
        config = self.state.config
        address = config.metrics.address
        if address is None:
            return
        self.runner = web.AppRunner(_metrics_app(self.state), access_log=None, handle_signals=False)
        await self.runner.setup()
        site: web.BaseSite = (
            web.UnixSite(self.runner, address.unix_path)
            if address.unix_path
            else web.TCPSite(self.runner, address.host, address.port)
        )
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen: cannot listen on {config.metrics.listen} ({exc.strerror or exc})",
                hint='pick another address, or metrics.listen = "" to turn metrics off',
            ) from None
        self.addresses = [_format_address(a) for a in self.runner.addresses]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _metrics_app(state: AgentState) -> web.Application:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

    async def metrics(_request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(state.metrics.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        status, body = state.readiness()
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    # Probes reach the pod IP, not loopback: health answers here too (no secret data).
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _bind(
    factory: Callable[[], Connection], address: ListenAddress
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    if address.unix_path:
        _remove_stale_socket(address.unix_path)
        return await loop.create_unix_server(factory, address.unix_path, backlog=LISTEN_BACKLOG)
    return await loop.create_server(
        factory, address.host, address.port, reuse_address=True, backlog=LISTEN_BACKLOG
    )


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed run blocks bind(); anything else is left alone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _addresses(server: asyncio.AbstractServer) -> list[str]:
    sockets = getattr(server, "sockets", None) or ()
    return [_format_address(sock.getsockname()) for sock in sockets]


def _format_address(addr: Any) -> str:
    if isinstance(addr, str):
        return f"unix:{addr}"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class QuietLoopErrors:
    """A loop exception handler that writes one line per kind of error a second and counts
    the rest: accept() failing for lack of descriptors must not write a traceback per try."""

    def __init__(self) -> None:
        self._at: dict[str, int] = {}
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "loop error"))
        now = int(time.monotonic())
        if self._at.get(message) == now:
            self.suppressed += 1
            return
        if len(self._at) > 64:
            self._at.clear()
        self._at[message] = now
        exc = context.get("exception")
        log.error(
            "loop_error",
            message=message[:200],
            error_type=type(exc).__name__ if exc is not None else None,
            error=str(exc)[:200] if exc is not None else None,
            suppressed_before=self.suppressed,
        )


def _own_socket(path: str, server: ServerConfig) -> None:
    """A Unix-socket listener's mode and group, as configured: who may connect at all
    (what each may read is the policies' business, by the peer's uid and groups)."""
    group = server.socket_group
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            os.chown(path, -1, gid)
        except (KeyError, OSError) as exc:
            raise ConfigError(
                f"server.socket_group: cannot give {path} to group {group!r} "
                f"({type(exc).__name__})",
                hint="name an existing group the agent is a member of (or run it as root)",
            ) from None
    os.chmod(path, server.socket_permissions)  # noqa: PTH101
