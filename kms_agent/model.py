"""The canonical secret record every provider returns, and secret-name rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeVar

from kms_agent.errors import BadRequest

#: Letters, digits and ``! / . - _ @``: covers Alibaba default secrets (``aigw!secret-abc``),
#: Huawei default-key aliases (``csms/default``) and path-like names (``prod/db.password``).
#: The rule of the embedded store (see :data:`LOCAL_NAMES`).
NAME_RE = re.compile(r"[A-Za-z0-9!/._@-]{1,256}")
NAME_RULE = "1-256 characters from letters, digits and ! / . - _ @"


@dataclass(frozen=True, slots=True)
class Stages:
    """How one store spells the two stages every store has. The only stage table: callers'
    spellings are canonicalised with it before anything is keyed (:func:`canonical_stage`)."""

    current: str
    previous: str


#: Every spelling of "the current version" and "the one before", upper-cased.
CURRENT_ALIASES = frozenset({"ACSCURRENT", "AWSCURRENT", "SYSCURRENT", "CURRENT"})
PREVIOUS_ALIASES = frozenset({"ACSPREVIOUS", "AWSPREVIOUS", "SYSPREVIOUS", "PREVIOUS"})
ALIBABA_STAGES = Stages("ACSCurrent", "ACSPrevious")
AWS_STAGES = Stages("AWSCURRENT", "AWSPREVIOUS")
HUAWEI_STAGES = Stages("SYSCURRENT", "SYSPREVIOUS")

#: The local store speaks Alibaba's labels.
STAGE_CURRENT = ALIBABA_STAGES.current
STAGE_PREVIOUS = ALIBABA_STAGES.previous
STAGE_ALIASES = {
    **dict.fromkeys(CURRENT_ALIASES, STAGE_CURRENT),
    **dict.fromkeys(PREVIOUS_ALIASES, STAGE_PREVIOUS),
}


def canonical_stage(stage: str | None, stages: Stages, *, by_id: bool = False) -> str | None:
    """``stage`` as the store spells it; None for "the current version" when no version id
    is asked for too (so every spelling of the current version is one cache key)."""
    if stage is None:
        return None
    upper = stage.upper()
    if upper in CURRENT_ALIASES:
        return stages.current if by_id else None
    if upper in PREVIOUS_ALIASES:
        return stages.previous
    return stage


def stage_in(label: str, stages: Stages) -> str:
    """A record's stage ``label`` in another store's spelling (custom labels unchanged)."""
    upper = label.upper()
    if upper in CURRENT_ALIASES:
        return stages.current
    if upper in PREVIOUS_ALIASES:
        return stages.previous
    return label


#: Bytes no name may hold anywhere: C0 controls and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class NameRule:
    """Which secret names one kind of store accepts. Checked against the source a name
    routes to, after the rules every name obeys (:func:`check_name_for`)."""

    pattern: re.Pattern[str]
    text: str
    example: str = "'db-password'"
    #: Whole resource names (ARNs) the store also accepts as names.
    arn: re.Pattern[str] | None = None

    def accepts(self, name: str) -> bool:
        return self.pattern.fullmatch(name) is not None or (
            self.arn is not None and self.arn.fullmatch(name) is not None
        )


LOCAL_NAMES = NameRule(NAME_RE, NAME_RULE, "'db-password', 'aigw!secret-abc' or 'csms/default-db'")
#: Secrets Manager: names of 1-512 of ``A-Za-z0-9/_+=.@-``; full and partial ARNs.
AWS_NAMES = NameRule(
    re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}"),
    "1-512 characters from letters, digits and / _ + = . @ -, or a secret ARN",
    "'prod/db' or 'arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf'",
    re.compile(r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}"),
)
#: Alibaba KMS: letters, digits and ``_ / + = . @ - !``; secret ARNs for cross-account reads.
ALIBABA_NAMES = NameRule(
    re.compile(r"[A-Za-z0-9_/+=.@!-]{1,192}"),
    "1-192 characters from letters, digits and _ / + = . @ - !, or a secret ARN",
    "'aigw!secret-abc' or 'acs:kms:cn-hangzhou:123456789012:secret/aigw!secret-abc'",
    re.compile(r"acs:kms:[a-z0-9-]+:\d+:secret/[A-Za-z0-9_/+=.@!-]{1,192}"),
)
#: Huawei CSMS: ``^[a-zA-Z0-9_-]{1,64}$``, no ``/`` or ``!``.
HUAWEI_NAMES = NameRule(
    re.compile(r"[a-zA-Z0-9_-]{1,64}"), "1-64 letters, digits, _ or -", "'db-password'"
)
#: Vault KV: path segments of any printable characters.
VAULT_NAMES = NameRule(
    re.compile(r"[^\x00-\x1f\x7f]{1,1024}"), "a KV path of 1-1024 characters", "'app/db'"
)


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def check_name_for(name: str, rule: NameRule) -> str:
    """``name`` if every name's rules and ``rule`` accept it, else raise :class:`BadRequest`.

    Every name: no control characters, no empty, ``.`` or ``..`` path segment."""
    if not name:
        raise BadRequest(
            f"the secret name is empty: use {rule.text}", hint=f"names look like {rule.example}"
        )
    if _CONTROL.search(name) is not None:
        raise BadRequest("the secret name holds a control character")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise BadRequest(
            f"invalid secret name {_shown(name)}: no empty, '.' or '..' path segment",
            hint=f"names look like {rule.example}",
        )
    if not rule.accepts(name):
        raise BadRequest(
            f"invalid secret name {_shown(name)}: use {rule.text}",
            hint=f"the source it routes to takes {rule.text}; names look like {rule.example}",
        )
    return name


DataType = Literal["text", "binary"]
_T = TypeVar("_T")

#: The ``extra`` of records that have none: one shared read-only mapping, not a dict each
#: (a cache of many secrets holds many records).
NO_EXTRA: Mapping[str, str] = MappingProxyType({})


def _no_extra() -> Mapping[str, str]:
    return NO_EXTRA


def shared(table: dict[_T, _T], value: _T, limit: int) -> _T:
    """``value``, or the equal one already in ``table`` (which holds up to ``limit``): what
    many cached records repeat (stage labels, body tails) is then one object, not one each."""
    if len(table) < limit or value in table:
        return table.setdefault(value, value)
    return value


def check_name(name: str) -> str:
    """Return ``name`` if the embedded store accepts it, else raise :class:`BadRequest`."""
    return check_name_for(name, LOCAL_NAMES)


class SecretValue:
    """A secret's bytes. ``repr`` and ``str`` never show them."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def reveal(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other._data == self._data

    def __hash__(self) -> int:
        return hash(self._data)

    def __repr__(self) -> str:
        return f"SecretValue(<{len(self._data)} bytes redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """One version of one secret, as a provider returns it."""

    name: str
    value: SecretValue
    data_type: DataType
    version_id: str
    version_stages: tuple[str, ...]
    created: float  # epoch seconds
    source: str
    secret_type: str = "Generic"  # noqa: S105
    extra: Mapping[str, str] = field(default_factory=_no_extra)

    def text(self) -> str:
        """The value as text (only meaningful when ``data_type == "text"``)."""
        return self.value.reveal().decode("utf-8")


@dataclass(frozen=True, slots=True)
class SecretMetadata:
    """What ``describe`` returns: everything but the value."""

    name: str
    source: str
    created: float
    versions: tuple[tuple[str, tuple[str, ...]], ...]  # (version id, stages)
    secret_type: str = "Generic"  # noqa: S105
    extra: dict[str, str] = field(default_factory=dict)
