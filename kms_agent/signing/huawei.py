"""Huawei Cloud SDK-HMAC-SHA256 (AK/SK) request signing, as huaweicloudsdkcore does it.

canonical request = METHOD \\n URI (each segment RFC 3986-encoded, always ending in ``/``)
\\n sorted query \\n ``name:value\\n`` for every header whose name has no ``_`` (lowercase,
trimmed, sorted) \\n signed header names joined by ``;`` \\n hex sha256 of the body; the
string to sign is ``SDK-HMAC-SHA256 \\n X-Sdk-Date \\n hex sha256(canonical)``; the
signature is hex HMAC-SHA256 with the SK.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote

from kms_agent.signing import HmacSigner, Request, canonical_query, encode

if TYPE_CHECKING:
    from kms_agent.credentials import Credentials

ALGORITHM = "SDK-HMAC-SHA256"
DATE_HEADER = "X-Sdk-Date"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
NONCE_HEADER = "X-Request-Nonce"
TOKEN_HEADER = "X-Security-Token"  # noqa: S105 (a header name)


def canonical_uri(path: str) -> str:
    uri = "/".join(encode(segment) for segment in unquote(path).split("/"))
    return uri if uri.endswith("/") else uri + "/"


def signed_header_names(headers: Mapping[str, str]) -> list[str]:
    return sorted(k.lower() for k in headers if "_" not in k)


def authorization(request: Request, key_id: str, secret: str) -> str:
    """The ``Authorization`` value. ``request.headers`` must hold every header that will
    be sent (Host and X-Sdk-Date included)."""
    lowered = {k.lower(): str(v).strip() for k, v in request.headers.items()}
    names = signed_header_names(request.headers)
    canonical = "\n".join(
        [
            request.method.upper(),
            canonical_uri(request.path),
            canonical_query(request.query),
            "".join(f"{n}:{lowered[n]}\n" for n in names),
            ";".join(names),
            hashlib.sha256(request.body).hexdigest(),
        ]
    )
    date = lowered[DATE_HEADER.lower()]
    to_sign = f"{ALGORITHM}\n{date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{ALGORITHM} Access={key_id}, SignedHeaders={';'.join(names)}, Signature={signature}"


class SdkHmac(HmacSigner):
    """The :class:`~kms_agent.signing.Signer` of Huawei Cloud's APIs."""

    date_header = DATE_HEADER
    date_format = DATE_FORMAT
    nonce_header = NONCE_HEADER
    nonce_bytes = 8

    def _token(self, credentials: Credentials) -> dict[str, str]:
        return {TOKEN_HEADER: str(credentials.security_token)}

    def authorization(self, request: Request, key_id: str, secret: str) -> str:
        return authorization(request, key_id, secret)
