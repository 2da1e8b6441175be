"""The agent's lifecycle: open sources, load tokens, serve, watch, reload, drain, close.

Start: tokens → sources opened → cache → listeners → watchers → source checks and
prefetch → ready (``/readyz`` 200, ``READY=1``).
Reload (SIGHUP, or a change to the config file or a token file): :mod:`kms_agent.reload`.
The listeners are :mod:`kms_agent.listeners`; readiness is the state's phase; the cache
fetches through a :class:`~kms_agent.fetcher.Fetcher`. The agent only composes them.
Stop (SIGTERM/SIGINT): readiness 503, ``STOPPING=1``, optional drain delay, listener
closed, in-flight requests finish within the grace period, sources closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from kms_agent import providers
from kms_agent.auth import (
    Authenticator,
    ServiceAccounts,
)
from kms_agent.cache import Cache
from kms_agent.config import Config
from kms_agent.errors import AgentError
from kms_agent.fetcher import Fetcher
from kms_agent.listeners import MetricsListener, QuietLoopErrors, SecretsListeners
from kms_agent.metrics import Metrics
from kms_agent.reload import Reloader, check_files, resolve_tokens
from kms_agent.state import AgentState, Phase
from kms_agent.systemd import Notifier, release_free_memory

log = structlog.get_logger("kms_agent.agent")


class Agent:
    """One running agent. ``start`` then ``stop``; or ``run`` for both around the signals."""

    def __init__(
        self,
        config: Config,
        *,
        loader: Callable[[], Config] | None = None,
        environ: Mapping[str, str] | None = None,
        sources: list[tuple[tuple[str, ...], providers.Provider]] | None = None,
    ) -> None:
        self._config = config
        self._loader = loader
        self.environ = dict(os.environ if environ is None else environ)
        self._given_sources = sources
        self.stopping = asyncio.Event()
        #: Set once start() has finished and the agent reports ready.
        self.ready_event = asyncio.Event()
        #: Notified after every reload attempt, successful or not.
        self.reloaded = asyncio.Condition()
        self.notifier = Notifier(self.environ)
        self._tasks: list[asyncio.Task[Any]] = []
        #: Service-account verification (``[auth.kubernetes]``), and whether its JWKS is
        #: being kept fresh yet.
        self.accounts: ServiceAccounts | None = None
        self._jwks_kept = False
        self.listeners: SecretsListeners | None = None
        self.metrics_listener: MetricsListener | None = None
        self._state: AgentState | None = None
        self.addresses: list[str] = []
        self.metrics_addresses: list[str] = []
        self.reloader: Reloader | None = None

    @property
    def config(self) -> Config:
        """The config in force (the state's, once started: reloads swap it there)."""
        return self._state.config if self._state is not None else self._config

    @property
    def state(self) -> AgentState:
        if self._state is None:
            raise RuntimeError("the agent has not started")
        return self._state

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        config = self.config
        tokens = resolve_tokens(config, self.environ)
        built = self._given_sources or [
            (s.match, providers.create(s, config, self.environ)) for s in config.sources
        ]
        router = providers.Router(built)
        self.accounts = accounts = ServiceAccounts.from_config(config.auth.kubernetes)
        metrics = Metrics()
        metrics.track_sources(router.providers)
        for _, provider in built:
            await provider.open()
        cache = Cache(
            Fetcher(router, metrics),
            config.cache,
            on_evict=metrics.eviction,
            on_refresh=metrics.refresh,
        )
        metrics.track_cache(lambda: (len(cache), cache.bytes))
        self._state = state = AgentState(
            config=config,
            router=router,
            cache=cache,
            auth=Authenticator(
                config.auth.headers,
                tokens,
                verifier=accounts.verifier if accounts else None,
                reviewer=accounts.reviewer if accounts else None,
            ),
            metrics=metrics,
            on_phase=self._phase_changed,
        )
        asyncio.get_running_loop().set_exception_handler(QuietLoopErrors())
        self.reloader = Reloader(state, config, self._loader, self.environ, self.notifier)
        self.reloader.after = self._reloaded
        check_files(state, tokens)
        log.info(
            "tokens_loaded",
            count=len(tokens.tokens),
            origins=list(tokens.origins),
            header=config.auth.headers[0],
        )
        await self._listen(state)
        self._tasks.append(asyncio.create_task(cache.run_maintenance(), name="cache-maintenance"))
        watching: list[asyncio.Event] = []
        for _, provider in built:
            changes = provider.changes()
            if changes is not None:
                watching.append(asyncio.Event())
                self._tasks.append(
                    asyncio.create_task(self._follow(provider.name, changes, watching[-1]))
                )
        watching.append(self.reloader.rewatch())
        for event in watching:  # changes made after readiness must not be missed
            await event.wait()
        self._tasks.append(asyncio.create_task(self._summarise_hits(), name="hit-summary"))
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval)))
        # Listening now: systemd may consider us started. /readyz waits for the sources.
        self.notifier.notify("READY=1", "STATUS=checking sources")
        if not await self._check_and_prefetch():
            self._tasks.append(asyncio.create_task(self._retry_checks(), name="source-checks"))

    def _phase_changed(self, phase: Phase, reason: str) -> None:
        if phase is Phase.READY:
            self.notifier.notify("STATUS=serving")
        elif phase is Phase.WAITING:
            self.notifier.notify(f"STATUS=waiting: {reason[:200]}")

    def _become_ready(self) -> None:
        state = self.state
        state.enter(Phase.READY)
        self.ready_event.set()
        release_free_memory()
        log.info(
            "ready",
            listen=self.addresses,
            metrics=self.metrics_addresses,
            sources=list(state.router.providers),
        )

    async def _retry_checks(self) -> None:
        """Until every source passes its check: back off 1 s doubling to 30 s."""
        delay = 1.0
        while self.state.phase is not Phase.DRAINING:
            await asyncio.sleep(delay)
            if await self._check_and_prefetch():
                return
            delay = min(delay * 2, 30.0)

    async def _listen(self, state: AgentState) -> None:
        self.listeners = SecretsListeners(state)
        await self.listeners.start()
        self.addresses = self.listeners.addresses
        self.metrics_listener = MetricsListener(state)
        await self.metrics_listener.start()
        self.metrics_addresses = self.metrics_listener.addresses

    async def _check_and_prefetch(self) -> bool:
        """Check every source; if all pass, prefetch and become ready. False if one failed."""
        state = self.state
        if self.accounts is not None:
            try:
                await self.accounts.open()
            except AgentError as exc:
                state.enter(Phase.WAITING, f"auth.kubernetes: {exc.code}: {exc.message}")
                log.error("jwks_load_failed", code=exc.code, message=exc.message, hint=exc.hint)
                return False
            if not self._jwks_kept:
                self._jwks_kept = True
                jwks = self.accounts.verifier.jwks
                self._tasks.append(asyncio.create_task(jwks.keep_fresh(), name="jwks"))
        for provider in state.router.providers.values():
            try:
                await provider.check()
            except AgentError as exc:
                state.enter(Phase.WAITING, f"source {provider.name}: {exc.code}: {exc.message}")
                log.error(
                    "source_check_failed",
                    source=provider.name,
                    code=exc.code,
                    message=exc.message,
                    hint=exc.hint,
                )
                return False
        for name in self.config.cache.prefetch:
            provider = state.router.route(name)
            try:
                await state.cache.get((provider.name, name, None, None))
            except AgentError as exc:
                log.warning("prefetch_failed", name=name, source=provider.name, code=exc.code)
        self._become_ready()
        return True

    # ------------------------------------------------------------------ watching and reload

    async def reload(self, reason: str) -> bool:
        """Re-read config and tokens; swap in what can change live. False if it failed."""
        if self.reloader is None:
            raise RuntimeError("the agent has not started")
        return await self.reloader.reload(reason)

    async def _reloaded(self) -> None:
        async with self.reloaded:
            self.reloaded.notify_all()

    async def _follow(self, source: str, changes: Any, started: asyncio.Event) -> None:
        # Watchers register with inotify on their first step, before their first suspension:
        # whoever sees ``started`` set can rely on later changes being caught.
        started.set()
        async for names in changes:
            dropped = self.state.cache.invalidate(source, names)
            log.info("source_changed", source=source, entries_dropped=dropped)

    def log_hit_summary(self) -> None:
        """One line for the cache hits not logged one by one since the last call, and one
        for the refused requests whose lines were held back."""
        state = self.state
        if state.hit_counts:
            counts, state.hit_counts = state.hit_counts, {}
            log.info("cache_hits", hits=counts, total=sum(counts.values()))
        if state.refused_counts:
            refused, state.refused_counts = state.refused_counts, {}
            log.warning(
                "requests_refused",
                by_status={str(k): v for k, v in refused.items()},
                total=sum(refused.values()),
            )

    async def _summarise_hits(self) -> None:
        while True:
            await asyncio.sleep(self.config.logging.hit_summary_interval)
            self.log_hit_summary()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ stop

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.begin_stop)
        loop.add_signal_handler(signal.SIGINT, self.begin_stop)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self._tasks.append(asyncio.create_task(self.reload("sighup")))
        )

    def begin_stop(self) -> None:
        """Readiness goes 503 at once; run() then drains and stops."""
        state = self._state
        if state is not None:
            state.enter(Phase.DRAINING)
        self.stopping.set()

    async def stop(self) -> None:
        self.begin_stop()
        grace = self.config.server.shutdown_grace
        state = self._state
        self.notifier.stopping()
        log.info("draining", grace_seconds=grace, drain_delay=self.config.server.drain_delay)
        if self.config.server.drain_delay and state is not None:
            await asyncio.sleep(self.config.server.drain_delay)  # let load balancers notice
        if self.listeners is not None:
            await self.listeners.stop(grace)  # idle connections closed, busy ones awaited
        if self.metrics_listener is not None:
            await self.metrics_listener.stop()
        if state is not None:
            self.log_hit_summary()  # the last interval's hits
        watch = self.reloader.stop() if self.reloader is not None else None
        if watch is not None:
            self._tasks.append(watch)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if state is not None:
            await state.cache.close()
            for provider in state.router.providers.values():
                await provider.close()
        if self.accounts is not None:
            await self.accounts.close()
        log.info("stopped")

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, drain. The handlers stay installed until the
        loop closes, so a second signal during the drain cannot kill the process midway."""
        self.install_signal_handlers()
        try:
            await self.start()
            await self.stopping.wait()
        finally:
            await self.stop()
