"""The agent's lifecycle: open sources, load tokens, serve, watch, reload, drain, close."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import watchfiles
from aiohttp import web

from kms_agent import providers
from kms_agent.auth import Authenticator, TokenSet, ensure_generated_token, load_tokens
from kms_agent.cache import Cache, Key
from kms_agent.config import Config
from kms_agent.errors import AgentError, ConfigError
from kms_agent.model import SecretRecord
from kms_agent.server import AgentState, create_app

log = structlog.get_logger("kms_agent.agent")


def resolve_tokens(config: Config, environ: Mapping[str, str]) -> TokenSet:
    """The configured tokens, or a generated token file when none is configured."""
    tokens = load_tokens(config.auth, environ)
    if tokens.tokens:
        return tokens
    if not config.auth.generate_token:
        raise ConfigError(
            "auth: no token is configured and auth.generate_token is false; set auth.token_files "
            "or $KMS_TOKEN"
        )
    path = ensure_generated_token(config.runtime_path)
    return load_tokens(config.auth, environ, extra_files=(path,))


class Agent:
    """One running agent. ``start`` then ``wait``/``stop``; or ``run`` for both."""

    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self.state: AgentState | None = None
        self.addresses: list[str] = []

    async def _fetch(self, key: Key) -> SecretRecord:
        assert self.state is not None
        source, name, version_id, version_stage = key
        provider = self.state.router.providers[source]
        return await provider.get(name, version_id=version_id, version_stage=version_stage)

    async def start(self) -> None:
        config = self.config
        tokens = resolve_tokens(config, self.environ)
        built = [(s.match, providers.create(s, config)) for s in config.sources]
        router = providers.Router(built)
        for _, provider in built:
            await provider.open()
        cache = Cache(self._fetch, config.cache)
        self.state = state = AgentState(
            config=config,
            router=router,
            cache=cache,
            auth=Authenticator(config.auth.headers, tokens),
        )
        log.info(
            "tokens_loaded",
            count=len(tokens.tokens),
            origins=list(tokens.origins),
            header=config.auth.headers[0],
        )
        app = create_app(state)
        self._runner = web.AppRunner(
            app,
            shutdown_timeout=config.server.shutdown_grace,
            access_log=None,
            handle_signals=False,
        )
        await self._runner.setup()
        address = config.server.address
        site: web.BaseSite
        if address.unix_path:
            site = web.UnixSite(self._runner, address.unix_path)
        else:
            site = web.TCPSite(self._runner, address.host, address.port)
        await site.start()
        if address.unix_path:
            os.chmod(address.unix_path, 0o660)  # noqa: PTH101
        self.addresses = [_format_address(a) for a in self._runner.addresses]
        self._tasks.append(asyncio.create_task(cache.run_maintenance(), name="cache-maintenance"))
        for _, provider in built:
            changes = provider.changes()
            if changes is not None:
                self._tasks.append(asyncio.create_task(self._follow(provider.name, changes)))
        if tokens.files:
            self._tasks.append(asyncio.create_task(self._watch_tokens(tokens.files)))
        await self._check_and_prefetch()
        state.ready = True
        log.info("ready", listen=self.addresses, sources=[p.name for _, p in built])

    async def _check_and_prefetch(self) -> None:
        assert self.state is not None
        state = self.state
        for provider in state.router.providers.values():
            try:
                await provider.check()
            except AgentError as exc:
                state.not_ready_reason = f"source {provider.name}: {exc.code}"
                log.error(
                    "source_check_failed", source=provider.name, code=exc.code, message=exc.message
                )
                raise
        for name in self.config.cache.prefetch:
            provider = state.router.route(name)
            try:
                await state.cache.get((provider.name, name, None, None))
            except AgentError as exc:
                log.warning("prefetch_failed", name=name, source=provider.name, code=exc.code)

    async def _follow(self, source: str, changes: Any) -> None:
        assert self.state is not None
        async for names in changes:
            dropped = self.state.cache.invalidate(source, names)
            log.info("source_changed", source=source, entries_dropped=dropped)

    async def _watch_tokens(self, files: tuple[Path, ...]) -> None:
        # Watch the directories: Kubernetes swaps a ..data symlink rather than the file.
        dirs = sorted({str(p.parent) for p in files})
        async for _ in watchfiles.awatch(*dirs, debounce=50, step=10):
            self.reload_tokens()

    def reload_tokens(self) -> bool:
        assert self.state is not None
        try:
            tokens = resolve_tokens(self.config, self.environ)
        except ConfigError as exc:
            log.error("token_reload_failed", message=exc.message, kept="previous tokens")
            return False
        if tokens != self.state.auth.token_set:
            self.state.auth.update(tokens)
            log.info("tokens_reloaded", count=len(tokens.tokens), origins=list(tokens.origins))
        return True

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)

    async def stop(self) -> None:
        state = self.state
        if state is not None:
            state.draining = True
            state.ready = False
        log.info("draining", grace_seconds=self.config.server.shutdown_grace)
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if state is not None:
            await state.cache.close()
            for provider in state.router.providers.values():
                await provider.close()
        log.info("stopped")

    async def run(self) -> None:
        try:
            self.install_signal_handlers()
            await self.start()
            await self.stopping.wait()
        finally:
            await self.stop()


def _format_address(addr: Any) -> str:
    if isinstance(addr, str):
        return f"unix:{addr}"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
