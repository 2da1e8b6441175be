"""The dkms-gcs protocol of a KMS instance's dedicated gateway, apart from its signature.

Three proto3 messages (package ``protobuf`` in the SDK's ``openapi_util/protobuf/api_pb2.py``):
GetSecretValueRequest, GetSecretValueResponse and the Error body of every failed call.

Protobuf by hand, not the ``protobuf`` package: the three messages are flat, with four
kinds of field (string, bool, int32, repeated string) over two wire types, about 180 lines
here with the field tables and refusals. The package would need generated code (protoc,
or descriptors built at import) and type stubs for mypy strict, costs 20-30 ms of import
(measured, 3.20.3), and would tie the agent to the SDK's pin: ``alibabacloud-dkms-gcs``
requires ``protobuf<4``, a line that stopped at 3.20.3, so the judge our tests use could
not share an environment with a current protobuf. Tests check both directions against the
SDK's own generated classes on random messages (hypothesis), unknown fields included.

Decoding is proto3's: fields in any order, the last of a singular field given twice
wins, unknown fields (varint, fixed32/64, length-delimited, groups) are skipped. It is
stricter than protobuf-python (3.20) in two ways, so garbage is never read as an empty
secret: a known field with the wrong wire type is refused (protobuf-python keeps it as an
unknown field), and so is a group closed by another field's end tag. Every refusal is
:class:`MalformedMessage` (a ``ValueError``) saying where, never what the bytes were.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

Kind = Literal["string", "bool", "int32", "strings"]

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
_WIRE: dict[Kind, int] = {"string": LENGTH, "bool": VARINT, "int32": VARINT, "strings": LENGTH}
_WIRE_NAMES = ("varint", "fixed64", "length-delimited", "start-group", "end-group", "fixed32")
_MASK64 = (1 << 64) - 1
_MAX_FIELD = (1 << 29) - 1
_INT32 = range(-(1 << 31), 1 << 31)


class MalformedMessage(ValueError):
    """Bytes that are not the protobuf message they were read as."""


# ---------------------------------------------------------------------------- wire format


def _varint(value: int) -> bytes:
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    start, result, shift = pos, 0, 0
    while True:
        if pos >= len(data):
            raise MalformedMessage(f"{what}: truncated varint at byte {start}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise MalformedMessage(f"{what}: varint longer than 10 bytes at byte {start}")


def _fields(data: bytes, what: str) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or varint value) of each top-level
    field (a group only as its start tag, then skipped); lengths are bounds-checked."""
    pos = 0
    groups: list[int] = []  # open unknown groups, innermost last
    while pos < len(data):
        at = pos
        key, pos = _read_varint(data, pos, what)
        number, wire = key >> 3, key & 7
        if not 0 < number <= _MAX_FIELD:
            raise MalformedMessage(f"{what}: field number {number} at byte {at} is invalid")
        if wire == VARINT:
            value, pos = _read_varint(data, pos, what)
            end = value
        elif wire == LENGTH:
            length, pos = _read_varint(data, pos, what)
            end = pos + length
            if end > len(data):
                raise MalformedMessage(
                    f"{what}: field {number} at byte {at} has length {length}, "
                    f"past the end ({len(data)} bytes)"
                )
        elif wire in (FIXED64, FIXED32):
            end = pos + (8 if wire == FIXED64 else 4)
            if end > len(data):
                raise MalformedMessage(f"{what}: field {number} at byte {at} is truncated")
        elif wire == START_GROUP:
            if not groups:
                yield number, wire, pos, pos
            groups.append(number)
            continue
        elif wire == END_GROUP:
            if not groups or groups.pop() != number:
                raise MalformedMessage(f"{what}: unexpected end-group tag at byte {at}")
            continue
        else:
            raise MalformedMessage(f"{what}: invalid wire type {wire} at byte {at}")
        if not groups:
            yield number, wire, pos, end
        if wire != VARINT:
            pos = end
    if groups:
        raise MalformedMessage(f"{what}: group {groups[-1]} is not closed")


class Message:
    """A flat proto3 message; subclasses are frozen dataclasses listing their ``FIELDS``
    as (number, proto name, attribute, kind)."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[tuple[int, str, str, Kind], ...]]

    def encode(self) -> bytes:
        """Fields in number order, proto3 defaults omitted (repeated items never are)."""
        out = bytearray()
        for number, name, attr, kind in self.FIELDS:
            value = getattr(self, attr)
            key = _varint(number << 3 | _WIRE[kind])
            if kind == "int32" and value not in _INT32:
                raise ValueError(f"{type(self).__name__}.{name}: {value} is not an int32")
            items = list(value) if kind == "strings" else [value] if value else []
            for item in items:
                out += key
                if kind in ("string", "strings"):
                    raw = item.encode("utf-8")
                    out += _varint(len(raw)) + raw
                else:
                    out += _varint(int(item))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        what = cls.__name__
        by_number = {f[0]: f for f in cls.FIELDS}
        values: dict[str, Any] = {}
        for number, wire, start, end in _fields(data, what):
            known = by_number.get(number)
            if known is None:
                continue
            _, name, attr, kind = known
            if wire != _WIRE[kind]:
                raise MalformedMessage(
                    f"{what}: field {number} ({name}) is {_WIRE_NAMES[wire]}, "
                    f"expected {_WIRE_NAMES[_WIRE[kind]]}"
                )
            if kind == "bool":
                values[attr] = end != 0
            elif kind == "int32":
                low = end & 0xFFFFFFFF
                values[attr] = low - (1 << 32) if low >> 31 else low
            else:
                try:
                    text = data[start:end].decode("utf-8")
                except UnicodeDecodeError:
                    raise MalformedMessage(
                        f"{what}: field {number} ({name}) is not valid UTF-8"
                    ) from None
                if kind == "strings":
                    values.setdefault(attr, []).append(text)
                else:
                    values[attr] = text
        for _, _, attr, kind in cls.FIELDS:
            if kind == "strings" and attr in values:
                values[attr] = tuple(values[attr])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class GetSecretValueRequest(Message):
    FIELDS: ClassVar[tuple[tuple[int, str, str, Kind], ...]] = (
        (1, "SecretName", "secret_name", "string"),
        (2, "VersionStage", "version_stage", "string"),
        (3, "VersionId", "version_id", "string"),
        (4, "FetchExtendedConfig", "fetch_extended_config", "bool"),
    )

    secret_name: str = ""
    version_stage: str = ""
    version_id: str = ""
    fetch_extended_config: bool = False


@dataclass(frozen=True, slots=True)
class GetSecretValueResponse(Message):
    """``secret_data`` is the value (text, or base64 when ``secret_data_type`` is
    ``binary``); it never shows in ``repr``."""

    FIELDS: ClassVar[tuple[tuple[int, str, str, Kind], ...]] = (
        (1, "SecretName", "secret_name", "string"),
        (2, "SecretType", "secret_type", "string"),
        (3, "SecretData", "secret_data", "string"),
        (4, "SecretDataType", "secret_data_type", "string"),
        (5, "VersionStages", "version_stages", "strings"),
        (6, "VersionId", "version_id", "string"),
        (7, "CreateTime", "create_time", "string"),
        (8, "RequestId", "request_id", "string"),
        (9, "LastRotationDate", "last_rotation_date", "string"),
        (10, "NextRotationDate", "next_rotation_date", "string"),
        (11, "ExtendedConfig", "extended_config", "string"),
        (12, "AutomaticRotation", "automatic_rotation", "string"),
        (13, "RotationInterval", "rotation_interval", "string"),
    )

    secret_name: str = ""
    secret_type: str = ""
    secret_data: str = field(default="", repr=False)
    secret_data_type: str = ""
    version_stages: tuple[str, ...] = ()
    version_id: str = ""
    create_time: str = ""
    request_id: str = ""
    last_rotation_date: str = ""
    next_rotation_date: str = ""
    extended_config: str = ""
    automatic_rotation: str = ""
    rotation_interval: str = ""


@dataclass(frozen=True, slots=True)
class Error(Message):
    """The body of every 4xx/5xx answer (the SDK reads all but ``status_code``)."""

    FIELDS: ClassVar[tuple[tuple[int, str, str, Kind], ...]] = (
        (1, "StatusCode", "status_code", "int32"),
        (2, "ErrorCode", "error_code", "string"),
        (3, "ErrorMessage", "error_message", "string"),
        (4, "RequestId", "request_id", "string"),
    )

    status_code: int = 0
    error_code: str = ""
    error_message: str = ""
    request_id: str = ""
