"""Alibaba Cloud OpenAPI ACS3-HMAC-SHA256 request signing (the Tea SDK's default).

canonical request = METHOD \\n PATH \\n sorted query (values RFC 3986-encoded, ``~`` kept)
\\n ``name:value\\n`` for each signed header (lowercase, trimmed, sorted) \\n signed header
names joined by ``;`` \\n hex sha256 of the body; the string to sign is the algorithm name
and the hex sha256 of that; the signature is hex HMAC-SHA256 with the AccessKey secret.

RPC-style products (KMS 2016-01-20, STS 2015-04-01) take their parameters in the query
string of a ``POST /`` with an empty body: :func:`rpc` makes such a request.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING

from kms_agent.signing import HmacSigner, Request, canonical_query

if TYPE_CHECKING:
    from kms_agent.credentials import Credentials

ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def rpc(action: str, version: str, params: Mapping[str, str]) -> Request:
    """An RPC-style call: ``action`` of API ``version`` with ``params`` in the query."""
    headers = {"x-acs-action": action, "x-acs-version": version, "accept": "application/json"}
    return Request("POST", "/", query=params, headers=headers)


def canonical_request(request: Request) -> tuple[str, str]:
    """(canonical request, signed header list); every header of ``request`` is signed."""
    canon = {k.lower(): v.strip() for k, v in request.headers.items()}
    names = sorted(canon)
    lines = "".join(f"{n}:{canon[n]}\n" for n in names)
    signed = ";".join(names)
    body_sha256 = hashlib.sha256(request.body).hexdigest()
    query = canonical_query(request.query)
    return f"{request.method}\n{request.path}\n{query}\n{lines}\n{signed}\n{body_sha256}", signed


def string_to_sign(canonical: str) -> str:
    return f"{ALGORITHM}\n{hashlib.sha256(canonical.encode()).hexdigest()}"


def authorization(request: Request, key_id: str, secret: str) -> str:
    """The ``Authorization`` value. Every header of ``request`` is signed: give every
    header that will be sent except Authorization (host, x-acs-*, accept, ...)."""
    canonical, signed = canonical_request(request)
    signature = hmac.new(
        secret.encode(), string_to_sign(canonical).encode(), hashlib.sha256
    ).hexdigest()
    return f"{ALGORITHM} Credential={key_id},SignedHeaders={signed},Signature={signature}"


class Acs3(HmacSigner):
    """The :class:`~kms_agent.signing.Signer` of Alibaba's OpenAPI (header names are sent
    lowercase, as the Tea SDK sends them)."""

    date_header = "x-acs-date"
    date_format = DATE_FORMAT
    nonce_header = "x-acs-signature-nonce"
    auth_header = "authorization"

    def _fixed(self, request: Request) -> dict[str, str]:
        return {"x-acs-content-sha256": hashlib.sha256(request.body).hexdigest()}

    def _token(self, credentials: Credentials) -> dict[str, str]:
        return {
            "x-acs-accesskey-id": credentials.access_key_id,
            "x-acs-security-token": str(credentials.security_token),
        }

    def authorization(self, request: Request, key_id: str, secret: str) -> str:
        return authorization(request, key_id, secret)
