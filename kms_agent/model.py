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
NAME_RE = re.compile(r"[A-Za-z0-9!/._@-]{1,256}")
NAME_RULE = "1-256 characters from letters, digits and ! / . - _ @"

#: Stage labels. The local store speaks Alibaba's; AWS's are accepted as aliases.
STAGE_CURRENT = "ACSCurrent"
STAGE_PREVIOUS = "ACSPrevious"
STAGE_ALIASES = {
    "ACSCURRENT": STAGE_CURRENT,
    "AWSCURRENT": STAGE_CURRENT,
    "ACSPREVIOUS": STAGE_PREVIOUS,
    "AWSPREVIOUS": STAGE_PREVIOUS,
}

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
    """Return ``name`` if it is a valid secret name, else raise :class:`BadRequest`."""
    if NAME_RE.fullmatch(name) is None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise BadRequest(
            f"invalid secret name {shown!r}: use {NAME_RULE}",
            hint="names look like 'db-password', 'aigw!secret-abc' or 'csms/default-db'",
        )
    return name


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
