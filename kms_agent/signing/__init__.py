"""Request signers: pure functions of the request's parts, tested with vendor vectors.

Every upstream call the agent makes is a :class:`Request`; a :class:`Signer` turns it and
the source's current credentials into the headers to send. The four signers (ACS3 for
Alibaba's OpenAPI, SigV4 for AWS, SDK-HMAC for Huawei, the ClientKey RSA signature of a
KMS instance) and Vault's token share this one shape, so the send path
(:func:`kms_agent.upstream.send`) is one copy for every cloud.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Protocol
from urllib.parse import quote

if TYPE_CHECKING:
    from kms_agent.credentials import Credentials


def encode(value: str) -> str:
    """RFC 3986 percent-encoding as all three clouds sign it: only ``A-Za-z0-9-_.~`` kept
    (``!`` → ``%21``, space → ``%20``, ``/`` → ``%2F``)."""
    return quote(value, safe="~")


def canonical_query(query: Mapping[str, str]) -> str:
    """The query string exactly as signed (sorted, RFC 3986); send this same string."""
    return "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(query.items()))


@dataclass(frozen=True, slots=True)
class Request:
    """One upstream call, before signing. ``path`` is already percent-encoded as it goes
    on the wire; ``query`` is raw (encoded by :func:`canonical_query`)."""

    method: str
    path: str = "/"
    #: Out of the repr, like headers and body: a query may carry a token (RRSA's
    #: OIDCToken), an ExternalId or a session policy.
    query: Mapping[str, str] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)

    @property
    def target(self) -> str:
        """Path and query as sent (and signed)."""
        qs = canonical_query(self.query)
        return f"{self.path}?{qs}" if qs else self.path

    def to(self, host: str) -> Request:
        """The request addressed to ``host`` (every signer signs the Host header)."""
        return replace(self, headers={"Host": host, **self.headers})


class Signer(Protocol):
    """Makes the headers of one request: its own, the signer's date, nonce and token
    headers, and the authorization. Pure but for the clock (``now``) and, where the
    protocol wants one, a fresh nonce (a header already in the request is kept: tests
    and vectors pin both)."""

    def sign(self, request: Request, credentials: Credentials, now: float) -> dict[str, str]: ...


class HmacSigner:
    """What the three HMAC signers (ACS3, SigV4, SDK-HMAC) do alike: add the date header
    (unless the request has one), a nonce where the protocol wants one, the temporary
    credentials' token headers, then the authorization over all of them. Each says only
    its header names, date format and :meth:`authorization`."""

    date_header: ClassVar[str]
    date_format: ClassVar[str]
    #: The nonce header and its length in random bytes; "" for protocols without one.
    nonce_header: ClassVar[str] = ""
    nonce_bytes: ClassVar[int] = 16
    auth_header: ClassVar[str] = "Authorization"

    def sign(self, request: Request, credentials: Credentials, now: float) -> dict[str, str]:
        headers = {**request.headers, **self._fixed(request)}
        headers.setdefault(self.date_header, time.strftime(self.date_format, time.gmtime(now)))
        if self.nonce_header:
            headers.setdefault(self.nonce_header, secrets.token_hex(self.nonce_bytes))
        if credentials.security_token:
            headers.update(self._token(credentials))
        headers[self.auth_header] = self.authorization(
            replace(request, headers=headers),
            credentials.access_key_id,
            credentials.access_key_secret,
        )
        return headers

    def _fixed(self, request: Request) -> dict[str, str]:
        """Headers the protocol always adds (none unless it says)."""
        return {}

    def _token(self, credentials: Credentials) -> dict[str, str]:
        """The headers that carry a temporary credential's token."""
        raise NotImplementedError

    def authorization(self, request: Request, key_id: str, secret: str) -> str:
        """The authorization value over every header of ``request``."""
        raise NotImplementedError
