"""What the cloud providers share: their settings for limits and deadlines, one keep-alive
session per source, the quota limiter, retries inside the call's deadline, and the
credentials they keep fresh."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import aiohttp

from kms_agent.credentials import Refreshing
from kms_agent.errors import (
    AgentError,
    ConfigError,
    HeldByLimiter,
    Unavailable,
    UpstreamTimeout,
)
from kms_agent.providers import Changed, ProviderBase
from kms_agent.providers.options import CloudOptions
from kms_agent.upstream import (
    CURRENT_ENDPOINT,
    Endpoint,
    Endpoints,
    TokenBucket,
    UpstreamStats,
    check_endpoint,
    new_session,
    with_retries,
)

_T = TypeVar("_T")


class CloudProvider(ProviderBase):
    """Base of the alibaba, huawei, aws and vault providers (not a provider by itself)."""

    name: str
    credentials: Refreshing
    ca_file: str | None = None
    endpoints: Endpoints

    def _limits(self, options: CloudOptions) -> None:
        """The source's quota (checked by the options), deadline and attempts."""
        qps = options.qps
        self.timeout = options.timeout_seconds
        self.attempts = options.max_attempts
        self.limiter = TokenBucket(qps, burst=max(1.0, qps / 10))
        self.stats = UpstreamStats()
        #: The source's last transient failure and when (monotonic): what a call held back
        #: by the limiter reports.
        self._last_failure: tuple[float, AgentError | None] = (0.0, None)
        self._session: aiohttp.ClientSession | None = None

    def _endpoints(
        self, options: CloudOptions, where: str, key: str, given: str | None, default: str | None
    ) -> str:
        """The source's endpoints: ``given`` (the ``key`` setting, else ``default``), or the
        list ``endpoints``, tried in that order (failover). Returns the first."""
        listed = options.endpoints
        if listed is not None:
            if given is not None or not listed:
                raise ConfigError(
                    f"{where}.endpoints: give one or more URLs here, or {key} alone, not both"
                )
            urls = [check_endpoint(url, f"{where}.endpoints[{i}]") for i, url in enumerate(listed)]
        elif given is None and default is None:
            raise ConfigError(f"{where}.{key}: required (or endpoints, a list)")
        else:
            urls = [check_endpoint(str(given or default), f"{where}.{key}")]
        self.endpoints = Endpoints(urls)
        return urls[0]

    def _base(self) -> Endpoint:
        """The endpoint this attempt goes to (the first outside a limited call)."""
        return CURRENT_ENDPOINT.get() or self.endpoints.primary

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = new_session(
                connect_timeout=min(3.0, self.timeout),
                total_timeout=self.timeout,
                ca_file=self.ca_file,
            )
        return self._session

    async def _limited(self, attempt: Callable[[float], Awaitable[_T]]) -> _T:
        """Run ``attempt(remaining_seconds)`` under the quota limiter, retrying what is
        retryable with jittered backoff, all inside ``timeout_seconds``.

        When the limiter would hold a call past its deadline while the source has just
        failed, the caller is told what the source said, not only that our limiter held
        the call: the limiter is full because of retries against a failing source."""
        deadline = time.monotonic() + self.timeout
        held: list[AgentError] = []

        async def limited(remaining: float) -> _T:
            try:
                waited = await self.limiter.acquire(deadline)
            except HeldByLimiter as exc:
                held.append(self._masked(exc))
                raise  # not retried: the limiter would hold the next attempt as well
            if waited:
                self.stats.rate_limited += 1
            endpoints = self.endpoints
            endpoint = endpoints.pick()
            token = CURRENT_ENDPOINT.set(endpoint)
            try:
                result = await attempt(max(0.1, min(remaining, deadline - time.monotonic())))
            except AgentError as exc:
                if exc.transient:
                    self._last_failure = (time.monotonic(), exc)
                if isinstance(exc, Unavailable | UpstreamTimeout):
                    endpoints.failed(endpoint)  # the retry goes to the next endpoint
                else:
                    endpoints.answered(endpoint)
                raise
            finally:
                CURRENT_ENDPOINT.reset(token)
            endpoints.answered(endpoint)
            answered = self.stats.answered_by
            answered[endpoint.host] = answered.get(endpoint.host, 0) + 1
            return result

        try:
            return await with_retries(
                limited, deadline=deadline, attempts=self.attempts, retryable=_retryable
            )
        except HeldByLimiter:
            raise held[-1] from None

    def _masked(self, held: HeldByLimiter) -> AgentError:
        """The source's own recent transient failure (within one deadline), as a fresh
        error saying this call was held back; else the limiter's error itself."""
        at, last = self._last_failure
        if last is None or time.monotonic() - at > self.timeout:
            return held
        said = copy.copy(last)
        said.message = f"{last.message} (this call was not sent: {held.message})"
        said.args = (said.message,)
        return said

    def changes(self) -> AsyncIterator[Changed] | None:
        return None

    async def close(self) -> None:
        await self.credentials.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retryable(exc: AgentError) -> bool:
    """Transient failures are retried; a call the limiter held is not (it is answered at
    once, with the source's last error if it has just failed)."""
    return exc.transient and not isinstance(exc, HeldByLimiter)
