"""Alibaba Cloud OpenAPI ACS3-HMAC-SHA256 request signing (the Tea SDK's default).

canonical request = METHOD \\n PATH \\n sorted query (values RFC 3986-encoded, ``~`` kept)
\\n ``name:value\\n`` for each signed header (lowercase, trimmed, sorted) \\n signed header
names joined by ``;`` \\n hex sha256 of the body; the string to sign is the algorithm name
and the hex sha256 of that; the signature is hex HMAC-SHA256 with the AccessKey secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from urllib.parse import quote

ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def encode(value: str) -> str:
    """RFC 3986 percent-encoding as Alibaba signs it: ``!`` → ``%21``, space → ``%20``."""
    return quote(value, safe="~")


def canonical_query(query: Mapping[str, str]) -> str:
    """The query string exactly as signed; send this same string on the wire."""
    return "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(query.items()))


def canonical_request(
    method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body_sha256: str
) -> tuple[str, str]:
    """(canonical request, signed header list)."""
    canon = {k.lower(): v.strip() for k, v in headers.items()}
    names = sorted(canon)
    lines = "".join(f"{n}:{canon[n]}\n" for n in names)
    signed = ";".join(names)
    return f"{method}\n{path}\n{canonical_query(query)}\n{lines}\n{signed}\n{body_sha256}", signed


def string_to_sign(canonical: str) -> str:
    return f"{ALGORITHM}\n{hashlib.sha256(canonical.encode()).hexdigest()}"


def authorization(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    access_key_id: str,
    access_key_secret: str,
) -> str:
    """The ``Authorization`` header value. ``headers`` are all signed: pass every header
    that will be sent except Authorization (host, x-acs-*, accept, ...)."""
    canonical, signed = canonical_request(
        method, path, query, headers, hashlib.sha256(body).hexdigest()
    )
    signature = hmac.new(
        access_key_secret.encode(), string_to_sign(canonical).encode(), hashlib.sha256
    ).hexdigest()
    return f"{ALGORITHM} Credential={access_key_id},SignedHeaders={signed},Signature={signature}"


def rpc_headers(
    *,
    host: str,
    action: str,
    version: str,
    query: Mapping[str, str],
    access_key_id: str,
    access_key_secret: str,
    security_token: str | None,
    date: str | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Every header of an RPC-style call (parameters in ``query``, empty POST body) to any
    Alibaba OpenAPI product — KMS 2016-01-20, STS 2015-04-01 — Authorization included.
    ``date`` is ``%Y-%m-%dT%H:%M:%SZ`` UTC (now, unless given); ``nonce`` is fresh per
    request (made here unless given: tests pin both)."""
    date = date or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    nonce = nonce or secrets.token_hex(16)
    headers = {
        "host": host,
        "x-acs-action": action,
        "x-acs-version": version,
        "x-acs-date": date,
        "x-acs-signature-nonce": nonce,
        "x-acs-content-sha256": EMPTY_SHA256,
        "accept": "application/json",
    }
    if security_token:
        headers["x-acs-accesskey-id"] = access_key_id
        headers["x-acs-security-token"] = security_token
    headers["authorization"] = authorization(
        method="POST",
        path="/",
        query=query,
        headers=headers,
        body=b"",
        access_key_id=access_key_id,
        access_key_secret=access_key_secret,
    )
    return headers
