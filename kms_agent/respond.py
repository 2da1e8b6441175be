"""The responder: every status line, header and body a secrets listener writes.

One module frames all of them — secrets in each shape, errors in each dialect's own form,
health answers, the over-the-limit refusal — so a response is never written by hand
anywhere else. A secret's bodies are rendered once per cache entry and shape and kept on
the entry (its opaque ``memo``); a hit joins a head shared per content type and length
with the request id, the date and that body.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, TypeVar

from kms_agent import render
from kms_agent.cache import Entry
from kms_agent.errors import (
    AccessDenied,
    AccessDeniedByPolicy,
    AgentError,
    BadCredentials,
    DecryptDenied,
    Forbidden,
    InvalidUpstreamRequest,
    MethodNotAllowed,
    PendingDeletion,
    ProxiedRequest,
    RoleNotAllowed,
    RouteNotFound,
    SecretNotFound,
    Throttled,
    TooManyConnections,
    Unauthorized,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from kms_agent.grammar import Dialect

_V = TypeVar("_V")

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
BINARY = b"application/octet-stream"
#: No Content-Type line at all: the AWS agent sends none, on any response.
NONE = b""
#: Distinct body lengths whose head is kept, per content type.
_HEADS_MAX = 1024
_STATUS: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}


class _Heads(dict[int, bytes]):
    """A 200's status line and fixed headers up to ``X-Request-Id:``, by body length, for
    one content type: built at a length's first use and shared by every entry of that
    length. The request id, the date and the body follow."""

    __slots__ = ("prefix",)

    def __init__(self, content_type: bytes) -> None:
        super().__init__()
        self.prefix = b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n" + _type_line(content_type)

    def __missing__(self, size: int) -> bytes:
        if len(self) >= _HEADS_MAX:
            self.clear()
        head = self[size] = b"%sContent-Length: %d\r\nX-Request-Id: " % (self.prefix, size)
        return head


def _type_line(content_type: bytes) -> bytes:
    return b"Content-Type: %s\r\n" % content_type if content_type else b""


HEADS = {t: _Heads(t) for t in (JSON, TEXT, BINARY, NONE)}
_date_at = 0
_tail = b""
_tail_close = b""


def tail(close: bool = False) -> bytes:
    """``Date`` (rebuilt once a second), ``Connection: close`` if asked, the blank line."""
    global _date_at, _tail, _tail_close  # noqa: PLW0603 (one clock for every connection)
    now = int(time.time())
    if now != _date_at:
        _date_at = now
        date = formatdate(now, usegmt=True).encode()
        _tail = b"\r\nDate: %s\r\n\r\n" % date
        _tail_close = b"\r\nDate: %s\r\nConnection: close\r\n\r\n" % date
    return _tail_close if close else _tail


def response(
    status: int,
    content_type: bytes,
    body: bytes,
    request_id: str,
    *,
    extra: bytes = b"",
    close: bool = False,
) -> bytes:
    """A whole response. ``extra`` is preformatted header lines (``Name: value\\r\\n``)."""
    return b"".join(
        (
            _STATUS.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status,
            b"Cache-Control: no-store\r\n",  # nothing here may be kept by a cache between
            _type_line(content_type),
            b"Content-Length: %d\r\n" % len(body),
            extra,
            b"X-Request-Id: ",
            request_id.encode(),
            tail(close),
            body,
        )
    )


def json_response(
    status: int, obj: Any, request_id: str, *, extra: bytes = b"", close: bool = False
) -> bytes:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return response(status, JSON, body, request_id, extra=extra, close=close)


# --------------------------------------------------------------------------- secrets


def rendered(entry: Entry, shape: str) -> render.Rendered:
    """``entry``'s body in ``shape``, built once and kept on the entry's memo."""
    memo = entry.memo
    if isinstance(memo, render.Rendered):
        if memo.shape == shape:
            return memo
        bodies: tuple[render.Rendered, ...] = (memo,)
    elif isinstance(memo, tuple):
        for found in memo:
            if found.shape == shape:
                return found  # type: ignore[no-any-return]
        bodies = memo
    else:
        bodies = ()
    made = render.rendered(entry.record, shape)
    entry.memo = (*bodies, made) if bodies else made
    return made


def content_type(entry: Entry, shape: str) -> bytes:
    if shape == "aws":
        return NONE
    if shape != "raw":
        return JSON
    return TEXT if entry.record.data_type == "text" else BINARY


def secret(
    entry: Entry, shape: str, request_id: str, *, stale_age: float | None = None, close: bool
) -> bytes:
    """A secret's 200 in ``shape``. Fresh ones come from the shared heads; stale ones carry
    ``Age`` and a ``Warning`` (and ``"stale": true`` in the native shape)."""
    record = entry.record
    value = record.value.reveal()
    if stale_age is not None:
        extra = b'Age: %d\r\nWarning: 110 kms-agent "Response is Stale"\r\n' % (int(stale_age))
        if shape == "native":
            body = render.native_stale(record, stale_age)
        else:
            body = rendered(entry, shape).body(value)
        body = render.with_request_id(shape, body, request_id)
        return response(200, content_type(entry, shape), body, request_id, extra=extra, close=close)
    made = rendered(entry, shape)
    before, after = made.before, made.after
    rid = request_id.encode()
    if shape == "vault":  # the envelope's own request_id leads the body
        before = render.with_request_id(shape, before, request_id)
    length = len(before) + (0 if after is None else len(value) + len(after))
    head = HEADS[content_type(entry, shape)][length]
    if after is None:
        return b"".join((head, rid, tail(close), before))
    return b"".join((head, rid, tail(close), before, value, after))


# --------------------------------------------------------------------------- errors

#: The AWS agent's own refusals: plain-text bodies, and the statuses it gives them.
_AWS_PLAIN: dict[type[AgentError], tuple[int, str]] = {
    Unauthorized: (403, "Bad Token"),
    Forbidden: (403, "Bad Token"),
    ProxiedRequest: (400, "Forwarded"),
    MethodNotAllowed: (405, "Not allowed"),
    RouteNotFound: (404, "Not found"),
    TooManyConnections: (429, "Connection limit exceeded"),
}
#: Its messages for failures of the connection to the store.
_AWS_MESSAGES: dict[type[AgentError], str] = {Unavailable: "Read Error", UpstreamTimeout: "Timeout"}
#: Secrets Manager's error types for errors of other stores, and their statuses.
_AWS_TYPES: dict[type[AgentError], tuple[int, str]] = {
    SecretNotFound: (400, "ResourceNotFoundException"),
    PendingDeletion: (400, "InvalidRequestException"),
    AccessDenied: (400, "AccessDeniedException"),
    DecryptDenied: (400, "DecryptionFailure"),
    BadCredentials: (400, "UnrecognizedClientException"),
    InvalidUpstreamRequest: (400, "InvalidRequestException"),
    Throttled: (400, "ThrottlingException"),
    Unavailable: (502, "ConnectionError"),
    UpstreamTimeout: (504, "TimeoutError"),
}


def _aws_error(err: AgentError) -> tuple[int, bytes, bytes]:
    """The AWS agent's answers: its own refusals in plain text, the store's errors as
    ``{"__type", "message"}`` with the store's status, never a Content-Type."""
    if isinstance(err, RoleNotAllowed | AccessDeniedByPolicy):
        return 403, NONE, _aws_type("AccessDeniedException", err.message)
    plain = _by_type(_AWS_PLAIN, err)
    if plain is not None:
        return plain[0], NONE, plain[1].encode()
    if isinstance(err, UpstreamError):
        if err.upstream_code is not None:  # Secrets Manager's own answer, passed through
            message = err.upstream_message or err.message
            return err.upstream_status or 400, NONE, _aws_type(err.upstream_code, message)
        status, code = _by_type(_AWS_TYPES, err) or (500, "InternalFailure")
        return status, NONE, _aws_type(code, _by_type(_AWS_MESSAGES, err) or err.message)
    if err.status >= 500:
        return 500, NONE, _aws_type("InternalFailure", "")
    return err.status, NONE, err.message.encode()


def _by_type(table: Mapping[type[AgentError], _V], err: AgentError) -> _V | None:
    """``err``'s entry in ``table``, or its nearest base class's (SourceFailing answers as
    Unavailable does)."""
    for cls in type(err).__mro__:
        found = table.get(cls)
        if found is not None:
            return found
    return None


def _aws_type(code: str, message: str) -> bytes:
    if not message or code == "InternalFailure":
        return b'{"__type":"InternalFailure"}'
    obj = {"__type": code, "message": message}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _kms_error(err: AgentError, request_id: str) -> tuple[int, bytes, bytes]:
    """The Alibaba agent's answers: the AWS agent's refusals (it is built on them), the
    store's errors in KMS's own shape ``{"Code", "Message", "RequestId", "HttpStatus"}``."""
    if isinstance(err, UpstreamError):
        status = err.upstream_status or err.status
        code = err.upstream_code or _by_type(_KMS_CODES, err) or err.code
        obj = {"Code": code, "Message": err.message, "RequestId": request_id, "HttpStatus": status}
        return status, JSON, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    status, _, body = _aws_error(err)
    return status, TEXT, body


#: KMS's codes for the errors of other stores.
_KMS_CODES: dict[type[AgentError], str] = {
    SecretNotFound: "Forbidden.ResourceNotFound",
    PendingDeletion: "Rejected.ResourceInDeleteWindow",
    AccessDenied: "Forbidden.NoPermission",
    DecryptDenied: "Forbidden.KeyNotFound",
    BadCredentials: "InvalidAccessKeyId.NotFound",
    InvalidUpstreamRequest: "InvalidParameter",
    Throttled: "Rejected.Throttling",
    Unavailable: "ServiceUnavailableTemporary",
    UpstreamTimeout: "ServiceUnavailableTemporary",
}


def _vault_error(err: AgentError) -> tuple[int, bytes, bytes]:
    if isinstance(err, Unauthorized | Forbidden):
        return 403, JSON, b'{"errors":["permission denied"]}'
    if isinstance(err, SecretNotFound | PendingDeletion):
        return 404, JSON, b'{"errors":[]}'
    if isinstance(err, MethodNotAllowed):
        return 405, JSON, b'{"errors":["unsupported operation"]}'
    body = json.dumps({"errors": [err.message]}, ensure_ascii=False).encode()
    return err.status, JSON, body


def _native_error(err: AgentError, request_id: str) -> tuple[int, bytes, bytes]:
    obj: dict[str, Any] = {"code": err.code, "message": err.message, "request_id": request_id}
    if err.hint:
        obj["hint"] = err.hint
    body = json.dumps({"error": obj}, ensure_ascii=False).encode()
    return err.status, JSON, body


def error(
    err: AgentError, dialect: Dialect, request_id: str, *, close: bool = False
) -> tuple[bytes, int]:
    """``err`` as ``dialect`` answers it, and the status written."""
    if dialect is Dialect.AWS:
        status, ctype, body = _aws_error(err)
    elif dialect is Dialect.KMS:
        status, ctype, body = _kms_error(err, request_id)
    elif dialect is Dialect.VAULT:
        status, ctype, body = _vault_error(err)
    else:
        status, ctype, body = _native_error(err, request_id)
    retry = 1 if isinstance(err, TooManyConnections) else err.retry_after
    extra = b"Retry-After: %d\r\n" % retry if retry is not None else b""
    return response(status, ctype, body, request_id, extra=extra, close=close), status
