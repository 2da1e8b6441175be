"""The request grammar: the only place that knows routes, parameters, names and stages.

Pure: it turns a request's target (and the listener's dialect) into a typed
:class:`Request`, or raises an :class:`~kms_agent.errors.AgentError`. It knows nothing of
sockets, HTTP framing, tokens or the cache. The protocol parses HTTP (llhttp); the pipeline
(:mod:`kms_agent.front`) decides in which order the checks run; this module answers "what
is being asked for".

Dialects (one per listener):

* ``native``: ``/secrets/{name}``, ``/secrets?prefix=``, the health routes, and the AWS /
  Alibaba agents' ``/secretsmanager/get`` and ``/v1/{name}`` in the dialect that
  ``server.response_type`` names, so clients of either agent work on the default port.
* ``aws``: exactly the AWS Workload Credentials Provider's routes.
* ``kms``: the Alibaba Cloud KMS Agent's (the same routes, Alibaba's shapes).
* ``vault``: the Vault KV v2 read API, for unmodified hvac and ``bao``/``vault`` CLIs.

Stage spellings are canonicalised here, before anything is keyed: ``AWSCURRENT``,
``acscurrent`` and no stage at all are one cache key; ``AWSPREVIOUS`` becomes the source's
own spelling of "previous".
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, unquote_to_bytes

from kms_agent.errors import BadRequest, RouteNotFound
from kms_agent.model import NameRule, Stages, canonical_stage, check_name_for


class Dialect(enum.Enum):
    NATIVE = "native"
    AWS = "aws"
    KMS = "kms"
    VAULT = "vault"


DIALECTS = tuple(d.value for d in Dialect)


class Kind(enum.Enum):
    SECRET = "secret"  # noqa: S105
    LIST = "list"
    HEALTH = "health"
    READY = "ready"
    PING = "ping"
    VAULT_MOUNTS = "vault_mounts"
    VAULT_SELF = "vault_self"
    VAULT_METADATA = "vault_metadata"


#: Version ids and stage labels: what every store's ids and labels are made of.
VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
VERSION_RULE = "version ids and stages are 1-128 letters, digits, '.', '_' or '-'"
#: Booleans in query parameters, compared case-insensitively.
BOOLEANS = {"true": True, "false": False, "1": True, "0": False}
#: Query parameters a request may carry before it is refused (parse cost is bounded).
MAX_PARAMS = 16
#: Characters shown of a caller's name or value in a message: never the whole of a flood.
SHOWN = 80
#: The Vault mount the vault dialect answers for (any source behind it).
VAULT_MOUNT = "secret"
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class Target(enum.Enum):
    """What a route's path holds after its literal start."""

    NONE = 0  # the path is the route
    NAME = 1  # the rest of the path is the secret name
    VAULT = 2  # ``{mount}/data/{path}``, ``{mount}/metadata/{path}`` and the sys routes


@dataclass(frozen=True, slots=True)
class Route:
    """One route of one dialect. ``template`` is its label in metrics and logs."""

    template: str
    kind: Kind
    #: Who answers: its error bodies and secret shape (native's compat routes answer as
    #: the AWS or Alibaba agent does).
    dialect: Dialect
    params: frozenset[str] = frozenset()
    public: bool = False
    target: Target = Target.NONE
    #: Body shape of a secret: "native", "raw" (format=raw), "aws", "kms" or "vault".
    shape: str = "native"


@dataclass(frozen=True, slots=True)
class Request:
    """What a caller asked for, checked and canonical. Its cache key is :attr:`key`."""

    route: Route
    source: str = ""
    name: str = ""
    version_id: str | None = None
    version_stage: str | None = None
    refresh: bool = False
    field: str | None = None
    shape: str = "native"
    prefix: str = ""
    role_arn: str | None = None
    #: The cache key: ``(source, name, version_id, version_stage)``, made once.
    key: tuple[str, str, str | None, str | None] = dataclasses.field(init=False, compare=False)
    #: A plain secret read (no refresh, field or role): a fresh hit answers it as it is.
    hot: bool = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        source = self.source if self.role_arn is None else as_role(self.source, self.role_arn)
        key = (source, self.name, self.version_id, self.version_stage)
        object.__setattr__(self, "key", key)
        hot = self.route.kind is Kind.SECRET and not self.refresh and self.field is None
        object.__setattr__(self, "hot", hot and self.role_arn is None)


#: Between a source's name and a role in a cache key's first part: a value read as one role
#: is another entry than the same name read as another role (or as the source itself).
#: Source names are lowercase letters, digits, - and _, so it cannot occur in one.
ROLE_KEY = "|as:"


def as_role(source: str, role_arn: str) -> str:
    """The cache key's first part for ``source`` read as ``role_arn``."""
    return f"{source}{ROLE_KEY}{role_arn}"


def source_and_role(part: str) -> tuple[str, str | None]:
    """A cache key's first part split into the source's name and the role, if any."""
    source, found, role = part.partition(ROLE_KEY)
    return source, (role if found else None)


class Source(Protocol):
    """What the grammar needs of the source a name routes to (providers satisfy it)."""

    @property
    def name(self) -> str: ...
    @property
    def name_rule(self) -> NameRule: ...
    @property
    def stages(self) -> Stages: ...


#: A name's source: the router's ``route``; raises BadRequest when no source serves it.
RouteName = Callable[[str], Source]

_AWS_PARAMS = frozenset({"versionId", "versionStage", "refreshNow", "roleArn"})


def _compat(dialect: Dialect) -> tuple[tuple[bytes, Route], ...]:
    shape = dialect.value
    return (
        (
            b"/secretsmanager/get",
            Route(
                "/secretsmanager/get",
                Kind.SECRET,
                dialect,
                _AWS_PARAMS | {"secretId"},
                shape=shape,
            ),
        ),
        (
            b"/v1/",
            Route("/v1/{name}", Kind.SECRET, dialect, _AWS_PARAMS, target=Target.NAME, shape=shape),
        ),
    )


_NATIVE_SECRET = Route(
    "/secrets/{name}",
    Kind.SECRET,
    Dialect.NATIVE,
    frozenset({"version_id", "version_stage", "refresh", "field", "format"}),
    target=Target.NAME,
)
_HEALTH = (
    (b"/healthz", Route("/healthz", Kind.HEALTH, Dialect.NATIVE, public=True)),
    (b"/readyz", Route("/readyz", Kind.READY, Dialect.NATIVE, public=True)),
)


@dataclass(frozen=True, slots=True)
class Routes:
    """One listener's routes: exact paths, then literal prefixes (longest first)."""

    dialect: Dialect
    exact: Mapping[bytes, Route]
    prefixes: tuple[tuple[bytes, Route], ...]

    def find(self, path: bytes) -> tuple[Route, bytes] | None:
        """The route of a raw path and what follows its literal start, else None."""
        route = self.exact.get(path)
        if route is not None:
            return route, b""
        for start, route in self.prefixes:
            if path.startswith(start):
                return route, path[len(start) :]
        return None

    def describe(self) -> str:
        names = [r.template for r in self.exact.values()]
        names += [r.template for _, r in self.prefixes]
        return ", ".join(dict.fromkeys(names))


def _add(
    exact: dict[bytes, Route],
    prefixes: list[tuple[bytes, Route]],
    table: tuple[tuple[bytes, Route], ...],
) -> None:
    """Paths ending in ``/`` are prefixes (the rest is the name); others are exact."""
    for path, route in table:
        if path.endswith(b"/"):
            prefixes.append((path, route))
        else:
            exact[path] = route


def routes(dialect: Dialect, response_type: str = "aws") -> Routes:
    """The route table of a listener speaking ``dialect``."""
    exact: dict[bytes, Route] = {}
    prefixes: list[tuple[bytes, Route]] = []
    if dialect is Dialect.NATIVE:
        exact[b"/secrets"] = Route("/secrets", Kind.LIST, Dialect.NATIVE, frozenset({"prefix"}))
        prefixes.append((b"/secrets/", _NATIVE_SECRET))
        exact.update(_HEALTH)
        exact[b"/ping"] = Route("/ping", Kind.PING, Dialect.NATIVE, public=True)
        _add(exact, prefixes, _compat(Dialect(response_type)))
    elif dialect in (Dialect.AWS, Dialect.KMS):
        exact[b"/ping"] = Route("/ping", Kind.PING, dialect, public=True)
        _add(exact, prefixes, _compat(dialect))
    else:
        exact[b"/v1/sys/health"] = Route("/v1/sys/health", Kind.HEALTH, dialect, public=True)
        exact[b"/v1/auth/token/lookup-self"] = Route(
            "/v1/auth/token/lookup-self", Kind.VAULT_SELF, dialect
        )
        prefixes.append(
            (
                b"/v1/sys/internal/ui/mounts/",
                Route("/v1/sys/internal/ui/mounts/{path}", Kind.VAULT_MOUNTS, dialect,
                      target=Target.NAME),
            )
        )  # fmt: skip
        prefixes.append(
            (
                b"/v1/",
                Route("/v1/{mount}/data/{path}", Kind.SECRET, dialect, frozenset({"version"}),
                      target=Target.VAULT, shape="vault"),
            )
        )  # fmt: skip
    prefixes.sort(key=lambda item: -len(item[0]))
    return Routes(dialect, exact, tuple(prefixes))


VAULT_METADATA = Route(
    "/v1/{mount}/metadata/{path}", Kind.VAULT_METADATA, Dialect.VAULT, target=Target.VAULT
)


# --------------------------------------------------------------------------- decoding


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """``(path, query)`` of an origin-form target; anything else is refused."""
    if not target.startswith(b"/"):
        if target == b"*":
            raise BadRequest("the asterisk-form target is for OPTIONS; the agent only reads")
        raise BadRequest(
            "absolute-form targets are for proxies; the agent is called directly",
            hint="send the path alone: GET /secrets/NAME",
        )
    if not target.isascii():
        raise BadRequest("the request target holds non-ASCII bytes; percent-encode them")
    path, _, query = target.partition(b"?")
    path, _, _ = path.partition(b"#")
    return path, query


def decode(raw: bytes, what: str) -> str:
    """Percent-decoded UTF-8 text of a path part; malformed escapes are refused."""
    if b"%" not in raw:
        return raw.decode("ascii")
    if _BAD_ESCAPE.search(raw) is not None:
        raise BadRequest(f"the {what} holds a malformed percent-escape")
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the {what} is not UTF-8 once percent-decoded") from None


#: An IAM role ARN, as the AWS agent checks ``roleArn``.
ROLE_ARN_RE = re.compile(r"arn:[\w-]+:iam::\d{12}:role/[\w+=,.@/-]+")
#: The AWS agent's (and the Alibaba agent's) own words for a caller's mistakes.
_AGENT_WORDS = {
    "unknown": "unknown parameter: {key}",
    "missing_id": "missing parameter secretId",
    "missing_path": "missing secret ID",
    "refresh": "invalid refreshNow value",
    "role": "invalid roleArn format, expected arn:<partition>:iam::<account>:role/<name>",
}


def _agent(route: Route) -> bool:
    """Whether the route answers in the AWS/Alibaba agents' words."""
    return route.dialect in (Dialect.AWS, Dialect.KMS)


def params(query: bytes, route: Route) -> dict[str, str]:
    """The query's parameters: each known to the route, each once (a repeated parameter is
    refused: which one a caller meant is not guessed)."""
    if not query:
        return {}
    try:
        pairs = parse_qsl(
            query.decode("ascii"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_PARAMS,
        )
    except UnicodeDecodeError:
        raise BadRequest("the query is not UTF-8 once percent-decoded") from None
    except ValueError:
        raise BadRequest(f"more than {MAX_PARAMS} query parameters") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in route.params:
            if _agent(route):
                raise BadRequest(_AGENT_WORDS["unknown"].format(key=key[:SHOWN]))
            raise BadRequest(
                f"unknown query parameter {key[:SHOWN]!r}",
                hint=f"{route.template} takes: {', '.join(sorted(route.params)) or 'none'}",
            )
        if key in out:
            raise BadRequest(f"query parameter {key!r} is given more than once")
        out[key] = value
    return out


def flag(values: Mapping[str, str], key: str, route: Route) -> bool:
    text = values.get(key)
    if text is None:
        return False
    value = BOOLEANS.get(text.lower())
    if value is None:
        if _agent(route):
            raise BadRequest(_AGENT_WORDS["refresh"])
        raise BadRequest(
            f"query parameter {key}={text[:SHOWN]!r} is not a boolean; use true or false"
        )
    return value


def version_part(values: Mapping[str, str], key: str) -> str | None:
    text = values.get(key)
    if text is None:
        return None
    if VERSION_RE.fullmatch(text) is None:
        raise BadRequest(f"query parameter {key}={text[:SHOWN]!r} is not valid", hint=VERSION_RULE)
    return text


# --------------------------------------------------------------------------- requests


def secret(
    route: Route,
    name: str,
    source_of: RouteName,
    *,
    version_id: str | None = None,
    version_stage: str | None = None,
    refresh: bool = False,
    field: str | None = None,
    shape: str | None = None,
    role_arn: str | None = None,
) -> Request:
    """A secret read: the name checked against its source's rule, the stage canonical."""
    if not name:
        raise BadRequest("the secret name is empty", hint="call /secrets/NAME")
    source = source_of(name)
    check_name_for(name, source.name_rule)
    stage = canonical_stage(version_stage, source.stages, by_id=version_id is not None)
    return Request(
        route,
        source=source.name,
        name=name,
        version_id=version_id,
        version_stage=stage,
        refresh=refresh,
        field=field,
        shape=shape or route.shape,
        role_arn=role_arn,
    )


def parse(found: tuple[Route, bytes], query: bytes, source_of: RouteName) -> Request:
    """The request for a route :meth:`Routes.find` found; raises on bad input."""
    route, rest = found
    kind = route.kind
    if route.target is Target.VAULT:
        return _vault(route, rest, query, source_of)
    if route.public:
        return Request(route)  # health routes take no parameters and ignore any query
    values = params(query, route)
    if kind is Kind.SECRET:
        if route.dialect is Dialect.NATIVE:
            fmt = values.get("format", "json")
            if fmt not in ("json", "raw"):
                raise BadRequest(
                    f"format={fmt[:SHOWN]!r} is not known; use format=raw or leave it out"
                )
            field = values.get("field")
            if field is not None and not field:
                raise BadRequest("field= names no key", hint="give ?field=KEY or leave it out")
            return secret(
                route,
                decode(rest, "secret name"),
                source_of,
                version_id=version_part(values, "version_id"),
                version_stage=version_part(values, "version_stage"),
                refresh=flag(values, "refresh", route),
                field=field,
                shape="raw" if fmt == "raw" else "native",
            )
        if route.target is Target.NAME:
            name = decode(rest, "secret name")
            if not name:
                raise BadRequest(_AGENT_WORDS["missing_path"])
        else:
            name = values.get("secretId", "")
            if not name:
                raise BadRequest(
                    _AGENT_WORDS["missing_id"], hint="call /secretsmanager/get?secretId=NAME"
                )
        refresh = flag(values, "refreshNow", route)
        role = values.get("roleArn")
        if role is not None and ROLE_ARN_RE.fullmatch(role) is None:
            raise BadRequest(_AGENT_WORDS["role"])
        return secret(
            route,
            name,
            source_of,
            version_id=version_part(values, "versionId"),
            version_stage=version_part(values, "versionStage"),
            refresh=refresh,
            role_arn=role,
        )
    if kind is Kind.LIST:
        prefix = values.get("prefix", "")
        if len(prefix) > 512 or any(ord(c) < 32 or ord(c) == 127 for c in prefix):
            raise BadRequest(f"prefix {prefix[:SHOWN]!r} is not valid")
        return Request(route, prefix=prefix)
    if kind is Kind.VAULT_MOUNTS:
        return Request(route, name=decode(rest, "path"))
    return Request(route)


def _vault(route: Route, rest: bytes, query: bytes, source_of: RouteName) -> Request:
    """``{mount}/data/{path}[?version=N]`` and ``{mount}/metadata/{path}``."""
    mount, _, tail = rest.partition(b"/")
    kind, _, path = tail.partition(b"/")
    if kind == b"metadata":
        route = VAULT_METADATA
    elif kind != b"data":
        raise RouteNotFound(f"no handler for route {decode(rest, 'path')[:SHOWN]!r}")
    if decode(mount, "mount") != VAULT_MOUNT:
        raise RouteNotFound(
            f"no handler for route {decode(rest, 'path')[:SHOWN]!r}",
            hint=f"the agent serves the KV v2 mount {VAULT_MOUNT!r}",
        )
    values = params(query, route)
    version: str | None = values.get("version")
    if version is not None:
        if not version.isdigit() or len(version) > 18:
            raise BadRequest(f"version {version[:SHOWN]!r} is not a whole number")
        version = None if int(version) == 0 else str(int(version))
    return secret(route, decode(path, "path"), source_of, version_id=version)
