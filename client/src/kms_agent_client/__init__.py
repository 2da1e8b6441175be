"""A Python client for the agent, for applications that read secrets often.

    from kms_agent_client import Client

    agent = Client()                        # 127.0.0.1:2025; token from $KMS_TOKEN or a file
    password = agent.get_text("db-password")

Its own distribution, ``kms-agent-client`` (``pip install ./client`` from the agent's
repository): an application installs it alone, with ``httptools`` as its one dependency,
and none of the server's. The server ships this same package and imports its defaults from
here (the address, the token header and variable, the token file's name and directory), so
each has one copy; nothing here imports ``kms_agent``.

One keep-alive connection, blocking calls (safe from several threads: they take turns),
responses parsed by llhttp (``httptools``, as the agent parses requests) and nothing else
imported: no aiohttp, no event loop. A round trip for a cached secret costs a fraction of a
cache hit in an in-process caching library (``bench/`` measures both).

* The request bytes for a secret are built once and reused; the agent answers repeated
  bytes fastest.
* A connection the agent closed while idle (its keep-alive timeout) is reopened and the
  request sent again once; a request is never resent after any of its answer arrived.
* With a token file, a 401 or 403 re-reads the file and retries once, so a token rotation
  (new line added, old one removed) needs no restart.
* Errors are :class:`ClientError` with the agent's status, stable ``code`` and hint. No
  value or token appears in an exception message or a repr.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlencode

import httptools

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_HEADER",
    "DEFAULT_TOKEN_FILES",
    "NOT_FOUND",
    "RUNTIME_DIR_ENV",
    "TOKEN_ENV",
    "TOKEN_FILE",
    "Client",
    "ClientError",
    "default_data_dir",
    "default_runtime_dir",
    "newest_token",
    "read_token_file",
    "token_files",
]

#: Where the agent listens by default (the server's ``server.listen`` default).
DEFAULT_ADDRESS = "127.0.0.1:2025"
#: The token header the agent names first (the server's first ``auth.headers``).
DEFAULT_HEADER = "X-KMS-Token"
#: The token variable the agent reads first: the token, or ``file://PATH``.
TOKEN_ENV = "KMS_TOKEN"  # noqa: S105 (a variable's name)
#: The agent's runtime dir when set in its environment (``runtime_dir`` of its config).
RUNTIME_DIR_ENV = "KMS_AGENT_RUNTIME_DIR"
#: Where an agent run with its defaults writes the token it generates.
DEFAULT_TOKEN_FILES = ("/run/kms-agent/token",)
#: The generated token's file name in the runtime dir.
TOKEN_FILE = "token"  # noqa: S105 (a file name)
#: Distinct requests whose bytes are kept (an application reads a handful of secrets).
_REQUESTS_MAX = 256
#: Codes that mean "no such secret (version)" rather than a failure to ask.
NOT_FOUND = frozenset({"SecretNotFound", "SecretPendingDeletion"})


def default_data_dir(environ: Mapping[str, str]) -> str:
    """The agent's data dir when none is configured: ``$XDG_DATA_HOME/kms-agent``, else
    ``~/.local/share/kms-agent``."""
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "kms-agent")


def default_runtime_dir(environ: Mapping[str, str], data_dir: str) -> str:
    """The agent's runtime dir (where it writes its token) when none is configured:
    ``$XDG_RUNTIME_DIR/kms-agent``, else the data dir."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    return str(Path(runtime) / "kms-agent") if runtime else data_dir


class ClientError(Exception):
    """The agent refused or failed a request, or could not be reached (``status`` 0)."""

    def __init__(
        self, message: str, *, status: int = 0, code: str = "", hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.hint = hint

    @property
    def not_found(self) -> bool:
        return self.code in NOT_FOUND


def newest_token(text: str, path: Path | str) -> str:
    """The last token line of a token file (during a rotation, the new one)."""
    lines = [ln.strip() for ln in text.splitlines()]
    tokens = [ln for ln in lines if ln and not ln.startswith("#")]
    if not tokens:
        raise ClientError(f"the token file {path} holds no token", code="NoToken")
    return tokens[-1]


def read_token_file(path: Path, hint: str = "pass token= or token_file=, or set $KMS_TOKEN") -> str:
    """The newest token in the file at ``path``; :class:`ClientError` if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientError(
            f"cannot read the token file {path} ({type(exc).__name__})", code="NoToken", hint=hint
        ) from None
    return newest_token(text, path)


def token_files(environ: Mapping[str, str]) -> list[Path]:
    """Where an agent started with its defaults writes its token, as this environment would
    resolve it (``$KMS_AGENT_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/kms-agent``, else the
    data dir), then the shared volume a Kubernetes sidecar mounts."""
    runtime = environ.get(RUNTIME_DIR_ENV) or default_runtime_dir(
        environ, default_data_dir(environ)
    )
    return [Path(runtime) / TOKEN_FILE, *(Path(p) for p in DEFAULT_TOKEN_FILES)]


class _Response:
    """llhttp's callbacks for one response at a time (no header callbacks: none needed)."""

    __slots__ = ("body", "done", "keep_alive", "parser")

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.done = self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()  # only known until the next begins


class _Dropped(Exception):
    """The connection ended before a whole answer; ``started`` if part of it came."""

    def __init__(self, *, started: bool) -> None:
        self.started = started


class Client:
    """A keep-alive connection to one agent. ``address``: ``HOST:PORT``, ``[IPv6]:PORT`` or
    ``unix:/PATH``. The token: ``token``, else ``token_file``, else ``$KMS_TOKEN`` (the token
    or ``file://PATH``), else the file the agent writes by default."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        header: str = DEFAULT_HEADER,
        timeout: float = 5.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.address = address
        self.timeout = timeout
        self._header = header
        self._token_file: Path | None = None
        if token is None and token_file is None:
            value = env.get(TOKEN_ENV, "")
            if value.startswith("file://"):
                token_file = value[len("file://") :]
            elif value:
                token = value.strip()
            else:
                candidates = token_files(env)
                token_file = next((p for p in candidates if p.exists()), candidates[0])
        if token is None:
            assert token_file is not None
            self._token_file = Path(token_file)
            token = self._read_token()
        self._token = self._checked(token)
        self._target: str | tuple[str, int]
        if address.startswith("unix:"):
            self._family, self._target = socket.AF_UNIX, address[len("unix:") :]
            self._host = "localhost"
        else:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ClientError(
                    f"{address!r} is not an agent address",
                    code="BadAddress",
                    hint="use HOST:PORT, [IPv6]:PORT or unix:/PATH",
                )
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._family, self._target = family, (host, int(port))
            self._host = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self._sock: socket.socket | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._response = _Response()
        self._requests: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ------------------------------------------------------------------ reads

    def get(
        self,
        name: str,
        *,
        version_id: str | None = None,
        version_stage: str | None = None,
        field: str | None = None,
        refresh: bool = False,
    ) -> bytes:
        """The secret's value, as stored (text secrets are UTF-8). ``field`` picks one key
        of a JSON object secret; ``refresh`` makes the agent fetch it from its store."""
        query = [("format", "raw")]
        selectors = (("version_id", version_id), ("version_stage", version_stage), ("field", field))
        for key, value in selectors:
            if value is not None:
                query.append((key, value))
        if refresh:
            query.append(("refresh", "true"))
        with self._lock:
            status, body = self._call(name, tuple(query))
            if status in (401, 403) and self._token_file is not None and self._reread():
                status, body = self._call(name, tuple(query))
        if status == 200:
            return body
        raise _error(status, body)

    def get_text(self, name: str, **options: Any) -> str:
        """The value of a text secret (``options`` as for :meth:`get`)."""
        return self.get(name, **options).decode("utf-8")

    def get_json(self, name: str, **options: Any) -> Any:
        """A JSON secret, parsed (``options`` as for :meth:`get`)."""
        return json.loads(self.get(name, **options))

    # ------------------------------------------------------------------ the wire

    def _call(self, name: str, query: tuple[tuple[str, str], ...]) -> tuple[int, bytes]:
        request = self._requests.get((name, query))
        if request is None:
            path = f"/secrets/{quote(name, safe='/!@')}?{urlencode(query)}"
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {self._host}\r\n"
                f"{self._header}: {self._token}\r\n\r\n"
            ).encode()
            if len(self._requests) >= _REQUESTS_MAX:
                self._requests.clear()
            self._requests[(name, query)] = request
        for attempt in (1, 2):
            reused = self._sock is not None
            try:
                return self._roundtrip(request)
            except _Dropped as exc:
                self._drop()
                if exc.started or not reused or attempt == 2:
                    raise ClientError(
                        f"the agent at {self.address} closed the connection mid-answer",
                        code="AgentUnreachable",
                    ) from None
            except OSError as exc:  # refused, reset, timed out
                self._drop()
                if not reused or attempt == 2 or isinstance(exc, TimeoutError):
                    raise ClientError(
                        f"the agent at {self.address} is unreachable ({type(exc).__name__})",
                        code="AgentUnreachable",
                        hint="is 'kms-agent run' running, and listening there?",
                    ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _roundtrip(self, request: bytes) -> tuple[int, bytes]:
        sock = self._sock or self._connect()
        sock.sendall(request)
        response, parser = self._response, self._parser
        assert parser is not None
        response.body.clear()
        response.done = False
        started = False
        while not response.done:
            data = sock.recv(65536)
            if not data:
                raise _Dropped(started=started)
            started = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserError:
                raise _Dropped(started=True) from None
        status = parser.get_status_code()
        if not response.keep_alive:
            self._drop()
        body = response.body
        return status, body[0] if len(body) == 1 else b"".join(body)

    def _connect(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._target)
            if self._family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._parser = self._response.parser = httptools.HttpResponseParser(self._response)
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._parser = None

    # ------------------------------------------------------------------ the token

    def _read_token(self) -> str:
        assert self._token_file is not None
        return read_token_file(self._token_file)

    def _reread(self) -> bool:
        """Re-read the token file; True if it now holds another token."""
        try:
            token = self._checked(self._read_token())
        except ClientError:
            return False
        if token == self._token:
            return False
        self._token = token
        self._requests.clear()
        return True

    @staticmethod
    def _checked(token: str) -> str:
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise ClientError(
                "the token is empty or holds spaces or control characters", code="BadToken"
            )
        return token


def _error(status: int, body: bytes) -> ClientError:
    try:
        error = json.loads(body)["error"]
        return ClientError(
            str(error["message"]), status=status, code=str(error["code"]), hint=error.get("hint")
        )
    except (ValueError, KeyError, TypeError):
        return ClientError(f"the agent answered HTTP {status}", status=status)
