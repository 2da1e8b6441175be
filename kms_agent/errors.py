"""The one error vocabulary of kms-agent.

Every error a caller can see is an :class:`AgentError`. Each carries the HTTP status it
renders as, a stable ``code`` and a message that is safe to show: it never contains a
secret value or a token. The server renders them in exactly one place.

Tree::

    AgentError
    ├── RequestError               the caller's mistake (4xx)
    │   ├── BadRequest             400
    │   ├── ProxiedRequest         400 X-Forwarded-For / Forwarded present
    │   ├── Unauthorized           401 no token
    │   ├── Forbidden              403 wrong token, or denied by policy
    │   │   ├── RoleNotAllowed     403 a roleArn outside the source's allow-list
    │   │   └── AccessDeniedByPolicy 403 no policy lets this caller do this to this secret
    │   ├── RouteNotFound          404
    │   ├── MethodNotAllowed       405
    │   ├── TooManyConnections     503 the listener is at server.max_connections
    │   ├── FieldNotFound          404 ?field= names no key of the JSON secret
    │   └── SecretNotJson          400 ?field= on a secret that is not a JSON object
    ├── UpstreamError              what a source answered, mapped by its provider
    │   ├── SecretNotFound         404   drops the cache entry, cached briefly
    │   ├── PendingDeletion        404   drops the cache entry
    │   ├── AccessDenied           502   drops the cache entry
    │   ├── DecryptDenied          502   drops the cache entry
    │   ├── BadCredentials         502
    │   ├── InvalidUpstreamRequest 400
    │   ├── Throttled              503   transient: stale value served if we have one
    │   ├── Unavailable            503   transient
    │   │   ├── SourceFailing      503   the source's breaker is open: not sent (Retry-After)
    │   │   └── ConnectionDropped  503   the connection closed before any answer
    │   └── UpstreamTimeout        504   transient
    │       └── HeldByLimiter      504   our quota limiter would hold it past the deadline
    ├── StoreCorrupt               500   a local store file failed to read or decrypt
    └── ConfigError                      invalid configuration (never reaches HTTP)
"""

from __future__ import annotations

from typing import ClassVar


class AgentError(Exception):
    """Base of every error kms-agent raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "InternalError"
    #: A transient failure: a cached value may be served stale instead.
    transient: ClassVar[bool] = False
    #: The secret is gone or forbidden: drop any cached value at once.
    drops_cache: ClassVar[bool] = False
    #: Whether this says something about the source's health (the breaker counts it).
    from_source: ClassVar[bool] = True
    #: Seconds a caller should wait before asking again (a ``Retry-After``), if any.
    retry_after: int | None = None

    #: What the upstream itself answered (status, error code), where a dialect passes it
    #: through (the AWS agent's ``{"__type", "message"}``); set by providers.
    upstream_status: int | None = None
    upstream_code: str | None = None
    upstream_message: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def upstream(self, status: int, code: str, message: str | None = None) -> AgentError:
        """This error, remembering what the upstream answered (returns ``self``)."""
        self.upstream_status = status
        self.upstream_code = code
        self.upstream_message = message
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class RequestError(AgentError):
    status = 400
    code = "BadRequest"


class BadRequest(RequestError):
    status = 400
    code = "BadRequest"


class ProxiedRequest(RequestError):
    status = 400
    code = "ProxiedRequestRefused"


class Unauthorized(RequestError):
    status = 401
    code = "MissingToken"


class Forbidden(RequestError):
    status = 403
    code = "Forbidden"


class RouteNotFound(RequestError):
    status = 404
    code = "RouteNotFound"


class MethodNotAllowed(RequestError):
    status = 405
    code = "MethodNotAllowed"


class RoleNotAllowed(Forbidden):
    """A ``roleArn`` the source may not assume for callers."""

    code = "RoleNotAllowed"


class AccessDeniedByPolicy(Forbidden):
    """The caller is known, and no policy statement allows it this action on this secret
    (or one denies it). The message names the principal and the action, never a value."""

    code = "AccessDeniedByPolicy"


class TooManyConnections(RequestError):
    """Over ``server.max_connections``: answered at once and the connection closed."""

    status = 503
    code = "TooManyConnections"


class FieldNotFound(RequestError):
    status = 404
    code = "FieldNotFound"


class SecretNotJson(RequestError):
    status = 400
    code = "SecretNotJson"


class UpstreamError(AgentError):
    status = 502
    code = "UpstreamError"


class SecretNotFound(UpstreamError):
    status = 404
    code = "SecretNotFound"
    drops_cache = True


class PendingDeletion(UpstreamError):
    status = 404
    code = "SecretPendingDeletion"
    drops_cache = True


class AccessDenied(UpstreamError):
    status = 502
    code = "UpstreamAccessDenied"
    drops_cache = True


class DecryptDenied(UpstreamError):
    status = 502
    code = "UpstreamDecryptDenied"
    drops_cache = True


class BadCredentials(UpstreamError):
    status = 502
    code = "UpstreamBadCredentials"


class InvalidUpstreamRequest(UpstreamError):
    status = 400
    code = "InvalidRequest"


class Throttled(UpstreamError):
    status = 503
    code = "UpstreamThrottled"
    transient = True


class Unavailable(UpstreamError):
    status = 503
    code = "UpstreamUnavailable"
    transient = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "UpstreamTimeout"
    transient = True


class HeldByLimiter(UpstreamTimeout):
    """Not sent: the source's quota limiter would have held the call past its deadline.
    Says nothing about the source's health (the breaker does not count it)."""

    from_source = False


class ConnectionDropped(Unavailable):
    """The connection closed before any of the answer came: a server's idle keep-alive
    close is indistinguishable, so even a probe may try once more (RFC 9112 9.3.1)."""


class SourceFailing(Unavailable):
    """Not sent: the source failed repeatedly and its breaker is open; one probe at a time
    checks for recovery. Carries the last error the source gave and when to try again."""

    code = "SourceFailing"

    def __init__(self, message: str, *, hint: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class StoreCorrupt(AgentError):
    """A file of the embedded store could not be read, parsed or authenticated."""

    status = 500
    code = "StoreCorrupt"


class ConfigError(AgentError):
    """Invalid configuration: names the key, the bad value and what is allowed."""

    code = "ConfigError"


class StoreIOError(AgentError):
    """A file or directory of the embedded store could not be read or written (disk full,
    read-only filesystem, not permitted, not a regular file). The message names it and the
    cause; the hint says what to do. What was stored before is unchanged."""

    status = 500
    code = "StoreIOError"
