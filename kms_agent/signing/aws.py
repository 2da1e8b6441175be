"""AWS Signature Version 4 for JSON 1.1 and query services (Secrets Manager, STS), as
botocore signs it.

canonical request = METHOD \\n path \\n sorted query \\n ``name:value\\n`` per signed header
(lowercase, trimmed, sorted) \\n signed header names \\n hex sha256 of the payload; string
to sign = ``AWS4-HMAC-SHA256 \\n amz-date \\n <date>/<region>/<service>/aws4_request \\n
hex sha256(canonical)``; key = HMAC chain over "AWS4"+secret, date, region, service,
"aws4_request".
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING
from urllib.parse import quote

from kms_agent.signing import HmacSigner, Request, canonical_query

if TYPE_CHECKING:
    from kms_agent.credentials import Credentials

ALGORITHM = "AWS4-HMAC-SHA256"
DATE_HEADER = "X-Amz-Date"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
TOKEN_HEADER = "X-Amz-Security-Token"  # noqa: S105 (a header name)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = _hmac(f"AWS4{secret}".encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def authorization(request: Request, key_id: str, secret: str, *, region: str, service: str) -> str:
    """The Authorization value; every header of ``request`` is signed (include Host and
    X-Amz-Date, whose value is the signing time)."""
    lowered = {k.lower(): " ".join(str(v).split()) for k, v in request.headers.items()}
    names = sorted(lowered)
    canonical = "\n".join(
        [
            request.method,
            quote(request.path, safe="/~"),
            canonical_query(request.query),
            "".join(f"{n}:{lowered[n]}\n" for n in names),
            ";".join(names),
            hashlib.sha256(request.body).hexdigest(),
        ]
    )
    amz_date = lowered[DATE_HEADER.lower()]
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(
        signing_key(secret, date, region, service), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    return (
        f"{ALGORITHM} Credential={key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )


class SigV4(HmacSigner):
    """The :class:`~kms_agent.signing.Signer` of one AWS service in one region."""

    date_header = DATE_HEADER
    date_format = DATE_FORMAT

    def __init__(self, region: str, service: str) -> None:
        self.region = region
        self.service = service

    def _token(self, credentials: Credentials) -> dict[str, str]:
        return {TOKEN_HEADER: str(credentials.security_token)}

    def authorization(self, request: Request, key_id: str, secret: str) -> str:
        return authorization(request, key_id, secret, region=self.region, service=self.service)
