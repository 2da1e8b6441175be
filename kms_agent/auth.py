"""Caller tokens: where they come from, and checking them in constant time.

Tokens come from environment variables (plain, or ``file://PATH``) and token files (one
token per line, ``#`` comments, several live at once during a rotation). With none
configured the agent generates one into ``<runtime dir>/token`` (mode 0640) for the
application container to read. Token values are never logged, only where they came from.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from kms_agent.config import AuthConfig, KubernetesAuthConfig
from kms_agent.errors import ConfigError, Forbidden, Unauthorized
from kms_agent.k8s_identity import (
    JwksSource,
    K8sIdentity,
    ServiceAccountVerifier,
    UnknownSigningKey,
    bearer_token,
)
from kms_agent.k8s_tokenreview import TokenReviewer
from kms_agent.policy import token_principal
from kms_agent_client import TOKEN_FILE

log = structlog.get_logger("kms_agent.auth")

#: The client looks for it under the same name (one copy, in the client).
TOKEN_FILE_NAME = TOKEN_FILE
#: Shorter tokens are refused; tokens shorter than the recommended length are warned
#: about (the AWS agent takes any, and its own tests use 14 characters).
MIN_TOKEN_LENGTH = 8
RECOMMENDED_TOKEN_LENGTH = 16
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


def new_token() -> str:
    """A fresh random token: 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class TokenSet:
    """The tokens accepted right now, each token's name (its caller's principal is
    ``token:<name>``), and where each set came from (for logs)."""

    tokens: tuple[bytes, ...]
    origins: tuple[str, ...]
    files: tuple[Path, ...]
    names: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"TokenSet(<{len(self.tokens)} tokens redacted>, origins={self.origins!r})"

    def name(self, index: int) -> str:
        return self.names[index] if index < len(self.names) else UNNAMED


#: The name of a token given without one (its principal: ``token:default``).
UNNAMED = "default"
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_Named = tuple[str, bytes]


def _parse_token_lines(text: str, origin: str) -> list[_Named]:
    """``TOKEN`` or ``NAME:TOKEN`` lines (a token holds no ``:``), ``#`` comments."""
    out: list[_Named] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        name, colon, rest = token.partition(":")
        if colon:
            if not _TOKEN_NAME.fullmatch(name):
                raise ConfigError(
                    f"{origin} line {lineno}: a token's name (before the ':') is 1-64 "
                    "letters, digits, - . _, like ci-deploy:TOKEN"
                )
            token = rest.strip()
        else:
            name = UNNAMED
        if len(token) < MIN_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARS:
            raise ConfigError(
                f"{origin} line {lineno}: a token must be at least {MIN_TOKEN_LENGTH} characters "
                "of letters, digits and - . _ ~ + / =; make one with 'kms-agent token new'"
            )
        if len(token) < RECOMMENDED_TOKEN_LENGTH:
            log.warning(
                "token_short", origin=origin, line=lineno, recommended=RECOMMENDED_TOKEN_LENGTH
            )
        out.append((name, token.encode()))
    return out


def _read_token_file(path: Path, origin: str) -> list[_Named]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{origin}: token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{origin}: token file {path} cannot be read ({type(exc).__name__})"
        ) from None
    return _parse_token_lines(text, f"{origin} ({path})")


def warn_if_exposed(path: Path, what: str, allowed: int) -> bool:
    """Log a warning when ``path`` grants group or others more than ``allowed`` (e.g. 0o640)."""
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & ~allowed & 0o077:
            log.warning(
                "file_exposed", what=what, path=str(path), mode=oct(mode), allowed=oct(allowed)
            )
            return True
    return False


def token_variable(names: tuple[str, ...], environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The first of ``names`` that is set (as the AWS and Alibaba agents read theirs), and
    its value: a token, or ``file://PATH``."""
    for var in names:
        value = environ.get(var)
        if value:
            return var, value
    return "", None


def load_tokens(
    cfg: AuthConfig, environ: Mapping[str, str], extra_files: tuple[Path, ...] = ()
) -> TokenSet:
    """Read every configured token source. Raises ConfigError naming the bad one."""
    tokens: list[_Named] = []
    origins: list[str] = []
    files: list[Path] = []
    var, value = token_variable(cfg.token_env, environ)
    if value is not None:
        if value.startswith("file://"):
            path = Path(value[len("file://") :])
            tokens += _read_token_file(path, f"${var}")
            files.append(path)
        else:
            tokens += _parse_token_lines(value, f"${var}")
        origins.append(f"${var}")
    for i, name in enumerate(cfg.token_files):
        path = Path(name)
        found = _read_token_file(path, f"auth.token_files[{i}]")
        if not found:
            raise ConfigError(f"auth.token_files[{i}]: token file {path} holds no token")
        tokens += found
        files.append(path)
        origins.append(str(path))
    for path in extra_files:
        tokens += _read_token_file(path, "generated token file")
        files.append(path)
        origins.append(str(path))
    named: dict[bytes, str] = {}
    for name, token in tokens:
        named.setdefault(token, name)  # a token listed twice keeps its first name
    return TokenSet(tuple(named), tuple(origins), tuple(files), names=tuple(named.values()))


def ensure_generated_token(runtime_dir: Path) -> Path:
    """Return ``<runtime_dir>/token``, creating it with a fresh token when absent.

    An existing file is kept so that an application that already read it keeps working
    across an agent restart. Mode 0640: the agent's group (the app's) may read it.
    """
    runtime_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    path = runtime_dir / TOKEN_FILE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o640)  # not narrowed by the umask
        fh.write(new_token() + "\n")
    return path


def _raw_names(headers: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(h.lower().encode("latin-1") for h in headers)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: its principals (kms_agent.policy's spelling), until when
    that proof holds (a service-account token's ``exp``; None: while the token set does),
    and what the access log says of it."""

    principals: tuple[str, ...]
    expires_at: float | None = None
    detail: tuple[tuple[str, str], ...] = ()

    @property
    def principal(self) -> str:
        return self.principals[0] if self.principals else ""

    def valid(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


class IdentityPending(Forbidden):
    """The caller's service-account token cannot be judged without waiting (its signing
    key is not loaded yet, or it awaits its TokenReview): the front door awaits
    :meth:`Authenticator.identify_async` and asks again."""


def _looks_like_jwt(token: bytes) -> bool:
    return token.startswith(b"eyJ") and token.count(b".") == 2


class Authenticator:
    """Who a request comes from, from its token headers (a caller token, or a Kubernetes
    service-account token), its ``Authorization: Bearer`` header, or its Unix-socket peer."""

    __slots__ = ("_headers", "_reviewer", "_tokens", "_verifier", "header_keys")

    def __init__(
        self,
        headers: tuple[str, ...],
        tokens: TokenSet,
        *,
        verifier: ServiceAccountVerifier | None = None,
        reviewer: TokenReviewer | None = None,
    ) -> None:
        self._headers = headers
        self._tokens = tokens
        self._verifier = verifier
        self._reviewer = reviewer
        #: The token headers as lower-case bytes, for callers holding raw headers.
        self.header_keys = _raw_names(headers)

    def __repr__(self) -> str:
        return f"Authenticator(headers={self._headers!r}, {self._tokens!r})"

    @property
    def token_set(self) -> TokenSet:
        return self._tokens

    @property
    def kubernetes(self) -> bool:
        return self._verifier is not None or self._reviewer is not None

    def update(self, tokens: TokenSet, headers: tuple[str, ...] | None = None) -> None:
        """Swap in a new token set atomically (one attribute assignment)."""
        self._tokens = tokens
        if headers is not None:
            self._headers = headers
            self.header_keys = _raw_names(headers)

    def match(self, candidate: bytes) -> int | None:
        """The index of the token ``candidate`` is, or None. Every token is compared, in
        constant time, so the answer's timing says nothing about how much matched."""
        found = None
        for index, token in enumerate(self._tokens.tokens):
            if hmac.compare_digest(candidate, token):
                found = index
        return found

    def accepts(self, candidate: bytes) -> bool:
        return self.match(candidate) is not None

    def presented(self, headers: Mapping[bytes, bytes]) -> bytes | None:
        """The token a request presents: the first token header's, else a bearer token."""
        for name in self.header_keys:
            value = headers.get(name)
            if value is not None:
                return value
        authorization = headers.get(b"authorization")
        return bearer_token(authorization) if authorization is not None else None

    def identify(
        self, headers: Mapping[bytes, bytes], peer: tuple[str, ...] = (), *, peer_only: bool = False
    ) -> Caller:
        """The caller; raise Unauthorized (nothing presented), Forbidden (refused) or
        IdentityPending. ``headers``: raw, lower-case names, as the protocol keeps them.
        ``peer``: a Unix-socket peer's principals, added to the token's; with
        ``peer_only`` (policies are on) the peer alone identifies a caller with no token."""
        presented = self.presented(headers)
        if presented is None:
            if peer and peer_only:
                return Caller(peer)
            raise self._missing()
        if self.kubernetes and _looks_like_jwt(presented):
            identity = self._service_account(presented)
            return Caller(
                (identity.principal, *peer),
                expires_at=identity.expires_at,
                detail=_k8s_detail(identity),
            )
        index = self.match(presented)
        if index is None:
            raise self._wrong()
        return Caller((token_principal(self._tokens.name(index)), *peer))

    async def identify_async(self, headers: Mapping[bytes, bytes]) -> None:
        """Do the waiting :class:`IdentityPending` asked for (a rate-limited JWKS refresh,
        or the TokenReview), so that :meth:`identify` answers at once; raise its refusal."""
        presented = self.presented(headers)
        if presented is None:
            return
        if self._reviewer is not None:
            await self._reviewer.verify(presented)
        elif self._verifier is not None:
            await self._verifier.verify_async(presented)

    def _service_account(self, token: bytes) -> K8sIdentity:
        if self._reviewer is not None:
            identity = self._reviewer.cached(token)
            if identity is None:
                raise IdentityPending("the service-account token awaits its review")
            return identity
        assert self._verifier is not None
        try:
            return self._verifier.verify(token)
        except UnknownSigningKey:
            raise IdentityPending("the token's signing key is not loaded") from None

    def check_raw(self, headers: Mapping[bytes, bytes]) -> None:
        """Raise unless ``headers`` present an accepted token (tests and tools)."""
        self.identify(headers)

    def _missing(self) -> Unauthorized:
        return Unauthorized(
            "no token presented",
            hint=f"send the token in the {self._headers[0]} header; "
            "it is in the agent's token file",
        )

    @staticmethod
    def _wrong() -> Forbidden:
        return Forbidden(
            "the token is not valid", hint="re-read the token file; it may have been rotated"
        )


def _k8s_detail(identity: K8sIdentity) -> tuple[tuple[str, str], ...]:
    """What the access log says of a service account's caller: its pod and node."""
    fields = (("pod", identity.pod), ("pod_uid", identity.pod_uid), ("node", identity.node))
    return tuple((key, value) for key, value in fields if value)


@dataclass(slots=True)
class ServiceAccounts:
    """The service-account checks ``[auth.kubernetes]`` asks for: the offline verifier,
    and the TokenReviewer in tokenreview mode; opened before readiness, closed at stop."""

    verifier: ServiceAccountVerifier
    reviewer: TokenReviewer | None = None

    @classmethod
    def from_config(cls, cfg: KubernetesAuthConfig) -> ServiceAccounts | None:
        if not cfg.enabled:
            return None
        where = "auth.kubernetes"
        try:
            jwks = (
                JwksSource.from_file(Path(cfg.jwks_file))
                if cfg.jwks_file
                else JwksSource.from_url(
                    cfg.jwks_url, token_file=Path(cfg.token_file), ca_file=Path(cfg.ca_file)
                )
            )
            verifier = ServiceAccountVerifier(cfg.issuer, cfg.audiences, jwks)
            reviewer = (
                TokenReviewer(
                    cfg.audiences,
                    api_url=cfg.api_url,
                    token_file=Path(cfg.token_file),
                    ca_file=Path(cfg.ca_file),
                    offline=verifier,
                )
                if cfg.mode == "tokenreview"
                else None
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
        return cls(verifier, reviewer)

    async def open(self) -> None:
        """Load the JWKS (readiness waits for it); raises its error."""
        await self.verifier.ensure_loaded()

    async def close(self) -> None:
        await self.verifier.jwks.close()
        if self.reviewer is not None:
            await self.reviewer.close()
