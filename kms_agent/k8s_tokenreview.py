"""Callers identified by asking the API server about their token (TokenReview mode).

Offline verification (:mod:`kms_agent.k8s_identity`) cannot tell that a token's pod was
deleted: the token stays valid until it expires. In TokenReview mode the agent POSTs each
new token to ``/apis/authentication.k8s.io/v1/tokenreviews`` with its own service-account
token (which needs the ``system:auth-delegator`` ClusterRole) and takes the API server's
verdict, which does check the bound pod.

Each review costs the API server a request, so:

- with an offline verifier given (recommended), a token is verified offline first and a
  forgery never reaches the API server;
- answers are remembered by the token's SHA-256: an accepted token for
  :data:`TOKENREVIEW_CACHE_TTL` (capped at its ``exp``), which bounds how long a revoked
  token stays accepted, a refused one for :data:`TOKENREVIEW_NEGATIVE_TTL`;
- concurrent callers with one token share one review;
- new reviews are limited to :data:`TOKENREVIEW_RATE` a second (bursts of
  :data:`TOKENREVIEW_BURST`): past that, callers are answered 503 at once, and whatever
  the callers send, the agent never calls the API server faster.

The request body carries the token and the API server echoes it: neither body is ever
logged or put in a message.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from kms_agent.errors import (
    BadCredentials,
    ConfigError,
    Forbidden,
    Unauthorized,
    Unavailable,
    UpstreamTimeout,
)
from kms_agent.k8s_identity import (
    IN_CLUSTER_API_URL,
    IN_CLUSTER_CA_FILE,
    IN_CLUSTER_TOKEN_FILE,
    MAX_TOKEN_BYTES,
    VERIFIED_CACHE_ENTRIES,
    K8sIdentity,
    ServiceAccountVerifier,
    TokenCache,
    agent_bearer,
    api_session,
    make_identity,
    service_account_of,
)
from kms_agent.upstream import TokenBucket, check_endpoint, mapped_errors

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
#: An accepted token is re-reviewed after this long (seconds): a token revoked meanwhile
#: (its pod deleted) is accepted at most this much longer.
TOKENREVIEW_CACHE_TTL = 60.0
#: A refused token is answered from memory this long (a retrying caller costs nothing).
TOKENREVIEW_NEGATIVE_TTL = 10.0
#: New reviews a second, and the burst allowed above that rate.
TOKENREVIEW_RATE = 20.0
TOKENREVIEW_BURST = 40.0
#: Larger answers are refused unread.
TOKENREVIEW_MAX_BYTES = 64 * 1024

_EXTRA = "authentication.kubernetes.io/"
_HINT_REVIEW = "bind the agent's service account to the system:auth-delegator ClusterRole"


@dataclass(frozen=True, slots=True)
class _Verdict:
    identity: K8sIdentity | None  # None: refused


def _extra(extra: Mapping[str, Any], name: str) -> object:
    """One ``status.user.extra`` value (a list of one string), or None."""
    values = extra.get(_EXTRA + name)
    if isinstance(values, list) and len(values) == 1:
        return values[0]
    return None


def _unverified_exp(token: bytes) -> float | None:
    """The ``exp`` of a token the API server has just authenticated (so it is authentic),
    or None when the token is no JWT or carries no usable ``exp``."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        return None
    return float(exp)


def _identity_of(verdict: _Verdict) -> K8sIdentity:
    if verdict.identity is None:
        raise Forbidden(
            "the API server did not authenticate the token",
            hint="it may have expired, been revoked (its pod deleted) or be meant for "
            "another audience",
        )
    return verdict.identity


class TokenReviewer:
    """Verifies callers' tokens by TokenReview, optionally after an offline verification."""

    def __init__(
        self,
        audiences: tuple[str, ...],
        *,
        api_url: str = IN_CLUSTER_API_URL,
        token_file: Path = Path(IN_CLUSTER_TOKEN_FILE),
        ca_file: Path | None = Path(IN_CLUSTER_CA_FILE),
        offline: ServiceAccountVerifier | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        rate: float = TOKENREVIEW_RATE,
        burst: float = TOKENREVIEW_BURST,
        cache_entries: int = VERIFIED_CACHE_ENTRIES,
    ) -> None:
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise ConfigError("TokenReview audiences must be a non-empty list of names")
        if rate <= 0 or burst < 1:
            raise ConfigError("the TokenReview rate must be positive and its burst at least 1")
        self.audiences = audiences
        self._url = check_endpoint(api_url, "tokenreview api url") + TOKENREVIEW_PATH
        self._token_file = token_file
        self._ca_file = ca_file
        self._offline = offline
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._bucket = TokenBucket(rate, burst, clock=clock)
        self._answers: TokenCache[_Verdict] = TokenCache(cache_entries)
        self._inflight: dict[bytes, asyncio.Task[_Verdict]] = {}
        #: Reviews sent, and new tokens turned away by the rate limit (for metrics).
        self.reviews = 0
        self.throttled = 0

    def __repr__(self) -> str:
        return f"TokenReviewer({self._url!r}, audiences={self.audiences!r}, {self._answers!r})"

    async def verify(self, token: bytes) -> K8sIdentity:
        """The caller ``token`` proves, or Unauthorized (empty), Forbidden (refused here or
        by the API server), Unavailable (API server unreachable, or reviews over their
        rate), BadCredentials (the agent may not create TokenReviews)."""
        if not token:
            raise Unauthorized("no service-account token presented")
        if len(token) > MAX_TOKEN_BYTES:
            raise Forbidden("the token is too long to be a service-account token")
        digest = TokenCache.key(token)
        verdict = self._answers.get(digest, self._clock())
        if verdict is None:
            offline = await self._offline.verify_async(token) if self._offline else None
            task = self._inflight.get(digest)
            if task is None:
                task = asyncio.ensure_future(self._review(token, digest, offline))
                self._inflight[digest] = task
                task.add_done_callback(lambda t: self._done(digest, t))
            verdict = await asyncio.shield(task)
        return _identity_of(verdict)

    def cached(self, token: bytes) -> K8sIdentity | None:
        """The remembered verdict on ``token`` without waiting: its identity, None when it
        has not been reviewed (await :meth:`verify`), Forbidden when it was refused."""
        verdict = self._answers.get(TokenCache.key(token), self._clock())
        return None if verdict is None else _identity_of(verdict)

    async def close(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    def _done(self, digest: bytes, task: asyncio.Task[_Verdict]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved: awaiting callers re-raise it themselves

    async def _review(self, token: bytes, digest: bytes, offline: K8sIdentity | None) -> _Verdict:
        try:
            await self._bucket.acquire(deadline=self._clock())
        except UpstreamTimeout:
            self.throttled += 1
            raise Unavailable(
                "too many new service-account tokens to review right now",
                hint="retry in a second",
            ) from None
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            raise Forbidden("the token is not a well-formed JWT") from None
        status = await self._post(text)
        now = self._clock()
        if status.get("authenticated") is not True:
            verdict = _Verdict(None)
            self._answers.put(digest, verdict, now + TOKENREVIEW_NEGATIVE_TTL, now)
            return verdict
        identity = self._identity(status, token, offline, now)
        until = min(now + TOKENREVIEW_CACHE_TTL, identity.expires_at)
        verdict = _Verdict(identity)
        self._answers.put(digest, verdict, until, now)
        return verdict

    def _identity(
        self, status: Mapping[str, Any], token: bytes, offline: K8sIdentity | None, now: float
    ) -> K8sIdentity:
        """The caller the API server authenticated, in the words of its answer."""
        audiences = status.get("audiences")
        if not isinstance(audiences, list) or not set(audiences) & set(self.audiences):
            raise Forbidden(
                "the API server authenticated the token for another audience",
                hint="project the token with the agent's audience (kms-agent)",
            )
        user = status.get("user")
        if not isinstance(user, dict):
            raise Unavailable("the API server's TokenReview answer names no user")
        namespace, account = service_account_of(user.get("username"))
        extra = user.get("extra")
        extra = extra if isinstance(extra, dict) else {}
        if offline is not None:
            expires_at = offline.expires_at
        else:
            exp = _unverified_exp(token)
            expires_at = exp if exp is not None else now + TOKENREVIEW_CACHE_TTL
        identity = make_identity(
            namespace,
            account,
            pod=_extra(extra, "pod-name"),
            pod_uid=_extra(extra, "pod-uid"),
            node=_extra(extra, "node-name"),
            expires_at=expires_at,
        )
        if offline is not None and offline.principal != identity.principal:
            raise Forbidden("the API server and the token disagree about whose it is")
        return identity

    async def _post(self, token: str) -> Mapping[str, Any]:
        """POST one TokenReview; its ``status``."""
        what = "the API server's TokenReview endpoint"
        self.reviews += 1
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(self.audiences)},
        }
        headers = {
            "Authorization": "Bearer " + agent_bearer(self._token_file),
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        if self._session is None:
            self._session = api_session(self._ca_file)
        with mapped_errors(what):
            async with self._session.post(
                self._url, data=json.dumps(body), headers=headers, allow_redirects=False
            ) as resp:
                if resp.status in (401, 403):
                    raise BadCredentials(
                        f"{what} refused the agent's service-account token ({resp.status})",
                        hint=_HINT_REVIEW,
                    )
                if resp.status not in (200, 201):
                    raise Unavailable(f"{what} answered {resp.status}")
                raw = await resp.content.read(TOKENREVIEW_MAX_BYTES + 1)
        if len(raw) > TOKENREVIEW_MAX_BYTES:
            raise Unavailable(f"{what} answered more than {TOKENREVIEW_MAX_BYTES} bytes")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise Unavailable(f"{what} answered something that is not JSON") from None
        status = doc.get("status") if isinstance(doc, dict) else None
        if not isinstance(status, dict):
            raise Unavailable(f"{what} answered without a status")
        return status
