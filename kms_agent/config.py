"""Configuration: TOML file < ``KMS_AGENT_*`` environment < command-line flags.

One loader builds frozen dataclasses from the merged tables. Unknown keys are errors, and
every error names the key's dotted path, the bad value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Collection, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from kms_agent.errors import ConfigError
from kms_agent.grammar import DIALECTS
from kms_agent.k8s_identity import (
    DEFAULT_AUDIENCE as DEFAULT_SA_AUDIENCE,
)
from kms_agent.k8s_identity import (
    IN_CLUSTER_API_URL,
    IN_CLUSTER_CA_FILE,
    IN_CLUSTER_JWKS_URL,
    IN_CLUSTER_TOKEN_FILE,
)
from kms_agent.policy import PolicySet
from kms_agent.providers.options import PROVIDERS as SOURCE_OPTIONS
from kms_agent.providers.options import SourceOptions
from kms_agent_client import (
    DEFAULT_ADDRESS,
    DEFAULT_HEADER,
    TOKEN_ENV,
    default_data_dir,
    default_runtime_dir,
)

ENV_PREFIX = "KMS_AGENT_"
ENV_CONFIG = "KMS_AGENT_CONFIG"

#: The address, first header and first variable are the client's defaults (one copy each).
DEFAULT_LISTEN = DEFAULT_ADDRESS
DEFAULT_METRICS_LISTEN = "127.0.0.1:9125"
#: Unix-socket listeners: the agent's group (the application's) may connect.
DEFAULT_SOCKET_MODE = "0660"
DEFAULT_TOKEN_HEADERS = (DEFAULT_HEADER, "X-Aws-Parameters-Secrets-Token", "X-Vault-Token")
#: Read in this order; the first that is set holds the token (or ``file://PATH``).
DEFAULT_TOKEN_ENV = (
    TOKEN_ENV,
    "KMS_SESSION_TOKEN",
    "KMS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_TOKEN",
    "AWS_SESSION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)
DEFAULT_TTL = 300.0
DEFAULT_MAX_STALE = 3600.0
DEFAULT_MAX_ENTRIES = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
PROVIDERS = tuple(SOURCE_OPTIONS)
#: The keys of a ``[[sources]]`` table that are the source's own; the rest are its
#: provider's (kms_agent.providers.options).
SOURCE_KEYS = ("name", "provider", "match")

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _meta(
    *,
    lo: float | None = None,
    hi: float | None = None,
    duration: bool = False,
    doc: str = "",
    one_or_many: bool = False,
) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "duration": duration, "doc": doc, "one_or_many": one_or_many}


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A TCP ``host:port`` or a ``unix:/path`` socket."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def is_loopback(self) -> bool:
        if self.unix_path:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def dialable(self) -> ListenAddress:
        """Where a client on this host connects: a wildcard host is its loopback."""
        if self.unix_path or self.host not in ("0.0.0.0", "", "::"):
            return self
        return ListenAddress(host="::1" if self.host == "::" else "127.0.0.1", port=self.port)

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, key: str) -> ListenAddress:
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ConfigError(
                f"{key}: {text!r} needs an absolute socket path, "
                "like unix:/run/kms-agent/agent.sock"
            )
        return ListenAddress(unix_path=path)
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(
            f"{key}: {text!r} is not an address; "
            "use HOST:PORT (port 0-65535), [IPv6]:PORT or unix:/PATH"
        )
    return ListenAddress(host=host, port=int(port_text))


def parse_listener(text: str, key: str) -> tuple[str, ListenAddress]:
    """``[DIALECT@]ADDRESS``: the dialect a listener speaks (native when not given)."""
    dialect, at, address = text.partition("@")
    if not at:
        return DIALECTS[0], parse_listen(text, key)
    if dialect not in DIALECTS:
        allowed = ", ".join(DIALECTS)
        raise ConfigError(f"{key}: {text!r} names no dialect; use one of {allowed} before '@'")
    return dialect, parse_listen(address, key)


def listen_key(i: int, count: int) -> str:
    """How messages name the ``i``-th of ``count`` listeners."""
    return "server.listen" if count == 1 else f"server.listen[{i}]"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[str, ...] = field(
        default=(DEFAULT_LISTEN,), metadata=_meta(doc="secrets listeners", one_or_many=True)
    )
    allow_non_loopback: bool = False
    response_type: Literal["aws", "kms", "vault"] = "aws"
    shutdown_grace: float = field(default=10.0, metadata=_meta(lo=0, hi=600, duration=True))
    max_connections: int = field(default=800, metadata=_meta(lo=1, hi=100_000))
    drain_delay: float = field(default=0.0, metadata=_meta(lo=0, hi=600, duration=True))
    keepalive_timeout: float = field(default=15.0, metadata=_meta(lo=0, hi=3600, duration=True))
    #: The request line's and each header field's limit.
    max_header_bytes: int = field(default=8190, metadata=_meta(lo=1024, hi=65536))
    max_headers: int = field(default=64, metadata=_meta(lo=8, hi=1024))
    #: The whole head's limit: request line and every header field together.
    max_head_bytes: int = field(default=16384, metadata=_meta(lo=2048, hi=1048576))
    #: From a request's first byte to the end of its head.
    head_timeout: float = field(default=10.0, metadata=_meta(lo=0.1, hi=600, duration=True))
    #: Unix-socket listeners: their mode (octal) and owning group (name or number; "" is
    #: the agent's own). Peers are known by SO_PEERCRED (principals unix:uid:, unix:gid:).
    socket_mode: str = DEFAULT_SOCKET_MODE
    socket_group: str = ""

    @property
    def socket_permissions(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def listeners(self) -> tuple[tuple[str, ListenAddress], ...]:
        """Every secrets listener: ``(dialect, address)``."""
        return tuple(
            parse_listener(text, listen_key(i, len(self.listen)))
            for i, text in enumerate(self.listen)
        )

    @property
    def address(self) -> ListenAddress:
        """Where the CLI reaches the agent: the first native listener, else the first."""
        listeners = self.listeners
        for dialect, address in listeners:
            if dialect == DIALECTS[0]:
                return address
        return listeners[0][1]


@dataclass(frozen=True, slots=True)
class KubernetesAuthConfig:
    """Callers proven by a projected service-account token (``Authorization: Bearer`` or
    the token header), verified against the cluster's JWKS; on when ``issuer`` is set."""

    issuer: str = ""
    audiences: tuple[str, ...] = (DEFAULT_SA_AUDIENCE,)
    #: A JWKS file; when empty, the JWKS is fetched from ``jwks_url``.
    jwks_file: str = ""
    jwks_url: str = IN_CLUSTER_JWKS_URL
    #: The agent's own service-account token and the cluster CA, for the API server.
    token_file: str = IN_CLUSTER_TOKEN_FILE
    ca_file: str = IN_CLUSTER_CA_FILE
    #: offline: the JWKS alone; tokenreview: the API server is asked too (deleted pods).
    mode: Literal["offline", "tokenreview"] = "offline"
    api_url: str = IN_CLUSTER_API_URL

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    headers: tuple[str, ...] = DEFAULT_TOKEN_HEADERS
    #: One token a line: ``TOKEN``, or ``NAME:TOKEN`` (the caller's principal token:NAME).
    token_files: tuple[str, ...] = ()
    token_env: tuple[str, ...] = DEFAULT_TOKEN_ENV
    generate_token: bool = True
    kubernetes: KubernetesAuthConfig = field(default_factory=KubernetesAuthConfig)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl: float = field(default=DEFAULT_TTL, metadata=_meta(lo=0, hi=86400 * 7, duration=True))
    jitter: float = field(default=0.1, metadata=_meta(lo=0, hi=0.5))
    max_entries: int = field(default=DEFAULT_MAX_ENTRIES, metadata=_meta(lo=1, hi=10_000_000))
    max_bytes: int = field(default=DEFAULT_MAX_BYTES, metadata=_meta(lo=1024))
    max_stale: float = field(default=DEFAULT_MAX_STALE, metadata=_meta(lo=0, duration=True))
    negative_ttl: float = field(default=5.0, metadata=_meta(lo=0, hi=3600, duration=True))
    refresh_window: float = field(default=0.2, metadata=_meta(lo=0, hi=0.9))
    refresh_min_interval: float = field(default=0.25, metadata=_meta(lo=0, hi=3600, duration=True))
    prefetch: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    access_log: bool = True
    log_hits: bool = False
    hit_summary_interval: float = field(default=60.0, metadata=_meta(lo=1, hi=86400, duration=True))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = DEFAULT_METRICS_LISTEN

    @property
    def address(self) -> ListenAddress | None:
        return parse_listen(self.listen, "metrics.listen") if self.listen else None


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One ``[[sources]]`` table; build it with :func:`source_config`."""

    name: str
    provider: str
    #: The provider's settings: ``SOURCE_OPTIONS[provider]``, built and checked.
    options: SourceOptions
    match: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: str = ""
    runtime_dir: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sources: tuple[SourceConfig, ...] = ()
    #: TOML files of ``[policies.NAME]`` tables besides the config's own (a ConfigMap of
    #: their own, say); watched and reloaded like the config file.
    policy_files: tuple[str, ...] = ()
    #: ``[policies]``, compiled (kms_agent.policy); empty: every caller may read everything.
    policies: PolicySet = field(default_factory=PolicySet)
    path: str = ""  # the file it was loaded from, if any

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def runtime_path(self) -> Path:
        return Path(self.runtime_dir)


# --------------------------------------------------------------------------- loading


class _EnvText(str):
    """A value that came from the environment: parsed from text, named by its variable."""

    __slots__ = ("var",)
    var: str

    def __new__(cls, text: str, var: str) -> _EnvText:  # noqa: PYI034
        obj = super().__new__(cls, text)
        obj.var = var
        return obj


_T = TypeVar("_T")


def _where(key: str, value: Any) -> str:
    return f"{key} (from ${value.var})" if isinstance(value, _EnvText) else key


#: How a union's message names what each of its members takes.
_KINDS = {str: "a string", int: "a whole number", float: "a number", bool: "a boolean"}


def _shown(value: Any, meta: Mapping[str, Any]) -> str:
    """``value`` as an error message may show it: a setting that holds a secret (its field
    is out of the repr) is never echoed, whatever was put there."""
    return "the value given" if meta.get("secret") else repr(value)


def _convert(tp: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    where = _where(key, value)
    shown = _shown(value, meta)
    env = isinstance(value, _EnvText)
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return _convert_union(get_args(tp), value, key, meta)
    if origin is Mapping:
        if not isinstance(value, Mapping):  # its type only: a misplaced value may be secret
            raise ConfigError(f"{where}: expected a table, got a {type(value).__name__}")
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{where}: {shown} is not allowed; use one of {allowed}")
        return str(value)
    if tp is bool:
        if env:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {shown} is not a boolean; use true or false")
    if tp is int:
        if env and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {shown} is not a whole number")
        return _bounded(value, value, where, meta)
    if tp is float:
        return _bounded(_number(value, where, meta), value, where, meta)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {shown} is not a string")
        return str(value)
    if origin is tuple:
        if env:
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, str) and meta.get("one_or_many"):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {shown} is not a list of strings")
        return tuple(value)
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")  # pragma: no cover


def _convert_union(members: tuple[Any, ...], value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """``X | None`` (None: not given) or ``X | Y``: the first member that takes ``value``."""
    given = [m for m in members if m is not type(None)]
    if value is None and len(given) < len(members):
        return None
    if len(given) == 1:
        return _convert(given[0], value, key, meta)
    for member in given:
        try:
            return _convert(member, value, key, meta)
        except ConfigError:
            continue
    kinds = " or ".join(_KINDS.get(m, repr(m)) for m in given)
    raise ConfigError(f"{_where(key, value)}: {_shown(value, meta)} is not {kinds}")


def _number(value: Any, where: str, meta: Mapping[str, Any]) -> float:
    """A finite number (an int, a float, or text: a number, or a duration where allowed)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {_shown(value, meta)} is not a number")
    number: float | None = None
    try:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            match = _DURATION_RE.fullmatch(value)
            if match and (meta.get("duration") or match.group(2) is None):
                number = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    except OverflowError:
        number = math.inf
    if number is not None:
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {_shown(value, meta)[:40]} is not a finite number")
        return number
    kind = (
        "a duration (seconds, or like '300ms', '30s', '5m', '1h')"
        if meta.get("duration")
        else "a number"
    )
    raise ConfigError(f"{where}: {_shown(value, meta)} is not {kind}")


def _bounded(value: float, given: Any, where: str, meta: Mapping[str, Any]) -> Any:
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{where}: {_shown(given, meta)} is out of range; use a value {bounds}")
    return value


def _build(
    cls: type[_T],
    table: Any,
    prefix: str,
    *,
    internal: Collection[str] = (),
    handled: Collection[str] = (),
) -> _T:
    """``cls`` from ``table``: every field's value converted by its type, unknown keys
    refused with the allowed ones listed. ``internal`` fields are not settable; ``handled``
    keys may be in the table but are the caller's to read."""
    if not isinstance(table, Mapping):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a table like [{where}], got a {type(table).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name not in internal}  # type: ignore[arg-type]
    for key in table:
        if key not in known and key not in handled:
            allowed = ", ".join(sorted([*known, *handled]))
            raise ConfigError(f"{prefix}{key}: unknown setting; allowed here: {allowed}")
    kwargs: dict[str, Any] = {}
    for name, fld in known.items():
        if name not in table:
            continue
        tp = hints[name]
        if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
            kwargs[name] = _build(tp, table[name], f"{prefix}{name}.")
        else:
            meta = {**fld.metadata, "secret": not fld.repr}
            kwargs[name] = _convert(tp, table[name], f"{prefix}{name}", meta)
    return cls(**kwargs)


def _options_class(provider: Any, key: str) -> type[SourceOptions]:
    if provider not in SOURCE_OPTIONS:
        allowed = ", ".join(repr(p) for p in PROVIDERS)
        raise ConfigError(f"{key}: {provider!r} is not a provider; use one of {allowed}")
    return SOURCE_OPTIONS[provider]


def source_config(
    name: str,
    provider: str,
    table: Mapping[str, Any] | None = None,
    match: tuple[str, ...] = ("*",),
) -> SourceConfig:
    """A source from its ``[[sources]]`` table, checked as the loader checks it: the
    provider's settings typed (:mod:`kms_agent.providers.options`), errors naming
    ``sources.NAME.KEY``. The table's own name, provider and match (if there) are not read:
    they are the arguments."""
    where = f"sources.{name}"
    cls = _options_class(provider, f"{where}.provider")
    options = _build(cls, {} if table is None else table, f"{where}.", handled=SOURCE_KEYS)
    options.validate(where)
    return SourceConfig(name=name, provider=provider, options=options, match=match)


def _build_sources(raw: Any) -> tuple[SourceConfig, ...]:
    if raw is None:
        return (source_config("local", "local"),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("sources: expected one or more [[sources]] tables")
    out: list[SourceConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        key = f"sources[{i}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key}: expected a table")
        name = table.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
            raise ConfigError(
                f"{key}.name: {name!r} must be 1-63 lowercase letters, digits, - or _"
            )
        if name in seen:
            raise ConfigError(f"{key}.name: {name!r} is used by another source")
        seen.add(name)
        provider = table.get("provider")
        _options_class(provider, f"{key}.provider")
        match = _convert(tuple[str, ...], table.get("match", ["*"]), f"{key}.match", {})
        if not match:
            raise ConfigError(f'{key}.match: give at least one name glob, like "*" or "aigw!*"')
        out.append(source_config(name, str(provider), table, match))
    return tuple(out)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``KMS_AGENT_<SECTION>_<KEY>`` (or ``KMS_AGENT_<KEY>`` at top level) as a raw table."""
    targets: dict[str, tuple[str, ...]] = {}

    def add(cls: type, where: tuple[str, ...]) -> None:
        hints = get_type_hints(cls)
        for sub in fields(cls):
            if hasattr(hints[sub.name], "__dataclass_fields__"):
                add(hints[sub.name], (*where, sub.name))
            else:
                targets[ENV_PREFIX + "_".join((*where, sub.name)).upper()] = (*where, sub.name)

    for top in fields(Config):
        if top.name in ("path", "sources", "policies"):
            continue
        section = get_type_hints(Config)[top.name]
        if hasattr(section, "__dataclass_fields__"):
            add(section, (top.name,))
        else:
            targets[f"{ENV_PREFIX}{top.name}".upper()] = (top.name,)
    out: dict[str, Any] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        where = targets.get(var)
        if where is None:
            raise ConfigError(
                f"${var}: unknown setting; kms-agent reads {', '.join(sorted(targets))}"
            )
        table = out
        for part in where[:-1]:
            table = table.setdefault(part, {})
        table[where[-1]] = _EnvText(text, var)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the config file (if any), apply env then ``overrides`` (CLI flags), validate."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_CONFIG):
        path = env[ENV_CONFIG]
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None
    raw = _merge(raw, _env_overrides(env))
    if overrides:
        raw = _merge(raw, overrides)
    sources = _build_sources(raw.pop("sources", None))
    own_policies = raw.pop("policies", {})
    cfg = _build(Config, raw, "", internal=("path",))
    policies = _policies(own_policies, cfg.policy_files)
    data_dir = cfg.data_dir or default_data_dir(env)
    runtime_dir = cfg.runtime_dir or default_runtime_dir(env, data_dir)
    cfg = _replace(
        cfg,
        data_dir=data_dir,
        runtime_dir=runtime_dir,
        sources=sources,
        policies=policies,
        path=os.fspath(path) if path is not None else "",
    )
    validate(cfg)
    return cfg


def _policies(own: Any, files: tuple[str, ...]) -> PolicySet:
    """The config's ``[policies]`` and those of ``policy_files``, compiled as one set; a
    name defined twice is an error naming both places."""
    if not isinstance(own, Mapping):
        raise ConfigError("policies: expected tables like [policies.NAME]")
    merged: dict[str, Any] = dict(own)
    defined = dict.fromkeys(own, "the config file")
    for i, name in enumerate(files):
        key = f"policy_files[{i}]"
        try:
            table = tomllib.loads(Path(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{key}: {name!r} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{key}: {name!r} cannot be read as TOML: {exc}") from None
        extra = set(table) - {"policies"}
        if extra:
            raise ConfigError(
                f"{key}: {name!r} may hold only [policies.NAME] tables, not {min(extra)}"
            )
        for policy, value in table.get("policies", {}).items():
            if policy in merged:
                raise ConfigError(
                    f"{key}: policy {policy!r} is defined in {defined[policy]} and in {name}"
                )
            merged[policy], defined[policy] = value, name
    return PolicySet.from_config(merged)


def _replace(cfg: Config, **changes: Any) -> Config:
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    values.update(changes)
    return Config(**values)


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    if not re.fullmatch(r"0?[0-7]{3}", cfg.server.socket_mode):
        raise ConfigError(
            f"server.socket_mode: {cfg.server.socket_mode!r} is not an octal file mode; "
            'write it like "0660" (owner and group may connect)'
        )
    k8s = cfg.auth.kubernetes
    if k8s.enabled and not k8s.audiences:
        raise ConfigError('auth.kubernetes.audiences: give at least one, like ["kms-agent"]')
    if k8s.enabled and not cfg.policies.enabled:
        raise ConfigError(
            "auth.kubernetes: service-account tokens need [policies]: any pod can get a token "
            "for the kms-agent audience, so without policies every pod would read everything",
            hint="add [policies.NAME] granting each service account its own secrets, e.g. "
            '"k8s:payments:app" -> "secret/payments/**"',
        )
    listeners = cfg.server.listeners
    if not listeners:
        raise ConfigError(f'server.listen: give at least one listener, like "{DEFAULT_LISTEN}"')
    for i, (_, address) in enumerate(listeners):
        if not address.is_loopback and not cfg.server.allow_non_loopback:
            raise ConfigError(
                f"{listen_key(i, len(listeners))}: {cfg.server.listen[i]!r} is not a loopback "
                "address; "
                "secrets would be served beyond this host. Set server.allow_non_loopback = true "
                "to mean it"
            )
    _ = cfg.metrics.address  # parses, or names the key
    for i, header in enumerate(cfg.auth.headers):
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header):
            raise ConfigError(f"auth.headers[{i}]: {header!r} is not an HTTP header name")
    if not cfg.auth.headers:
        raise ConfigError("auth.headers: give at least one token header name")
    for i, var in enumerate(cfg.auth.token_env):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            raise ConfigError(f"auth.token_env[{i}]: {var!r} is not an environment variable name")


def field_docs() -> dict[str, Any]:
    """Every key with its default, for ``check-config --defaults`` and the docs test."""
    out: dict[str, Any] = {}

    def add(section: Any, where: str) -> None:
        for sub in fields(section):
            value = getattr(section, sub.name)
            if hasattr(value, "__dataclass_fields__"):
                add(value, f"{where}.{sub.name}")
            else:
                out[f"{where}.{sub.name}"] = value

    cfg = Config()
    for top in fields(Config):
        if top.name in ("path", "sources", "policies"):
            continue
        value = getattr(cfg, top.name)
        if hasattr(value, "__dataclass_fields__"):
            add(value, top.name)
        else:
            out[top.name] = value if top.default is not MISSING else None
    return out
