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
from urllib.parse import quote, unquote

ALGORITHM = "SDK-HMAC-SHA256"
DATE_HEADER = "X-Sdk-Date"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"


def encode(value: str) -> str:
    return quote(value, safe="~")


def canonical_uri(path: str) -> str:
    uri = "/".join(encode(segment) for segment in unquote(path).split("/"))
    return uri if uri.endswith("/") else uri + "/"


def canonical_query(query: Mapping[str, str]) -> str:
    return "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(query.items()))


def signed_header_names(headers: Mapping[str, str]) -> list[str]:
    return sorted(k.lower() for k in headers if "_" not in k)


def authorization(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
) -> str:
    """The ``Authorization`` value. ``headers`` must hold every header that will be sent
    (Host and X-Sdk-Date included)."""
    lowered = {k.lower(): str(v).strip() for k, v in headers.items()}
    names = signed_header_names(headers)
    canonical = "\n".join(
        [
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            "".join(f"{n}:{lowered[n]}\n" for n in names),
            ";".join(names),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    date = lowered[DATE_HEADER.lower()]
    to_sign = f"{ALGORITHM}\n{date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(secret_key.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"{ALGORITHM} Access={access_key}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
