"""Alibaba KMS instance API (dkms-gcs) request signing, as ``alibabacloud-dkms-gcs`` 1.0.2.

The dedicated gateway of a KMS 3.0 instance takes requests signed with a ClientKey (an RSA
key pair whose private half the customer holds as PKCS#12). Every request is a ``POST /``
with a protobuf body; the SDK builds it in ``openapi/client.py`` ``do_request`` and signs it
in ``openapi_util/client.py`` ``get_string_to_sign``::

    POST \\n <content-sha256> \\n <content-type> \\n <date> \\n
    <name>:<trimmed value>\\n   for every ``x-kms-*`` header, names sorted
    /                         the resource: the SDK signs ``/`` whatever the path and query

``content-sha256`` is the **uppercase** hex SHA-256 of the body; ``date`` is RFC 1123 in
GMT; the signature is RSASSA-PKCS1-v1_5 over SHA-256 of that string (UTF-8), base64, sent as
``authorization: Bearer <signature>``. The key id header is spelt ``x-kms-acccesskeyid``,
three c's, as the SDK sends it and the gateway expects it. ``accept``, ``content-length``,
``host`` and ``user-agent`` are sent but not signed.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from kms_agent.signing import Request

if TYPE_CHECKING:
    from kms_agent.credentials import Credentials

API_VERSION = "dkms-gcs-0.2"
SIGNATURE_METHOD = "RSA_PKCS1_SHA_256"
CONTENT_TYPE = "application/x-protobuf"
#: Three c's: the SDK's spelling, which is what the gateway reads.
KEY_ID_HEADER = "x-kms-acccesskeyid"
API_NAME_HEADER = "x-kms-apiname"
SIGNED_PREFIX = "x-kms-"
METHOD = "POST"
PATH = "/"
BEARER = "Bearer "


def content_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest().upper()


def http_date(epoch: float) -> str:
    """RFC 1123 in GMT (``Thu, 06 Feb 2020 07:32:54 GMT``), English whatever the locale."""
    return email.utils.formatdate(epoch, usegmt=True)


def string_to_sign(method: str, headers: Mapping[str, str]) -> str:
    """What is signed, from the headers that will be sent (names in any case). The
    emulator rebuilds it from the headers it received."""
    lowered = {k.lower(): v for k, v in headers.items()}
    signed = "".join(
        f"{name}:{lowered[name].strip()}\n"
        for name in sorted(lowered)
        if name.startswith(SIGNED_PREFIX)
    )
    return (
        f"{method}\n{lowered.get('content-sha256', '')}\n{lowered.get('content-type', '')}\n"
        f"{lowered.get('date', '')}\n{signed}{PATH}"
    )


def sign(text: str, private_key: RSAPrivateKey) -> str:
    """Base64 RSASSA-PKCS1-v1_5 SHA-256 signature of ``text`` (deterministic)."""
    signature = private_key.sign(text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def request_headers(
    *,
    body: bytes,
    date: str,
    key_id: str,
    api_name: str,
    private_key: RSAPrivateKey,
    api_version: str = API_VERSION,
    method: str = METHOD,
) -> dict[str, str]:
    """Every header the SDK sends for ``body``, in its order, ``authorization`` last;
    ``host`` and ``user-agent`` are left to the HTTP client (neither is signed)."""
    headers = {
        "accept": CONTENT_TYPE,
        "date": date,
        "x-kms-apiversion": api_version,
        API_NAME_HEADER: api_name,
        "x-kms-signaturemethod": SIGNATURE_METHOD,
        KEY_ID_HEADER: key_id,
        "content-type": CONTENT_TYPE,
        "content-length": str(len(body)),
        "content-sha256": content_sha256(body),
    }
    headers["authorization"] = BEARER + sign(string_to_sign(method, headers), private_key)
    return headers


def request(api_name: str, body: bytes) -> Request:
    """A call of the instance API: ``api_name`` with its protobuf ``body``."""
    return Request(METHOD, PATH, headers={API_NAME_HEADER: api_name}, body=body)


@dataclass(frozen=True, slots=True)
class ClientKeySigner:
    """The :class:`~kms_agent.signing.Signer` of a KMS instance's API: the ClientKey's
    private key signs; the credentials carry its key id (the ClientKey is not a secret
    pair, so the key stays here, out of every Credentials)."""

    private_key: RSAPrivateKey = field(repr=False)

    def sign(self, request: Request, credentials: Credentials, now: float) -> dict[str, str]:
        given = {k.lower(): v for k, v in request.headers.items()}
        headers = request_headers(
            body=request.body,
            date=http_date(now),
            key_id=credentials.access_key_id,
            api_name=given[API_NAME_HEADER],
            private_key=self.private_key,
            method=request.method,
        )
        return {"host": given["host"], **headers} if "host" in given else headers


def verify(method: str, headers: Mapping[str, str], body: bytes, public_key: RSAPublicKey) -> bool:
    """Whether ``headers`` carry a valid signature for ``body`` by ``public_key``: the body
    hashes to ``content-sha256`` and the ``Bearer`` signature verifies over the string to
    sign. For the emulator's gateway; the agent itself only signs."""
    lowered = {k.lower(): v for k, v in headers.items()}
    claimed = lowered.get("content-sha256", "")
    if not hmac.compare_digest(claimed.encode(), content_sha256(body).encode()):
        return False
    auth = lowered.get("authorization", "")
    if not auth.startswith(BEARER):
        return False
    try:
        signature = base64.b64decode(auth[len(BEARER) :], validate=True)
        public_key.verify(
            signature,
            string_to_sign(method, lowered).encode("utf-8"),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except (binascii.Error, InvalidSignature, ValueError):
        return False
    return True
