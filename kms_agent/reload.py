"""Reload: SIGHUP, or a change to the config file or a token file.

The new config and tokens are built completely first; only if that succeeds are tokens,
TTLs and bounds, log level and response shape swapped into the running state. Settings
that need a restart are logged as such, against what is running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
import watchfiles

from kms_agent import logging as agent_logging
from kms_agent.auth import TokenSet, ensure_generated_token, load_tokens, warn_if_exposed
from kms_agent.config import Config
from kms_agent.errors import ConfigError
from kms_agent.state import AgentState
from kms_agent.systemd import Notifier

log = structlog.get_logger("kms_agent.agent")

#: Settings read once at start. A reload that changes them says a restart is needed.
RESTART_KEYS = (
    "server.listen",
    "server.allow_non_loopback",
    "server.shutdown_grace",
    "server.keepalive_timeout",
    "server.max_header_bytes",
    "server.max_headers",
    "server.max_head_bytes",
    "server.head_timeout",
    "server.socket_mode",
    "server.socket_group",
    "auth.kubernetes",
    "metrics.listen",
    "data_dir",
    "runtime_dir",
    "sources",
)
TOKEN_FILE_MODE = 0o640


TOKEN_FILE_MODE = 0o640


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


def _dotted(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_files(state: AgentState, tokens: TokenSet) -> None:
    """Warn (and count) token and source files readable beyond what they should be."""
    metrics = state.metrics
    for path in tokens.files:
        if warn_if_exposed(path, "token file", TOKEN_FILE_MODE):
            metrics.file_warnings.labels("token").inc()
    for provider in state.router.providers.values():
        for kind, path, mode in provider.sensitive_files:
            if warn_if_exposed(path, kind, mode):
                metrics.file_warnings.labels(kind).inc()


class Reloader:
    """Re-reads config and tokens into ``state``; watches the files they came from."""

    def __init__(
        self,
        state: AgentState,
        started: Config,
        loader: Callable[[], Config] | None,
        environ: Mapping[str, str],
        notifier: Notifier,
    ) -> None:
        self.state = state
        self._started = started
        self._loader = loader
        self.environ = environ
        self.notifier = notifier
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        #: Called after every reload attempt (the agent notifies its waiters).
        self.after: Callable[[], Awaitable[None]] | None = None

    @property
    def config(self) -> Config:
        return self.state.config

    def _watched_files(self) -> list[Path]:
        files = list(self.state.auth.token_set.files)
        if self.config.path:
            files.append(Path(self.config.path))
        files += (Path(name) for name in self.config.policy_files)
        return files

    def rewatch(self) -> asyncio.Event:
        """(Re)start the watcher over the directories of the config file, the token files
        and the policy files."""
        if self._watch_task is not None:
            self._watch_task.cancel()
        started = asyncio.Event()
        files = self._watched_files()
        if files:
            self._watch_task = asyncio.create_task(self._watch(files, started), name="file-watch")
        else:
            started.set()
        return started

    async def _watch(self, files: list[Path], started: asyncio.Event) -> None:
        # Directories, not files: Kubernetes swaps a ..data symlink rather than the file.
        names = {p.name for p in files}
        dirs = sorted({str(p.parent) for p in files})
        started.set()  # see _follow
        async for batch in watchfiles.awatch(*dirs, debounce=50, step=10):
            touched = {Path(path).name for _, path in batch}
            if touched & names or any(n.startswith("..") for n in touched):
                await self.reload("file_changed")

    async def reload(self, reason: str) -> bool:
        """Re-read config and tokens; swap in what can change live. False if it failed."""
        ok = await self._reload(reason)
        if self.after is not None:
            await self.after()
        return ok

    async def _reload(self, reason: str) -> bool:
        async with self._lock:
            state = self.state
            self.notifier.reloading()
            try:
                new = self._loader() if self._loader is not None else self.config
                tokens = resolve_tokens(new, self.environ)
            except ConfigError as exc:
                state.metrics.config_reloads.labels("error").inc()
                log.error(
                    "config_reload_failed", reason=reason, message=exc.message, kept="previous"
                )
                self.notifier.ready()
                return False
            old = self.config
            # Against what is running, not the previous reload: a restart stays required.
            restart = [k for k in RESTART_KEYS if _dotted(self._started, k) != _dotted(new, k)]
            old_files = set(self._watched_files())
            state.config = new
            state.auth.update(tokens, new.auth.headers)
            state.cache.reconfigure(new.cache)
            if new.logging != old.logging:
                agent_logging.configure(new.logging)
            check_files(state, tokens)
            if set(self._watched_files()) != old_files:
                self.rewatch()
            state.metrics.config_reloads.labels("success").inc()
            log.info(
                "config_reloaded",
                reason=reason,
                tokens=len(tokens.tokens),
                restart_required=restart,
            )
            if restart:
                log.warning("restart_required", settings=restart)
            self.notifier.ready()
            return True

    def stop(self) -> asyncio.Task[None] | None:
        """Stop watching; the task to await, if one ran."""
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
        return task
