"""AWS Signature Version 4 for JSON 1.1 services (Secrets Manager), as botocore signs it.

canonical request = METHOD \\n path \\n sorted query \\n ``name:value\\n`` per signed header
(lowercase, trimmed, sorted) \\n signed header names \\n hex sha256 of the payload; string
to sign = ``AWS4-HMAC-SHA256 \\n amz-date \\n <date>/<region>/<service>/aws4_request \\n
hex sha256(canonical)``; key = HMAC chain over "AWS4"+secret, date, region, service,
"aws4_request".
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = _hmac(f"AWS4{secret}".encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def authorization(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    service: str,
    amz_date: str,
) -> str:
    """The Authorization value; ``headers`` are all signed (include host and x-amz-date)."""
    lowered = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    names = sorted(lowered)
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )
    canonical = "\n".join(
        [
            method,
            quote(path, safe="/-_.~"),
            canonical_query,
            "".join(f"{n}:{lowered[n]}\n" for n in names),
            ";".join(names),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(
        signing_key(secret_access_key, date, region, service), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    return (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )


def post_headers(
    headers: Mapping[str, str],
    body: bytes,
    *,
    access_key_id: str,
    secret_access_key: str,
    security_token: str | None,
    region: str,
    service: str,
    amz_date: str,
) -> dict[str, str]:
    """``headers`` (Host and Content-Type at least) with X-Amz-Date, the session token if
    any, and the Authorization of a ``POST /`` of ``body``: every signed call the agent
    makes (Secrets Manager, STS) has this shape."""
    out = {**headers, "X-Amz-Date": amz_date}
    if security_token:
        out["X-Amz-Security-Token"] = security_token
    out["Authorization"] = authorization(
        method="POST", path="/", query={}, headers=out, body=body,
        access_key_id=access_key_id, secret_access_key=secret_access_key,
        region=region, service=service, amz_date=amz_date,
    )  # fmt: skip
    return out
