"""Callers identified by their Kubernetes projected service-account token (node-agent mode).

A pod presents the token the kubelet projects for it (audience ``kms-agent``, short-lived,
rotated by the kubelet). The agent verifies it offline against the cluster's JWKS, read
from a file or fetched from the API server's ``/openid/v1/jwks``, and names the caller
``k8s:<namespace>:<serviceaccount>``. JOSE is PyJWT's (``jwt.PyJWK``, ``jwt.decode``); the
rules around it live here:

- Signatures: only the asymmetric algorithms of the allow-list (RS256 and ES256 by
  default); ``none`` and every HS* are refused before a key is looked up, and a key is used
  only with the one algorithm it was loaded for, so an RSA public key can never serve as an
  HMAC secret. The token must name its key (``kid``).
- Claims: ``iss`` and ``aud`` by PyJWT; ``exp``, ``nbf`` and ``iat`` against the injected
  clock with :data:`CLOCK_LEEWAY` (PyJWT reads the wall clock itself, so its time checks
  are switched off and done here, once); ``sub`` must be
  ``system:serviceaccount:<ns>:<sa>`` and agree with the ``kubernetes.io`` claim.
- Hot path: a verified token is remembered by its SHA-256 until it expires
  (:data:`VERIFIED_CACHE_ENTRIES` at most; expired entries go first, then the oldest), so
  a repeat caller costs a hash and a dict lookup, not a signature check. When the key set
  changes, remembered verifications made with a key that is gone are dropped.
- Unknown ``kid``: :meth:`ServiceAccountVerifier.verify` is synchronous and never does I/O
  beyond a rate-limited re-read of a JWKS file. A token whose key is not in the loaded set
  raises :class:`UnknownSigningKey`; the caller awaits
  :meth:`ServiceAccountVerifier.verify_async` (or :meth:`JwksSource.refresh_for_unknown_kid`
  and one retry), which re-fetches the JWKS at most once per
  :data:`UNKNOWN_KID_REFETCH_INTERVAL`, shared by every concurrent caller. A caller without
  a valid token can therefore never make the agent hammer the API server.

Error messages and reprs never carry the token nor any claim but the principal. The
online alternative, asking the API server (TokenReview), is :mod:`kms_agent.k8s_tokenreview`;
it shares :class:`TokenCache`, :func:`service_account_of` and :func:`make_identity`.
Everything here runs on one event loop; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiohttp
import jwt
import structlog
from jwt.types import Options

from kms_agent.errors import (
    AgentError,
    BadCredentials,
    ConfigError,
    Forbidden,
    Unauthorized,
    Unavailable,
)
from kms_agent.upstream import check_endpoint, mapped_errors, new_session

log = structlog.get_logger("kms_agent.k8s_identity")
_V = TypeVar("_V")

#: Allowed clock skew between the agent and the API server, for ``exp``, ``nbf``, ``iat``.
CLOCK_LEEWAY = 30.0
#: An unknown ``kid`` re-fetches the JWKS at most this often (seconds), whoever asks.
UNKNOWN_KID_REFETCH_INTERVAL = 10.0
#: Verified tokens remembered at most (expired ones are evicted first, then the oldest).
VERIFIED_CACHE_ENTRIES = 10_000
#: Accepted unless configured otherwise: what kube-apiserver signs with.
DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256")
#: The only algorithms that may be allowed at all: asymmetric signatures.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
#: A JWKS file is re-read for changes at most this often (seconds), on the hot path.
FILE_RECHECK_INTERVAL = 1.0
#: A fetched JWKS is kept for its ``Cache-Control: max-age``, clamped to these bounds,
#: or for the default when the answer has none.
JWKS_MIN_MAX_AGE = 30.0
JWKS_MAX_MAX_AGE = 3600.0
JWKS_DEFAULT_MAX_AGE = 300.0
#: After a failed background refresh, the next try waits this long.
JWKS_RETRY_INTERVAL = 30.0
#: Larger JWKS documents and tokens are refused unread.
JWKS_MAX_BYTES = 256 * 1024
MAX_TOKEN_BYTES = 16 * 1024
#: Timeouts of calls to the API server (seconds).
API_CONNECT_TIMEOUT = 5.0
API_TOTAL_TIMEOUT = 10.0

#: In a pod: where the API server publishes its JWKS, and the pod's own credentials.
IN_CLUSTER_API_URL = "https://kubernetes.default.svc"
IN_CLUSTER_JWKS_URL = IN_CLUSTER_API_URL + "/openid/v1/jwks"
#: The audience callers' projected tokens are minted for (``serviceAccountToken.audience``).
DEFAULT_AUDIENCE = "kms-agent"
IN_CLUSTER_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105
IN_CLUSTER_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

PRINCIPAL_PREFIX = "k8s"
SA_SUBJECT_PREFIX = "system:serviceaccount:"
_REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "nbf", "kubernetes.io"]
#: PyJWT checks signature, required claims, ``iss`` and ``aud``; times are checked here.
_DECODE_OPTIONS: Options = {
    "require": _REQUIRED_CLAIMS,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "enforce_minimum_key_length": True,
}
_KEY_TYPES = frozenset({"RSA", "EC"})
# DNS-1123 label (namespaces) and subdomain (service accounts, pods, nodes).
_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_UID = re.compile(r"[A-Za-z0-9-]{1,64}")
_SUBDOMAIN_MAX = 253

_HINT_PROJECT = (
    "mount a projected serviceAccountToken volume with audience kms-agent and send the "
    "token file's current content"
)


@dataclass(frozen=True, slots=True)
class K8sIdentity:
    """A caller proven by its service-account token. Holds no part of the token."""

    principal: str
    namespace: str
    service_account: str
    pod: str | None
    pod_uid: str | None
    node: str | None
    #: The token's ``exp`` (epoch seconds).
    expires_at: float


class UnknownSigningKey(Forbidden):
    """The token names a key (``kid``) the loaded JWKS lacks, or no JWKS is loaded yet.

    Raised by the synchronous :meth:`ServiceAccountVerifier.verify` instead of fetching:
    await :meth:`ServiceAccountVerifier.verify_async`, which refreshes (rate-limited) and
    retries once. Left unhandled it renders as 403.
    """

    def __init__(self, message: str, *, hint: str | None = None, kid: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kid = kid  # the header's claim: kept for the retry, never put in a message


def bearer_token(authorization: bytes) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <token>`` value, or None for another
    scheme or an empty one."""
    scheme, _, rest = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = rest.strip()
    return token or None


def cache_max_age(values: Iterable[str]) -> float:
    """How long a fetched JWKS is kept: ``max-age`` of the ``Cache-Control`` values (RFC 9111
    directives, comma-separated), :data:`JWKS_DEFAULT_MAX_AGE` without one, the floor for
    ``no-cache``/``no-store``; always within [JWKS_MIN_MAX_AGE, JWKS_MAX_MAX_AGE]."""
    age: float | None = None
    for value in values:
        for directive in value.split(","):
            name, _, arg = directive.partition("=")
            name = name.strip().lower()
            if name in ("no-cache", "no-store"):
                return JWKS_MIN_MAX_AGE
            if name == "max-age" and age is None:
                arg = arg.strip().strip('"')
                if arg.isdigit():
                    age = float(arg)
    if age is None:
        age = JWKS_DEFAULT_MAX_AGE
    return min(JWKS_MAX_MAX_AGE, max(JWKS_MIN_MAX_AGE, age))


def agent_bearer(token_file: Path) -> str:
    """The agent's own service-account token, read afresh (the kubelet rotates it)."""
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadCredentials(
            f"cannot read the agent's service-account token file {token_file} "
            f"({type(exc).__name__})"
        ) from None
    if not token:
        raise BadCredentials(f"the agent's service-account token file {token_file} is empty")
    return token


def api_session(ca_file: Path | None) -> aiohttp.ClientSession:
    """A session to the API server, TLS verified against the cluster's CA file."""
    return new_session(
        connect_timeout=API_CONNECT_TIMEOUT,
        total_timeout=API_TOTAL_TIMEOUT,
        ca_file=str(ca_file) if ca_file is not None else None,
    )


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable signing keys of one JWKS document, by ``kid``."""

    keys: Mapping[str, jwt.PyJWK]
    #: One fingerprint per key (its ``kid`` and public members): what a cached verification
    #: remembers, so it is dropped once its key is gone or replaced under the same ``kid``.
    refs: Mapping[str, bytes]
    origin: str
    loaded_at: float
    #: When to fetch again (``inf`` for a file, which is re-checked by its metadata).
    stale_at: float

    def __repr__(self) -> str:
        return f"KeySet(origin={self.origin!r}, kids={sorted(self.keys)!r})"

    @classmethod
    def parse(cls, data: bytes, *, origin: str, loaded_at: float, stale_at: float) -> KeySet:
        """Keys of a JWKS document: RSA and EC keys for signing, with a ``kid``, that PyJWK
        loads for an asymmetric algorithm. Others are skipped. Raises ValueError with a safe
        one-line message when the document is malformed or holds no usable key."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise ValueError("is not JSON") from None
        entries = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ValueError('is not a JWKS document (no "keys" list)')
        keys: dict[str, jwt.PyJWK] = {}
        refs: dict[str, bytes] = {}
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid or entry.get("kty") not in _KEY_TYPES:
                continue
            if entry.get("use", "sig") != "sig" or "d" in entry:
                continue  # an encryption key, or a private key published by mistake
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue
            if key.algorithm_name not in ASYMMETRIC_ALGORITHMS:
                continue
            if kid in keys:
                raise ValueError(f"names kid {kid!r} twice")
            keys[kid] = key
            refs[kid] = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).digest()
        if not keys:
            raise ValueError("holds no usable signing key (RSA or EC, with a kid)")
        return cls(keys, refs, origin, loaded_at, stale_at)


class JwksSource:
    """The cluster's JWKS, from a file or from the API server.

    File (:meth:`from_file`): re-read at most once per :data:`FILE_RECHECK_INTERVAL` on the
    hot path, or at once by :meth:`refresh`, and re-parsed when its content changed. The
    content is compared, not the mtime: file timestamps tick coarsely, and a same-size
    rewrite within one tick would go unseen.
    URL (:meth:`from_url`): fetched with the agent's own bearer token (its token file is
    re-read on every fetch: the kubelet rotates it) over TLS verified against ``ca_file``,
    kept for the answer's ``max-age`` (:func:`cache_max_age`). Until a refresh succeeds
    the previous keys stay in use: an unreachable API server does not lock callers out.
    """

    def __init__(
        self,
        *,
        path: Path | None = None,
        url: str | None = None,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (path is None) == (url is None):
            raise ConfigError("a JWKS source needs exactly one of a file path and a URL")
        self._path = path
        self._url = check_endpoint(url, "jwks url") if url is not None else None
        self._token_file = token_file
        self._ca_file = ca_file
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._keys: KeySet | None = None
        self._file_digest: bytes | None = None
        #: The file's (inode, size, mtime) when it was last read.
        self._stat_seen: tuple[int, int, int] | None = None
        self._next_check = -math.inf
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[KeySet] | None = None
        #: Loads attempted (file reads or HTTP fetches), and unknown-kid refetches that the
        #: rate limit turned away; the metrics collector may read them.
        self.loads = 0
        self.refetches_suppressed = 0

    @classmethod
    def from_file(cls, path: Path, *, clock: Callable[[], float] = time.monotonic) -> JwksSource:
        return cls(path=path, clock=clock)

    @classmethod
    def from_url(
        cls,
        url: str = IN_CLUSTER_JWKS_URL,
        *,
        token_file: Path | None = Path(IN_CLUSTER_TOKEN_FILE),
        ca_file: Path | None = Path(IN_CLUSTER_CA_FILE),
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> JwksSource:
        return cls(url=url, token_file=token_file, ca_file=ca_file, session=session, clock=clock)

    @property
    def origin(self) -> str:
        return str(self._path) if self._path is not None else str(self._url)

    def __repr__(self) -> str:
        return f"JwksSource({self.origin!r}, loaded={self._keys is not None})"

    def current(self) -> KeySet | None:
        """The keys in use now, without waiting (None before the first load). A file is
        re-read here, at most once per :data:`FILE_RECHECK_INTERVAL`."""
        if self._path is not None and self._keys is not None:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + FILE_RECHECK_INTERVAL
                with contextlib.suppress(AgentError):  # logged; the old keys stay
                    self._read_file(only_if_changed=True)
        return self._keys

    async def ensure_fresh(self) -> KeySet:
        """The keys, loading them first if none are loaded or their max-age has passed."""
        keys = self.current()
        if keys is None or self._clock() >= keys.stale_at:
            return await self.refresh()
        return keys

    async def refresh(self) -> KeySet:
        """Load now (one load at a time: concurrent callers share it). Raises the load's
        error (ConfigError for a file, Unavailable or BadCredentials for the API server);
        the previous keys stay in use."""
        task = self._inflight
        if task is None:
            task = asyncio.ensure_future(self._load())
            self._inflight = task
            task.add_done_callback(self._load_done)
        return await asyncio.shield(task)

    async def refresh_for_unknown_kid(self, kid: str | None) -> bool:
        """Refresh because a token named ``kid`` (None: because nothing is loaded), unless
        another load ran less than :data:`UNKNOWN_KID_REFETCH_INTERVAL` ago; a load under
        way is joined. Returns whether the key (or, for None, any key set) is now known."""
        keys = self._keys
        if keys is not None and kid is not None and kid in keys.keys:
            return True
        if self._path is not None and keys is not None:
            # A file is local: re-read it at once if it changed on disk (a stat, then the
            # read only when its size, mtime or inode moved), whatever the interval.
            if self._file_stat() != self._stat_seen:
                with contextlib.suppress(AgentError):
                    keys = self._read_file(only_if_changed=True)
            return kid is not None and kid in keys.keys
        if self._inflight is None and (
            self._clock() - self._last_attempt < UNKNOWN_KID_REFETCH_INTERVAL
        ):
            self.refetches_suppressed += 1
            return False
        try:
            keys = await self.refresh()
        except AgentError:
            return False
        return kid is None or kid in keys.keys

    async def keep_fresh(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Run as a background task: refresh a fetched JWKS when its max-age passes, retry
        failures every :data:`JWKS_RETRY_INTERVAL`. Returns at once for a file."""
        if self._path is not None:
            return
        while True:
            try:
                keys = await self.ensure_fresh()
                delay = max(keys.stale_at - self._clock(), 0.0)
            except AgentError:
                delay = JWKS_RETRY_INTERVAL
            await sleep(delay)

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    def _load_done(self, task: asyncio.Task[KeySet]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: awaiting callers re-raise it themselves

    async def _load(self) -> KeySet:
        if self._path is not None:
            return self._read_file(only_if_changed=False)
        return await self._fetch()

    def _read_file(self, *, only_if_changed: bool) -> KeySet:
        assert self._path is not None
        path = self._path
        try:
            self._stat_seen = self._file_stat()
            with path.open("rb") as fh:
                data = fh.read(JWKS_MAX_BYTES + 1)
            digest = hashlib.sha256(data).digest()
            if only_if_changed and digest == self._file_digest and self._keys is not None:
                return self._keys
            self._last_attempt = self._clock()
            self.loads += 1
            self._file_digest = digest
            if len(data) > JWKS_MAX_BYTES:
                raise ValueError(f"is larger than {JWKS_MAX_BYTES} bytes")
            now = self._clock()
            keys = KeySet.parse(data, origin=str(path), loaded_at=now, stale_at=math.inf)
        except FileNotFoundError:
            raise self._failed(ConfigError(f"JWKS file {path} does not exist")) from None
        except OSError as exc:
            raise self._failed(
                ConfigError(f"JWKS file {path} cannot be read ({type(exc).__name__})")
            ) from None
        except ValueError as exc:
            raise self._failed(
                ConfigError(
                    f"JWKS file {path} {exc}",
                    hint="write the API server's /openid/v1/jwks answer to it",
                )
            ) from None
        self._next_check = self._clock() + FILE_RECHECK_INTERVAL
        return self._adopt(keys)

    def _file_stat(self) -> tuple[int, int, int] | None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    async def _fetch(self) -> KeySet:
        assert self._url is not None
        self._last_attempt = self._clock()
        self.loads += 1
        what = "the API server's JWKS endpoint"
        try:
            headers = {"Accept": "application/json"}
            if self._token_file is not None:
                headers["Authorization"] = "Bearer " + agent_bearer(self._token_file)
            if self._session is None:
                self._session = api_session(self._ca_file)
            with mapped_errors(what):
                async with self._session.get(
                    self._url, headers=headers, allow_redirects=False
                ) as resp:
                    if resp.status in (401, 403):
                        raise BadCredentials(
                            f"{what} refused the agent's service-account token ({resp.status})",
                            hint="the agent's service account needs the "
                            "system:service-account-issuer-discovery role",
                        )
                    if resp.status != 200:
                        raise Unavailable(f"{what} answered {resp.status}")
                    body = await resp.content.read(JWKS_MAX_BYTES + 1)
                    max_age = cache_max_age(resp.headers.getall("Cache-Control", ()))
            if len(body) > JWKS_MAX_BYTES:
                raise Unavailable(f"{what} answered more than {JWKS_MAX_BYTES} bytes")
            now = self._clock()
            try:
                keys = KeySet.parse(body, origin=self._url, loaded_at=now, stale_at=now + max_age)
            except ValueError as exc:
                raise Unavailable(f"{what} answered a document that {exc}") from None
        except AgentError as exc:
            raise self._failed(exc) from None
        return self._adopt(keys)

    def _adopt(self, keys: KeySet) -> KeySet:
        old = self._keys
        self._keys = keys
        if old is None or old.refs != keys.refs:
            log.info("jwks_loaded", origin=keys.origin, kids=sorted(keys.keys))
        return keys

    def _failed(self, exc: AgentError) -> AgentError:
        log.warning(
            "jwks_load_failed",
            origin=self.origin,
            error=exc.message,
            keeping=sorted(self._keys.keys) if self._keys is not None else None,
        )
        return exc


class TokenCache(Generic[_V]):
    """Answers about tokens, keyed by the token's SHA-256 (:meth:`key`), each until its own
    time. Bounded: when full, expired entries go first, then the oldest until at most 90 %
    are left, so a full cache is swept once per tenth of its size, not on every insert."""

    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int = VERIFIED_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ConfigError("a token cache needs at least one entry")
        self._max = max_entries
        self._entries: dict[bytes, tuple[float, _V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenCache({len(self._entries)}/{self._max})"

    @staticmethod
    def key(token: bytes) -> bytes:
        return hashlib.sha256(token).digest()

    def get(self, key: bytes, now: float) -> _V | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if now < hit[0]:
            return hit[1]
        del self._entries[key]
        return None

    def put(self, key: bytes, value: _V, until: float, now: float) -> None:
        entries = self._entries
        if len(entries) >= self._max and key not in entries:
            live = {k: e for k, e in entries.items() if e[0] > now}
            excess = len(live) - (self._max - max(1, self._max // 10))
            for k in list(live)[: max(excess, 0)]:
                del live[k]
            self._entries = entries = live
        entries[key] = (until, value)

    def retain(self, keep: Callable[[_V], bool]) -> None:
        """Drop every entry whose value ``keep`` refuses."""
        self._entries = {k: e for k, e in self._entries.items() if keep(e[1])}

    def clear(self) -> None:
        self._entries.clear()


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: K8sIdentity
    kid: str
    ref: bytes


def _timestamp(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Forbidden(f"the token's {name} claim is not a number", hint=_HINT_PROJECT)
    return float(value)


def _checked(value: object, pattern: re.Pattern[str]) -> str | None:
    """An optional pod, node or uid string, shape-checked: it goes into the log line."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _SUBDOMAIN_MAX or not pattern.fullmatch(value):
        raise Forbidden("the token's pod or node is malformed", hint=_HINT_PROJECT)
    return value


def service_account_of(subject: object) -> tuple[str, str]:
    """``(namespace, name)`` of ``system:serviceaccount:<namespace>:<name>``, or Forbidden."""
    if not isinstance(subject, str) or not subject.startswith(SA_SUBJECT_PREFIX):
        raise Forbidden("the token's subject is not a service account", hint=_HINT_PROJECT)
    parts = subject[len(SA_SUBJECT_PREFIX) :].split(":")
    if (
        len(parts) != 2
        or not _LABEL.fullmatch(parts[0])
        or len(parts[1]) > _SUBDOMAIN_MAX
        or not _SUBDOMAIN.fullmatch(parts[1])
    ):
        raise Forbidden(
            "the token's subject is not system:serviceaccount:<namespace>:<name>",
            hint=_HINT_PROJECT,
        )
    return parts[0], parts[1]


def make_identity(
    namespace: str,
    account: str,
    *,
    pod: object,
    pod_uid: object,
    node: object,
    expires_at: float,
) -> K8sIdentity:
    """The identity of a service account (as :func:`service_account_of` returned it), with
    its pod, pod uid and node checked to be None or well-formed names."""
    return K8sIdentity(
        principal=f"{PRINCIPAL_PREFIX}:{namespace}:{account}",
        namespace=namespace,
        service_account=account,
        pod=_checked(pod, _SUBDOMAIN),
        pod_uid=_checked(pod_uid, _UID),
        node=_checked(node, _SUBDOMAIN),
        expires_at=expires_at,
    )


def _identity_of(claims: Mapping[str, Any], expires_at: float) -> K8sIdentity:
    """The caller named by verified claims; ``sub`` and ``kubernetes.io`` must agree."""
    namespace, account = service_account_of(claims["sub"])
    k8s = claims["kubernetes.io"]
    sa = k8s.get("serviceaccount") if isinstance(k8s, dict) else None
    if (
        not isinstance(k8s, dict)
        or k8s.get("namespace") != namespace
        or not isinstance(sa, dict)
        or sa.get("name") != account
    ):
        raise Forbidden(
            f"the token's subject ({PRINCIPAL_PREFIX}:{namespace}:{account}) and its "
            "kubernetes.io claim disagree",
            hint="the token was not issued by kube-apiserver as it is; refuse it",
        )
    pod = k8s.get("pod") or {}
    node = k8s.get("node") or {}
    if not isinstance(pod, dict) or not isinstance(node, dict):
        raise Forbidden("the token's pod or node is malformed", hint=_HINT_PROJECT)
    return make_identity(
        namespace,
        account,
        pod=pod.get("name"),
        pod_uid=pod.get("uid"),
        node=node.get("name"),
        expires_at=expires_at,
    )


def _refused(exc: jwt.PyJWTError, issuer: str) -> Forbidden:
    """PyJWT's verdict as our error: a fixed message by type, never PyJWT's own text."""
    if isinstance(exc, jwt.InvalidSignatureError):
        return Forbidden("the token's signature does not verify", hint=_HINT_PROJECT)
    if isinstance(exc, jwt.InvalidAudienceError):
        return Forbidden(
            "the token is not meant for this agent (audience)",
            hint="project the token with the agent's audience (kms-agent)",
        )
    if isinstance(exc, jwt.InvalidIssuerError):
        return Forbidden(
            f"the token was not issued by {issuer}",
            hint="it comes from another cluster, or the agent's issuer setting is wrong",
        )
    if isinstance(exc, jwt.MissingRequiredClaimError):
        claim = exc.claim if exc.claim in _REQUIRED_CLAIMS else "?"
        return Forbidden(f"the token lacks the {claim} claim", hint=_HINT_PROJECT)
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return Forbidden("the token's algorithm does not match its key", hint=_HINT_PROJECT)
    if isinstance(exc, jwt.InvalidKeyError):
        return Forbidden("the token's signing key is too weak to trust", hint=_HINT_PROJECT)
    return Forbidden("the token is not a well-formed JWT", hint=_HINT_PROJECT)


class ServiceAccountVerifier:
    """Verifies projected service-account tokens against one cluster's JWKS.

    ``verify`` is the synchronous hot path (see the module docstring for the unknown-kid
    protocol); ``verify_async`` wraps it with the rate-limited refresh and one retry.
    """

    def __init__(
        self,
        issuer: str,
        audiences: tuple[str, ...],
        jwks: JwksSource,
        algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
        clock: Callable[[], float] = time.time,
        *,
        cache_entries: int = VERIFIED_CACHE_ENTRIES,
    ) -> None:
        if not issuer:
            raise ConfigError("the service-account issuer must be set (the cluster's issuer URL)")
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise ConfigError("service-account audiences must be a non-empty list of names")
        refused = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if refused or not algorithms:
            allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
            raise ConfigError(
                f"service-account algorithms: {', '.join(refused) or 'none given'} not allowed; "
                f"choose from {allowed}"
            )
        self.issuer = issuer
        self.audiences = audiences
        self.algorithms = frozenset(algorithms)
        self._audience_list = list(audiences)
        self._jwks = jwks
        self._clock = clock
        self._verified: TokenCache[_Verified] = TokenCache(cache_entries)
        self._keys_seen: KeySet | None = None

    def __repr__(self) -> str:
        return (
            f"ServiceAccountVerifier(issuer={self.issuer!r}, audiences={self.audiences!r}, "
            f"cached={len(self._verified)})"
        )

    @property
    def jwks(self) -> JwksSource:
        return self._jwks

    @property
    def cached(self) -> int:
        """How many verified tokens are remembered."""
        return len(self._verified)

    async def ensure_loaded(self) -> None:
        """Load the JWKS if needed (at start, before readiness). Raises its load error."""
        await self._jwks.ensure_fresh()

    def verify(self, token: bytes) -> K8sIdentity:
        """The caller ``token`` proves, or Unauthorized (empty), Forbidden (refused),
        UnknownSigningKey (a Forbidden: await :meth:`verify_async` instead)."""
        if not token:
            raise Unauthorized("no service-account token presented", hint=_HINT_PROJECT)
        if len(token) > MAX_TOKEN_BYTES:
            raise Forbidden("the token is too long to be a service-account token")
        keys = self._jwks.current()
        if keys is not self._keys_seen:
            self._adopt(keys)
        digest = TokenCache.key(token)
        hit = self._verified.get(digest, self._clock())
        if hit is not None:
            return hit.identity
        return self._verify_signed(token, digest, keys)

    async def verify_async(self, token: bytes) -> K8sIdentity:
        """:meth:`verify`; when the token's key is unknown, one rate-limited JWKS refresh
        (:meth:`JwksSource.refresh_for_unknown_kid`) and one retry."""
        try:
            return self.verify(token)
        except UnknownSigningKey as exc:
            known = await self._jwks.refresh_for_unknown_kid(exc.kid)
            if self._jwks.current() is None:
                raise Unavailable(
                    "the cluster's JWKS could not be loaded",
                    hint="check the agent's access to the API server's /openid/v1/jwks",
                ) from None
            if not known:
                raise
        return self.verify(token)

    def clear(self) -> None:
        """Forget every remembered verification."""
        self._verified.clear()

    def _adopt(self, keys: KeySet | None) -> None:
        """A new key set: keep only verifications made with keys it still holds, unchanged."""
        if keys is None:
            self._verified.clear()
        else:
            refs = keys.refs
            self._verified.retain(lambda v: refs.get(v.kid) == v.ref)
        self._keys_seen = keys

    def _verify_signed(self, token: bytes, digest: bytes, keys: KeySet | None) -> K8sIdentity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Forbidden("the token is not a well-formed JWT", hint=_HINT_PROJECT) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Forbidden(
                f"the token's algorithm is not one of {', '.join(sorted(self.algorithms))}",
                hint=_HINT_PROJECT,
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Forbidden("the token names no signing key (kid)", hint=_HINT_PROJECT)
        if keys is None:
            raise UnknownSigningKey(
                "the cluster's JWKS is not loaded yet", hint="retry in a moment", kid=kid
            )
        key = keys.keys.get(kid)
        if key is None:
            raise UnknownSigningKey(
                "the token's signing key is not in the cluster's JWKS",
                hint="it comes from another cluster, or from a key the cluster has retired",
                kid=kid,
            )
        if key.algorithm_name != alg:
            raise Forbidden("the token's algorithm does not match its key", hint=_HINT_PROJECT)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience_list,
                issuer=self.issuer,
                options=_DECODE_OPTIONS,
            )
        except jwt.PyJWTError as exc:
            raise _refused(exc, self.issuer) from None
        expires_at = _timestamp(claims, "exp")
        not_before = _timestamp(claims, "nbf")
        issued_at = _timestamp(claims, "iat")
        identity = _identity_of(claims, expires_at)
        now = self._clock()
        valid_until = expires_at + CLOCK_LEEWAY
        if now >= valid_until:
            raise Forbidden(
                f"the service-account token of {identity.principal} has expired",
                hint="the kubelet rotates projected tokens: re-read the token file for "
                "every request",
            )
        if not_before > now + CLOCK_LEEWAY or issued_at > now + CLOCK_LEEWAY:
            raise Forbidden(
                f"the service-account token of {identity.principal} is not valid yet",
                hint="check the clocks of this node and the API server",
            )
        self._verified.put(digest, _Verified(identity, kid, keys.refs[kid]), valid_until, now)
        return identity
