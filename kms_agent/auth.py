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
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from kms_agent.config import AuthConfig
from kms_agent.errors import ConfigError, Forbidden, Unauthorized
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
    """The tokens accepted right now, and where each set came from (for logs)."""

    tokens: tuple[bytes, ...]
    origins: tuple[str, ...]
    files: tuple[Path, ...]

    def __repr__(self) -> str:
        return f"TokenSet(<{len(self.tokens)} tokens redacted>, origins={self.origins!r})"


def _parse_token_lines(text: str, origin: str) -> list[bytes]:
    out: list[bytes] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARS:
            raise ConfigError(
                f"{origin} line {lineno}: a token must be at least {MIN_TOKEN_LENGTH} characters "
                "of letters, digits and - . _ ~ + / =; make one with 'kms-agent token new'"
            )
        if len(token) < RECOMMENDED_TOKEN_LENGTH:
            log.warning(
                "token_short", origin=origin, line=lineno, recommended=RECOMMENDED_TOKEN_LENGTH
            )
        out.append(token.encode())
    return out


def _read_token_file(path: Path, origin: str) -> list[bytes]:
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
    tokens: list[bytes] = []
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
    return TokenSet(tuple(dict.fromkeys(tokens)), tuple(origins), tuple(files))


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


class Authenticator:
    """Checks a request's token headers against the current token set."""

    __slots__ = ("_headers", "_tokens", "header_keys")

    def __init__(self, headers: tuple[str, ...], tokens: TokenSet) -> None:
        self._headers = headers
        self._tokens = tokens
        #: The token headers as lower-case bytes, for callers holding raw headers.
        self.header_keys = _raw_names(headers)

    def __repr__(self) -> str:
        return f"Authenticator(headers={self._headers!r}, {self._tokens!r})"

    @property
    def token_set(self) -> TokenSet:
        return self._tokens

    def update(self, tokens: TokenSet, headers: tuple[str, ...] | None = None) -> None:
        """Swap in a new token set atomically (one attribute assignment)."""
        self._tokens = tokens
        if headers is not None:
            self._headers = headers
            self.header_keys = _raw_names(headers)

    def accepts(self, candidate: bytes) -> bool:
        """Whether ``candidate`` is one of the tokens. Every token is compared, in constant
        time, so the answer's timing says nothing about which (or how much) matched."""
        ok = False
        for token in self._tokens.tokens:
            ok |= hmac.compare_digest(candidate, token)
        return ok

    def check_raw(self, headers: Mapping[bytes, bytes]) -> None:
        """Raise Unauthorized (no token) or Forbidden (wrong token); return if accepted.
        ``headers``: raw, lower-case names, as the protocol keeps them."""
        presented = None
        for name in self.header_keys:
            presented = headers.get(name)
            if presented is not None:
                break
        if presented is None:
            raise self._missing()
        if not self.accepts(presented):
            raise self._wrong()

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
