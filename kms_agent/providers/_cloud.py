"""What the cloud providers share: their settings for limits and deadlines, one keep-alive
session per source, the quota limiter, retries inside the call's deadline, the credentials
they keep fresh, and the one send path.

Every call of every cloud goes the same way (:meth:`CloudProvider._send`): the provider
builds a :class:`~kms_agent.signing.Request`; its :attr:`~CloudProvider.signer` signs it
with the current credentials; :func:`kms_agent.upstream.send` sends it under the one error
mapping; a refusal is turned into an error by the provider's pure
:meth:`~CloudProvider.classify` (status, headers, body → error), and the side effects of an
error are taken by its type, here only (:meth:`~CloudProvider._refused`): stale
credentials are invalidated (the retry uses fresh ones), throttling is counted."""

from __future__ import annotations

import base64
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import aiohttp
import structlog

from kms_agent.credentials import Credentials, Refreshing, StaleCredentials
from kms_agent.errors import (
    AgentError,
    ConfigError,
    HeldByLimiter,
    InvalidUpstreamRequest,
    Throttled,
    Unavailable,
    UpstreamTimeout,
)
from kms_agent.model import SecretRecord, SecretValue
from kms_agent.providers import Changed, ProviderBase
from kms_agent.providers.options import CloudOptions
from kms_agent.signing import Request, Signer
from kms_agent.upstream import (
    CURRENT_ENDPOINT,
    Answer,
    Endpoint,
    Endpoints,
    TokenBucket,
    UpstreamStats,
    answer_time,
    check_endpoint,
    json_object,
    new_session,
    object_or_none,
    send,
    with_retries,
)

_T = TypeVar("_T")
log = structlog.get_logger("kms_agent.providers")


class CloudProvider(ProviderBase):
    """Base of the alibaba, huawei, aws and vault providers (not a provider by itself)."""

    name: str
    credentials: Refreshing
    ca_file: str | None = None
    endpoints: Endpoints
    #: The provider's name in config ("aws"): its log events and repr say it.
    kind: ClassVar[str]
    #: What the store is called in errors ("AWS Secrets Manager").
    service: ClassVar[str]
    #: Which kind of credentials the source holds ("web_identity", "approle", ...).
    credential_type: str
    #: How its requests are signed.
    signer: Signer

    def __repr__(self) -> str:
        endpoint = self.endpoints.primary.url
        return f"{self.kind}.Provider({self.name!r}, {endpoint!r}, {self.credential_type})"

    async def open(self) -> None:
        self._http()
        log.info(
            "source_opened",
            provider=self.kind,
            source=self.name,
            endpoint=self.endpoints.primary.url,
            credentials=self.credential_type,
            **self._described(),
        )

    def _described(self) -> dict[str, str]:
        """What else the source's opening log line says (beside endpoint and credentials)."""
        return {}

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Reading an answer's fields: one missing or of the wrong type is the store's
        failure (Unavailable), named but never shown."""
        try:
            yield
        except KeyError as exc:
            raise Unavailable(f"{self.service} answered without {exc!s:.40}") from None
        except (TypeError, AttributeError, ValueError, ArithmeticError) as exc:
            raise Unavailable(
                f"{self.service} answered a field it cannot have ({type(exc).__name__})"
            ) from None

    def _record(
        self, name: Any, data: Any, *, binary: bool, version_id: Any, stages: Iterable[Any],
        created: Any, secret_type: Any = None, extra: Mapping[str, Any] | None = None,
    ) -> SecretRecord:  # fmt: skip
        """A version as the store answers it: ``data`` is the text, or base64 of the bytes
        when ``binary``. Read it inside :meth:`_reading`."""
        raw = base64.b64decode(str(data)) if binary else str(data).encode("utf-8")
        return SecretRecord(
            name=str(name),
            value=SecretValue(raw),
            data_type="binary" if binary else "text",
            version_id=str(version_id),
            version_stages=tuple(str(s) for s in stages),
            created=answer_time(created),
            source=self.name,
            secret_type=str(secret_type or "Generic"),
            extra={k: str(v) for k, v in (extra or {}).items()},
        )

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
    ) -> None:
        """The source's endpoints: ``given`` (the ``key`` setting, else ``default``), or the
        list ``endpoints``, tried in that order (failover)."""
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

    async def _send(
        self,
        request: Request,
        parse: Callable[[bytes], _T],
        *,
        name: str = "",
        held: Refreshing | None = None,
    ) -> _T:
        """``parse`` of the body of a 200 answer to ``request``, signed with ``held`` (a
        role's credentials), else the source's; under the limiter, retried within the
        deadline. An answer ``parse`` cannot read fails its attempt (it is retried and
        its endpoint failed over, like any broken answer). ``name`` is the secret the call
        is about (for the errors' words)."""
        credentials = held or self.credentials

        async def attempt(remaining: float) -> _T:
            creds = await credentials.get()
            answer = await self._exchange(request, creds, remaining)
            try:
                if answer.status == 200 and not self._refuses(answer.body):
                    return parse(answer.body)
                raise self.classify(answer.status, answer.headers, answer.body, name, creds)
            except AgentError as error:
                raise self._refused(error, creds, credentials) from None

        return await self._limited(attempt)

    def _refuses(self, body: bytes) -> bool:
        """Whether a 200 answer is a refusal all the same (a store that says so in it)."""
        return False

    def _foreign(self, status: int) -> AgentError:
        """A refusal whose body is not the store's own (not its JSON: a proxy's or load
        balancer's page): it says nothing about the secret, so it is never a not-found or
        a denial (which would drop cached values), only throttling or unavailability."""
        if status == 429:
            return Throttled(f"{self.service}: throttled (HTTP 429)")
        if 400 <= status < 500 and status not in (404, 408):
            # A proxy refusing this one request (400, 403, 413, 414): not a failing source
            # (no failover, no breaker), and not a word about the secret (no cache drop).
            return InvalidUpstreamRequest(
                f"{self.service} at {self._base().host} answered HTTP {status} with a page "
                "that is not its own (something in front of the store refused this call)",
                hint="check the proxy or gateway between the agent and the store",
            )
        return Unavailable(
            f"{self.service} at {self._base().host} answered HTTP {status} with a page that "
            "is not its own",
            hint="a proxy or load balancer between the agent and the store answered; check "
            "the endpoint and what sits in front of it",
        )

    async def _exchange(
        self, request: Request, creds: Credentials | None, timeout: float
    ) -> Answer:
        """One signed (when ``creds`` are given) request to this attempt's endpoint."""
        base = self._base()
        return await send(
            self._http(), base.url, request, what=f"{self.service} at {base.host}",
            timeout=timeout, signer=self.signer, credentials=creds,
        )  # fmt: skip

    #: Whether an empty 200 is an empty answer (Vault's 204-like replies) or a broken one.
    EMPTY_ANSWER_OK: ClassVar[bool] = False

    def _json(self, body: bytes) -> dict[str, Any]:
        """A 200's JSON object (the answer of every store but a KMS instance's dkms-gcs)."""
        return json_object(body, self.service, empty_ok=self.EMPTY_ANSWER_OK)

    def _parser(self, name: str, parse: Callable[[Any, str], Any] | None) -> Callable[[bytes], Any]:
        """A 200's JSON object, or ``parse(object, name)`` of it, as :meth:`_send` reads it."""
        if parse is None:
            return self._json
        return lambda body: parse(self._json(body), name)

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, name: str, creds: Credentials
    ) -> AgentError:
        """The error a refusal means (pure: no counting, no invalidating). For a store that
        refuses in JSON: its :meth:`_judge` of the object, or :meth:`_foreign` when the
        body is not one."""
        answer = self._said(body)
        if answer is None:
            return self._foreign(status)
        try:
            return self._judge(status, answer, name, creds)
        except (TypeError, AttributeError, ValueError, KeyError):
            return self._foreign(status)  # the store's shape, with fields of the wrong kind

    def _said(self, body: bytes) -> dict[str, Any] | None:
        """The store's own refusal in ``body`` (JSON, in the store's shape), or None."""
        answer = object_or_none(body)
        return answer if answer is not None and self._own(answer) else None

    def _own(self, answer: dict[str, Any]) -> bool:
        """Whether a JSON refusal has the store's own error shape (a gateway in front, like
        Kong or a WAF, answers JSON too, and says nothing about the secret)."""
        return True

    def _judge(
        self, status: int, answer: dict[str, Any], name: str, creds: Credentials
    ) -> AgentError:
        """The error of a refusal the store said in JSON ``answer`` (pure)."""
        raise NotImplementedError

    def _refused(self, error: AgentError, creds: Credentials, held: Refreshing) -> AgentError:
        """Take the side effects of ``error`` (by its type) and return it to be raised."""
        if isinstance(error, StaleCredentials):
            held.invalidate(creds)
        elif isinstance(error, Throttled):
            self.stats.throttled += 1
        return error

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
