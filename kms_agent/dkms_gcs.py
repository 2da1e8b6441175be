"""The dkms-gcs protocol of a KMS instance's dedicated gateway, apart from its signature.

Three proto3 messages (package ``protobuf`` in the SDK's ``openapi_util/protobuf/api_pb2.py``),
the mapping of the gateway's ``Error`` bodies onto the agent's vocabulary, and the SDK's
retry rule as data. The signature is :mod:`kms_agent.signing.dkms`.

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

from kms_agent.errors import (
    AccessDenied,
    AgentError,
    BadCredentials,
    DecryptDenied,
    InvalidUpstreamRequest,
    PendingDeletion,
    SecretNotFound,
    SourceFailing,
    Throttled,
    Unavailable,
    UpstreamError,
)

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


# ---------------------------------------------------------------------------- errors

#: Codes that say the credentials or the signature were refused: the shared gateway's
#: (OpenAPI common errors) and the instance API's ("Common error codes" of the KMS instance
#: API: 401 ``SignatureNotMatch``, 404 ``Unauthorized`` for an unknown ClientKey, 400
#: ``RequestTimeTooSkewed``).
BAD_CREDENTIAL_CODE_PREFIXES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "SignatureNotMatch",
    "Unauthorized",
    "IncompleteSignature",
    "InvalidSecurityToken",
    "IllegalTimestamp",
    "SignatureNonceUsed",
    "RequestTimeTooSkewed",
)
#: Codes that say the service failed, whatever the HTTP status.
UNAVAILABLE_CODES = frozenset({"InternalFailure", "ServiceUnavailableTemporary"})


def error_kind(status: int, code: str, message: str) -> type[UpstreamError]:
    """Which error an Alibaba KMS answer is, by its code (and status where the code says
    nothing): the rule of both gateways, which add their own messages and hints."""
    if code == "Forbidden.ResourceNotFound":
        return SecretNotFound
    if code == "Forbidden.NoPermission" and "kms:Decrypt" in message:
        return DecryptDenied
    if code.startswith("Forbidden"):
        return AccessDenied
    if code == "Rejected.ResourceInDeleteWindow":
        return PendingDeletion
    if "Throttling" in code or status == 429:
        return Throttled
    if code.startswith(BAD_CREDENTIAL_CODE_PREFIXES) or status == 401:
        return BadCredentials
    if code == "InvalidParam" and "Authorization" in message:
        return BadCredentials  # the transfer SDKs' IncompleteSignature
    if status >= 500 or code in UNAVAILABLE_CODES:
        return Unavailable
    return InvalidUpstreamRequest


_HINTS: dict[type[UpstreamError], str] = {
    SecretNotFound: "check the name (default secrets carry their product prefix, like "
    "aigw!...) and that the endpoint is the KMS instance that holds the secret",
    DecryptDenied: "the ClientKey may read the secret but not decrypt it: the application "
    "access point's permission policy must also cover the secret's key",
    AccessDenied: "the ClientKey's application access point has no permission policy for "
    "this secret, or its network rule does not allow this host's address: add both",
    PendingDeletion: "restore the secret with RestoreSecret within its recovery window, or "
    "read another secret",
    Throttled: "the KMS instance's QPS is what was bought, shared by every client; lower "
    "rate_limit_qps or raise cache.ttl",
    BadCredentials: "check that client_key_file is a current ClientKey of this instance "
    "(not expired or deleted) and the host's clock (within 15 minutes)",
}


def map_error(status: int, error: Error, *, endpoint: str, name: str = "") -> UpstreamError:
    """The agent's error for a ``status`` answer carrying ``error``, remembering what the
    gateway said (``.upstream``). ``name`` is the secret asked for, if any."""
    code = error.error_code[:100]
    message = error.error_message[:300]
    said = f"Alibaba KMS instance at {endpoint}: {code or f'HTTP {status}'}"
    if error.request_id:
        said += f" (request {error.request_id[:80]})"
    kind = error_kind(status, code, message)
    secret = f"secret {name!r}" if name else "the request"
    text = {
        SecretNotFound: f"{secret} does not exist in the instance",
        DecryptDenied: f"{secret} may be read but not decrypted with this ClientKey",
        AccessDenied: f"the ClientKey may not read {secret}",
        PendingDeletion: f"{secret} is scheduled for deletion",
        Throttled: "throttled",
        BadCredentials: "the ClientKey or the request's signature was refused",
        Unavailable: "the instance failed",
    }.get(kind, message or "request refused")
    mapped = kind(f"{said}: {text}", hint=_HINTS.get(kind))
    mapped.upstream(status, code, message)
    return mapped


def classify(status: int, body: bytes, *, endpoint: str, name: str = "") -> UpstreamError:
    """:func:`map_error` for a raw 4xx/5xx body; one that is not an ``Error`` (a proxy's
    page) is judged by its status alone."""
    try:
        error = Error.decode(body)
    except MalformedMessage:
        error = Error()
    return map_error(status, error, endpoint=endpoint, name=name)


# ---------------------------------------------------------------------------- retries


@dataclass(frozen=True, slots=True)
class RetryRule:
    """Which failures are tried again, how many attempts in all and how far apart."""

    attempts: int
    spacing: float  # seconds between attempts
    codes: frozenset[str]

    def retryable(self, exc: AgentError) -> bool:
        """An error whose code is in ``codes``; or one with no upstream answer behind it
        (connection refused or reset, timeout, an unreadable answer), unless the agent
        itself held the call back (limiter, open breaker)."""
        if exc.upstream_code is not None:
            return exc.upstream_code in self.codes
        if not exc.from_source or isinstance(exc, SourceFailing):
            return False
        return exc.upstream_status is None and exc.transient


#: The SDK's: I/O errors and ``Rejected.Throttling`` only (not 5xx), 4 attempts 1 s apart
#: (its ``max_attempts`` 3 counts retries; backoff policy "yes", period 1).
SDK_RETRY = RetryRule(attempts=4, spacing=1.0, codes=frozenset({"Rejected.Throttling"}))
