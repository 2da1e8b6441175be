"""The dkms-gcs protocol of a KMS instance's dedicated gateway: signer, messages, errors, retry
rule and ClientKey loading, judged by the recorded vector and by the vendor SDK itself.

The vector (``tests/fixtures/alibaba-dkms-gcs.json``, a copy of ``shared/vectors``) was
recorded from ``alibabacloud-dkms-gcs`` 1.0.2 with a throwaway ClientKey. Tests that run the
SDK skip when it is not installed (``pip install alibabacloud-dkms-gcs``). Two things of the
SDK do not work beside ``cryptography`` 50 (checked with 50.0.2), so those tests go round
them: its pin ``pyopenssl<23.3`` resolves to 22.0, which fails at ``from OpenSSL import
crypto``, and its signer wraps the PKCS#8 key it extracts in ``RSA PRIVATE KEY`` armour,
which cryptography refuses. The SDK is therefore imported with a stand-in for
pyOpenSSL and given the key as trimmed PKCS#1, its ``access_key_id`` + ``private_key`` way.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms_agent.credentials import Credentials
from kms_agent.credentials.client_key import load_client_key
from kms_agent.dkms_gcs import (
    SDK_RETRY,
    Error,
    GetSecretValueRequest,
    GetSecretValueResponse,
    MalformedMessage,
    classify,
    error_kind,
    map_error,
)
from kms_agent.errors import (
    AccessDenied,
    AgentError,
    BadCredentials,
    ConfigError,
    DecryptDenied,
    HeldByLimiter,
    InvalidUpstreamRequest,
    PendingDeletion,
    SecretNotFound,
    SourceFailing,
    Throttled,
    Unavailable,
)
from kms_agent.signing import dkms
from kms_agent.upstream import mapped_errors

VECTOR = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "alibaba-dkms-gcs.json").read_text()
)
KEY_ID = VECTOR["test_key"]["KeyId"]
PASSWORD = VECTOR["test_key"]["password"]
PRIVATE_KEY_DATA = json.loads(VECTOR["test_key"]["client_key_json"])["PrivateKeyData"]


def _vector_key() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """The vector's key, opened straight from its PKCS#12 with cryptography (not our loader)."""
    key, cert, _ = pkcs12.load_key_and_certificates(
        base64.b64decode(PRIVATE_KEY_DATA), PASSWORD.encode()
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    assert cert is not None
    return key, cert


def _rsa_public(cert: x509.Certificate) -> rsa.RSAPublicKey:
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    return public


VECTOR_KEY, VECTOR_CERT = _vector_key()
ENDPOINT = VECTOR["endpoint_config"]
DATE = VECTOR["fixed_date"]


# ---------------------------------------------------------------------------- the SDK


@functools.cache
def _sdk_modules() -> types.SimpleNamespace | None:
    """The SDK's modules, imported once; a stand-in for pyOpenSSL if it cannot load."""
    stubbed = []
    try:
        from OpenSSL import crypto  # noqa: F401
    except Exception:
        for name in ("OpenSSL", "OpenSSL.crypto"):
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
        sys.modules["OpenSSL"].crypto = sys.modules["OpenSSL.crypto"]  # type: ignore[attr-defined]
    try:
        from alibabacloud_tea_util.client import Client as UtilClient
        from openapi import models as openapi_models
        from openapi_util.client import Client as OpenapiUtil
        from openapi_util.protobuf import api_pb2
        from sdk import models as sdk_models
        from sdk.client import Client
        from Tea.core import TeaCore
        from Tea.exceptions import TeaException, UnretryableException
    except ImportError:
        return None
    finally:
        for name in stubbed:
            del sys.modules[name]
    return types.SimpleNamespace(
        Client=Client, models=sdk_models, Config=openapi_models.Config, pb=api_pb2,
        util=OpenapiUtil, UtilClient=UtilClient, TeaCore=TeaCore, TeaException=TeaException,
        UnretryableException=UnretryableException,
    )  # fmt: skip


SDK = _sdk_modules()
needs_sdk = pytest.mark.skipif(
    SDK is None, reason="alibabacloud-dkms-gcs is not installed (pip install alibabacloud-dkms-gcs)"
)


def the_sdk() -> types.SimpleNamespace:
    """The SDK's modules, in a test marked ``needs_sdk`` (which skips without them)."""
    assert SDK is not None
    return SDK


def _pkcs1_body(key) -> str:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


class _Answer:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.content, self.reason = status, body, ""
        self.headers: dict[str, str] = {}


class RecordingSession:
    """Stands in for the SDK's ``requests`` session: records each prepared request and
    answers from ``answers`` (an exception instance is raised, as a network error would be)."""

    def __init__(self, *answers: tuple[int, bytes] | Exception) -> None:
        self.answers = list(answers)
        self.sent: list[Any] = []

    def send(self, prepared, **_: Any) -> _Answer:
        self.sent.append(prepared)
        answer = self.answers[min(len(self.sent), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return _Answer(*answer)


@contextlib.contextmanager
def sdk_transport(sdk, session: RecordingSession) -> Iterator[list[float]]:
    """The SDK with its clock fixed at the vector's date, its transport replaced by
    ``session`` and its sleeps recorded (yielded) instead of slept."""
    sleeps: list[float] = []
    with (
        mock.patch.object(sdk.UtilClient, "get_date_utcstring", staticmethod(lambda: DATE)),
        mock.patch.object(sdk.TeaCore, "_get_session", staticmethod(lambda **_: session)),
        mock.patch.object(sdk.TeaCore, "sleep", staticmethod(sleeps.append)),
    ):
        yield sleeps


def sdk_client(sdk):
    config = sdk.Config(
        access_key_id=KEY_ID, private_key=_pkcs1_body(VECTOR_KEY), endpoint=ENDPOINT
    )
    return sdk.Client(config)


# ---------------------------------------------------------------------------- signer


#: Sent by the SDK but set by the HTTP client in the agent (neither is signed).
TRANSPORT_HEADERS = {"host", "user-agent"}


def sent_headers(prepared) -> dict[str, str]:
    return {k.lower(): v for k, v in prepared.headers.items()}


def verifies(headers: dict[str, str], key=VECTOR_KEY) -> bool:
    """The judge: cryptography's own RSA verification, over our string to sign (which
    :func:`test_string_to_sign_equals_the_sdks` holds to the SDK's)."""
    signature = base64.b64decode(headers["authorization"].removeprefix("Bearer "))
    try:
        key.public_key().verify(
            signature,
            dkms.string_to_sign("POST", headers).encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature:
        return False
    return True


def test_vector_reproduced_byte_for_byte():
    """The recorded request, rebuilt from its inputs: the same string to sign, the same
    signature and every header the SDK sent (in its order), except host and user-agent,
    which the HTTP client sets and nobody signs."""
    body = bytes.fromhex(VECTOR["body_hex"])
    headers = dkms.request_headers(
        body=body, date=DATE, key_id=KEY_ID, api_name="GetSecretValue", private_key=VECTOR_KEY
    )
    expected = {k: v for k, v in VECTOR["headers"].items() if k not in TRANSPORT_HEADERS}
    assert list(headers.items()) == list(expected.items())
    assert dkms.string_to_sign("POST", headers) == VECTOR["string_to_sign"]
    assert dkms.content_sha256(body) == VECTOR["content_sha256_expected_upper_hex"]
    assert headers["authorization"] == VECTOR["authorization"]
    assert dkms.http_date(1580974374) == DATE


def test_the_send_path_signer_reproduces_the_vector():
    """ClientKeySigner, the Signer the provider's one send path uses, makes the recorded
    headers from a request, the key id in the source's Credentials and the clock: the same
    authorization byte for byte, the host passed through unsigned."""
    body = bytes.fromhex(VECTOR["body_hex"])
    request = dkms.request("GetSecretValue", body).to("kst-test.cryptoservice.kms.aliyuncs.com")
    signer = dkms.ClientKeySigner(VECTOR_KEY)
    sent = signer.sign(request, Credentials(KEY_ID, "", origin="client_key"), now=1580974374)
    expected = {k: v for k, v in VECTOR["headers"].items() if k not in TRANSPORT_HEADERS}
    assert sent.pop("host") == "kst-test.cryptoservice.kms.aliyuncs.com"
    assert list(sent.items()) == list(expected.items())
    assert "PRIVATE" not in repr(signer) and "RSAPrivateKey" not in repr(signer)


def test_signature_verifies_and_any_signed_byte_changed_fails():
    """A request we sign verifies with the public key of the vector's PKCS#12 (checked by
    cryptography and by :func:`dkms.verify`); changing any one byte of the body or of any
    signed header makes it fail, while the unsigned headers are not covered."""
    body = b"\x0a\x05app-1\x12\x0aACSCurrent"
    headers = dkms.request_headers(
        body=body, date=DATE, key_id=KEY_ID, api_name="GetSecretValue", private_key=VECTOR_KEY
    )
    public = _rsa_public(VECTOR_CERT)
    assert verifies(headers)
    assert dkms.verify("POST", headers, body, public)

    for i in range(len(body)):
        changed = bytearray(body)
        changed[i] ^= 0x01
        assert not dkms.verify("POST", headers, bytes(changed), public)
        rehashed = {**headers, "content-sha256": dkms.content_sha256(bytes(changed))}
        assert not verifies(rehashed)
        assert not dkms.verify("POST", rehashed, bytes(changed), public)

    signed = ["date", "content-type", "content-sha256"] + [
        h for h in headers if h.startswith("x-kms-")
    ]
    assert len(signed) == 7
    for name in signed:
        for i in range(len(headers[name])):
            value = bytearray(headers[name].encode())
            value[i] ^= 0x01
            tampered = {**headers, name: value.decode("latin-1")}
            assert not verifies(tampered), (name, i)
            assert not dkms.verify("POST", tampered, body, public), (name, i)
    assert not dkms.verify("PUT", headers, body, public)

    for name in ("accept", "content-length"):
        assert dkms.verify("POST", {**headers, name: "x"}, body, public)


def test_verify_refuses_what_is_not_a_bearer_signature():
    """A missing or non-Bearer authorization, or a signature that is not base64, is a
    refusal (False), never an exception."""
    body = b""
    headers = dkms.request_headers(
        body=body, date=DATE, key_id=KEY_ID, api_name="GetSecretValue", private_key=VECTOR_KEY
    )
    public = VECTOR_KEY.public_key()
    assert dkms.verify("POST", headers, body, public)
    for auth in (None, "Basic abc", "Bearer !!notbase64!!", "Bearer "):
        bad = {k: v for k, v in headers.items() if k != "authorization"}
        if auth is not None:
            bad["authorization"] = auth
        assert not dkms.verify("POST", bad, body, public)


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@needs_sdk
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.text(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=60
    ),
    stage=_TEXT,
    version=_TEXT,
    extended=st.booleans(),
)
def test_our_request_equals_the_sdks(name, stage, version, extended):
    """For any GetSecretValue, the SDK's own client (clock fixed, transport recorded) sends
    exactly our body and our headers: same names, values and signature."""
    sdk = the_sdk()
    session = RecordingSession((200, b""))
    with sdk_transport(sdk, session):
        sdk_client(sdk).get_secret_value(
            sdk.models.GetSecretValueRequest(
                secret_name=name, version_stage=stage, version_id=version,
                fetch_extended_config=extended,
            )
        )  # fmt: skip
    (prepared,) = session.sent
    body = GetSecretValueRequest(name, stage, version, extended).encode()
    ours = dkms.request_headers(
        body=body, date=DATE, key_id=KEY_ID, api_name="GetSecretValue", private_key=VECTOR_KEY
    )
    theirs = sent_headers(prepared)
    assert prepared.method == "POST"
    assert prepared.url == f"https://{ENDPOINT}/"
    assert prepared.body == body
    assert {k: v for k, v in theirs.items() if k not in TRANSPORT_HEADERS} == ours


@needs_sdk
@settings(max_examples=200, deadline=None)
@given(
    headers=st.dictionaries(
        st.one_of(
            st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map("x-kms-".__add__),
            st.sampled_from(
                ["date", "content-type", "content-sha256", "accept", "host", "x-acs-a"]
            ),
        ),
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
        max_size=8,
    ),
)
def test_string_to_sign_equals_the_sdks(headers):
    """For any set of lower-case headers, our string to sign is the SDK's
    ``get_string_to_sign``: x-kms-* only, names sorted, values trimmed, resource ``/``."""
    assert dkms.string_to_sign("POST", headers) == the_sdk().util.get_string_to_sign(
        "POST", "/", headers, {}
    )


# ---------------------------------------------------------------------------- protobuf

MESSAGES = [GetSecretValueRequest, GetSecretValueResponse, Error]
_STRING = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
_VALUES = {
    "string": _STRING,
    "bool": st.booleans(),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "strings": st.lists(_STRING, max_size=4).map(tuple),
}


def _pb_class(cls):
    return getattr(the_sdk().pb, cls.__name__)


def _theirs_as_ours(cls, theirs) -> dict[str, Any]:
    return {
        attr: tuple(getattr(theirs, name)) if kind == "strings" else getattr(theirs, name)
        for _, name, attr, kind in cls.FIELDS
    }


def _ours(message) -> dict[str, Any]:
    return {attr: getattr(message, attr) for _, _, attr, _ in message.FIELDS}


@st.composite
def messages(draw):
    cls = draw(st.sampled_from(MESSAGES))
    return cls(**{attr: draw(_VALUES[kind]) for _, _, attr, kind in cls.FIELDS})


def _raw_varint(value: int) -> bytes:
    """An independent varint writer (base 128, low groups first)."""
    out = b""
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _key(number: int, wire: int) -> bytes:
    return _raw_varint(number << 3 | wire)


@st.composite
def unknown_field(draw: st.DrawFn, known: frozenset[int], depth: int = 0) -> bytes:
    number = draw(st.integers(1, 2**29 - 1).filter(lambda n: n not in known))
    wire = draw(st.sampled_from([0, 1, 2, 5] + ([3] if depth < 2 else [])))
    if wire == 0:
        return _key(number, 0) + _raw_varint(draw(st.integers(0, 2**64 - 1)))
    if wire == 1:
        return _key(number, 1) + draw(st.binary(min_size=8, max_size=8))
    if wire == 5:
        return _key(number, 5) + draw(st.binary(min_size=4, max_size=4))
    if wire == 2:
        payload = draw(st.binary(max_size=12))
        return _key(number, 2) + _raw_varint(len(payload)) + payload
    inner = draw(st.lists(unknown_field(frozenset(), depth + 1), max_size=3))
    return _key(number, 3) + b"".join(inner) + _key(number, 4)


@st.composite
def wire_messages(draw):
    """A message class and raw bytes: its known fields in any order, repeated, with any
    varint for numbers (int32 truncates, bool is non-zero), mixed with unknown fields."""
    cls = draw(st.sampled_from(MESSAGES))
    known = frozenset(f[0] for f in cls.FIELDS)
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            parts.append(draw(unknown_field(known)))
            continue
        number, _, _, kind = draw(st.sampled_from(cls.FIELDS))
        if kind in ("bool", "int32"):
            parts.append(_key(number, 0) + _raw_varint(draw(st.integers(0, 2**64 - 1))))
        else:
            raw = draw(_STRING).encode()
            parts.append(_key(number, 2) + _raw_varint(len(raw)) + raw)
    return cls, b"".join(parts)


@needs_sdk
@settings(max_examples=300, deadline=None)
@given(message=messages())
def test_encode_is_what_the_sdk_classes_write_and_read(message):
    """For any message, our bytes are the SDK's generated class's ``SerializeToString``
    byte for byte, and the SDK parses them back to the same fields."""
    cls = type(message)
    theirs = _pb_class(cls)(**{name: getattr(message, attr) for _, name, attr, _ in cls.FIELDS})
    assert message.encode() == theirs.SerializeToString()
    assert _theirs_as_ours(cls, _pb_class(cls).FromString(message.encode())) == _ours(message)
    assert cls.decode(theirs.SerializeToString()) == message


@needs_sdk
@settings(max_examples=500, deadline=None)
@given(case=wire_messages())
def test_decode_agrees_with_the_sdk_classes_on_any_valid_bytes(case):
    """Bytes with fields in any order, repeated singular fields (last wins), repeated
    strings, over-long varints for numbers and unknown fields of every wire type
    (groups nested) decode to the same fields as the SDK's classes."""
    cls, raw = case
    assert _ours(cls.decode(raw)) == _theirs_as_ours(cls, _pb_class(cls).FromString(raw))


def test_request_encoding_of_the_vector():
    """The vector's body is GetSecretValueRequest{SecretName, VersionStage}, empty fields
    omitted, and decodes back to it."""
    body = GetSecretValueRequest(secret_name="db-password", version_stage="ACSCurrent").encode()
    assert body.hex() == VECTOR["body_hex"]
    assert GetSecretValueRequest.decode(body) == GetSecretValueRequest(
        secret_name="db-password", version_stage="ACSCurrent"
    )
    assert GetSecretValueRequest(fetch_extended_config=True).encode() == b"\x20\x01"
    assert Error(status_code=-1).encode() == b"\x08" + b"\xff" * 9 + b"\x01"


# fmt: off
MALFORMED = [
    # (what, message class, bytes, words in the error, whether protobuf-python refuses too)
    ("truncated tag", GetSecretValueResponse, b"\x80", "truncated varint at byte 0", True),
    ("truncated varint value", Error, b"\x08\x80\x80", "truncated varint at byte 1", True),
    ("varint over 10 bytes", Error, b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes", True),
    ("length past the end", GetSecretValueResponse, b"\x1a\x09hunter2", "length 9, past the end (9 bytes)", True),
    ("huge length", GetSecretValueResponse, b"\x1a\xff\xff\xff\xff\x0fhunter2", "past the end", True),
    ("wrong wire type, known field", GetSecretValueResponse, b"\x0a\x01a\x18\x07", "field 3 (SecretData) is varint, expected length-delimited", False),
    ("bool as bytes", GetSecretValueRequest, b"\x22\x01\x01", "field 4 (FetchExtendedConfig) is length-delimited, expected varint", False),
    ("wire type 6", GetSecretValueResponse, b"\x0e", "invalid wire type 6 at byte 0", True),
    ("wire type 7", GetSecretValueResponse, b"\x0a\x00\x0f", "invalid wire type 7 at byte 2", True),
    ("field number 0", GetSecretValueResponse, b"\x02\x00", "field number 0 at byte 0", True),
    ("stray end-group", GetSecretValueResponse, b"\x0c", "unexpected end-group tag at byte 0", True),
    ("mismatched end-group", GetSecretValueResponse, b"\x7b\x0c", "unexpected end-group tag at byte 1", False),
    ("known field as a group", GetSecretValueResponse, b"\x2b\x2c", "field 5 (VersionStages) is start-group, expected length-delimited", False),
    ("unclosed group", GetSecretValueResponse, b"\x7b\x08\x01", "group 15 is not closed", True),
    ("truncated fixed64", GetSecretValueResponse, b"\x79\x01\x02", "field 15 at byte 0 is truncated", True),
    ("invalid UTF-8", GetSecretValueResponse, b"\x1a\x09hunter2\xff\xfe", "field 3 (SecretData) is not valid UTF-8", True),
]
# fmt: on


@pytest.mark.parametrize(
    ("what", "cls", "raw", "words", "sdk_refuses"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_bytes_are_refused_clearly(what, cls, raw, words, sdk_refuses):
    """Each malformed input is a MalformedMessage (a ValueError) of one line naming the
    message and where, never the bytes (a planted secret ``hunter2`` stays out). The SDK's
    classes refuse the same inputs except two, which protobuf-python accepts and we refuse:
    a known field with the wrong wire type (it keeps it as unknown) and a group closed with
    another field's end tag."""
    with pytest.raises(MalformedMessage) as caught:
        cls.decode(raw)
    text = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert text.startswith(cls.__name__ + ": ")
    assert words in text
    assert "hunter2" not in text
    assert "\n" not in text
    if SDK is not None:
        if sdk_refuses:
            from google.protobuf.message import DecodeError

            with pytest.raises((DecodeError, UnicodeDecodeError)):
                _pb_class(cls).FromString(raw)
        else:
            _pb_class(cls).FromString(raw)


def test_response_repr_hides_the_secret_and_int32_is_checked():
    """A decoded response's repr shows its metadata but never SecretData; an Error whose
    status does not fit an int32 cannot be encoded."""
    response = GetSecretValueResponse(secret_name="db", secret_data="hunter2", version_id="v1")
    assert "hunter2" not in repr(response)
    assert "hunter2" not in str(response)
    assert "v1" in repr(response)
    assert GetSecretValueResponse.decode(response.encode()).secret_data == "hunter2"
    with pytest.raises(ValueError, match="StatusCode: 2147483648 is not an int32"):
        Error(status_code=2**31).encode()


@needs_sdk
def test_sdk_reads_our_response_as_the_vector_recorded():
    """A GetSecretValueResponse we encode, answered to the SDK's own client, is parsed by
    it into exactly the response the vector recorded."""
    parsed = {k: v for k, v in VECTOR["parsed_response"].items() if k != "responseHeaders"}
    names = {name: attr for _, name, attr, _ in GetSecretValueResponse.FIELDS}
    fields: dict[str, Any] = {
        names[k]: tuple(v) if isinstance(v, list) else v for k, v in parsed.items()
    }
    ours = GetSecretValueResponse(**fields)
    session = RecordingSession((200, ours.encode()))
    sdk = the_sdk()
    with sdk_transport(sdk, session):
        answer = sdk_client(sdk).get_secret_value(
            sdk.models.GetSecretValueRequest(secret_name="db-password", version_stage="ACSCurrent")
        )
    assert {k: v for k, v in answer.to_map().items() if k != "responseHeaders"} == parsed
    assert session.sent[0].body.hex() == VECTOR["body_hex"]


# ---------------------------------------------------------------------------- errors

# fmt: off
ERROR_TABLE = [
    # (status, code, message, expected class)
    (404, "Forbidden.ResourceNotFound", "The resource is not found.", SecretNotFound),
    (400, "Rejected.Throttling", "Request was denied due to flow control.", Throttled),
    (429, "", "", Throttled),
    (403, "Forbidden.NoPermission", "This operation is forbidden by permission system.", AccessDenied),
    (403, "Forbidden.NoPermission", "no kms:Decrypt on key-1", DecryptDenied),
    (403, "Forbidden.KeyNotFound", "", AccessDenied),
    (400, "Rejected.ResourceInDeleteWindow", "", PendingDeletion),
    (401, "InvalidAccessKeyId.NotFound", "", BadCredentials),
    (401, "SignatureNotMatch", "Signature is not matched.", BadCredentials),
    (404, "Unauthorized", "The AccessKey ID KAAP.x does not exist in our records.", BadCredentials),
    (400, "InvalidParam", "The Param Authorization is invalid.", BadCredentials),
    (400, "SignatureDoesNotMatch", "", BadCredentials),
    (400, "IncompleteSignature", "", BadCredentials),
    (400, "RequestTimeTooSkewed", "Request time exceeds server time more than 15 minutes.", BadCredentials),
    (401, "", "", BadCredentials),
    (500, "InternalFailure", "", Unavailable),
    (503, "", "", Unavailable),
    (400, "ServiceUnavailableTemporary", "", Unavailable),
    (400, "InvalidParam", "The Param Date is invalid.", InvalidUpstreamRequest),
    (404, "", "", InvalidUpstreamRequest),
]
# fmt: on


@pytest.mark.parametrize(("status", "code", "message", "expected"), ERROR_TABLE)
def test_error_table(status, code, message, expected):
    """Each gateway answer maps to its error in the agent's vocabulary (exactly that class),
    carries what the gateway said (``upstream``), names the secret and the endpoint, and the
    request id; the errors a caller can act on carry a hint."""
    body = Error(
        status_code=status, error_code=code, error_message=message, request_id="req-9"
    ).encode()
    error = classify(status, body, endpoint=ENDPOINT, name="db-password")
    assert type(error) is expected
    assert error_kind(status, code, message) is expected
    assert (error.upstream_status, error.upstream_code, error.upstream_message) == (
        status,
        code,
        message,
    )
    assert ENDPOINT in error.message
    assert "(request req-9)" in error.message
    assert (code or f"HTTP {status}") in error.message
    if expected in (SecretNotFound, AccessDenied, DecryptDenied, PendingDeletion):
        assert "'db-password'" in error.message
    if expected not in (Unavailable, InvalidUpstreamRequest):
        assert error.hint
    if expected is InvalidUpstreamRequest and message:
        assert message in error.message


def test_body_that_is_not_an_error_is_judged_by_status():
    """A 4xx/5xx whose body is not a protobuf Error (a proxy's HTML page) maps by status
    alone and names the status; the page itself is never quoted."""
    page = b"<html>\x80\xff broken gateway PLANTED-PAGE</html>"
    failed = classify(502, page, endpoint=ENDPOINT)
    refused = classify(403, page, endpoint=ENDPOINT)
    assert type(failed) is Unavailable
    assert type(refused) is InvalidUpstreamRequest
    for error in (failed, refused):
        assert "PLANTED-PAGE" not in error.message
        assert f"HTTP {error.upstream_status}" in error.message
        assert error.upstream_code == ""


def test_long_upstream_text_is_cut():
    """The gateway's code, message and request id are bounded before they reach a message."""
    error = map_error(
        400,
        Error(error_code="C" * 500, error_message="m" * 5000, request_id="r" * 500),
        endpoint="e",
    )
    assert error.upstream_code is not None
    assert error.upstream_message is not None
    assert len(error.upstream_code) == 100
    assert len(error.upstream_message) == 300
    assert len(error.message) < 600


@needs_sdk
def test_sdk_reads_our_error_body_as_we_do():
    """The vector's 404: an Error body we encode is raised by the SDK as the TeaException
    the vector recorded, and we read the same code, message, status and request id."""
    recorded = VECTOR["error_404"]
    body = Error(
        status_code=404, error_code=recorded["code"], error_message=recorded["message"],
        request_id=recorded["data"]["requestId"],
    ).encode()  # fmt: skip
    session = RecordingSession((404, body))
    sdk = the_sdk()
    with sdk_transport(sdk, session), pytest.raises(sdk.TeaException) as caught:
        sdk_client(sdk).get_secret_value(
            sdk.models.GetSecretValueRequest(secret_name="db-password")
        )
    raised = caught.value
    assert (raised.code, raised.message, raised.data) == (
        recorded["code"],
        recorded["message"],
        recorded["data"],
    )
    ours = classify(404, body, endpoint=ENDPOINT, name="db-password")
    assert (ours.upstream_status, ours.upstream_code, ours.upstream_message) == (
        raised.data["httpCode"], raised.code, raised.message,
    )  # fmt: skip
    assert f"(request {raised.data['requestId']})" in ours.message
    assert type(ours) is SecretNotFound


# ---------------------------------------------------------------------------- retries


def _io_failure(exc: Exception):
    """What the agent raises for a transport failure: the one mapping in upstream.py."""
    try:
        with mapped_errors(ENDPOINT):
            raise exc
    except AgentError as mapped:
        return mapped
    raise AssertionError("not mapped")


def _answer(status: int, code: str) -> tuple[int, bytes]:
    return status, Error(status_code=status, error_code=code, request_id="r").encode()


# fmt: off
RETRY_CASES = [
    # (what, the SDK's transport sees, the agent's error for the same failure)
    ("throttled", _answer(400, "Rejected.Throttling"), lambda: classify(*_answer(400, "Rejected.Throttling"), endpoint=ENDPOINT)),
    ("not found", _answer(404, "Forbidden.ResourceNotFound"), lambda: classify(*_answer(404, "Forbidden.ResourceNotFound"), endpoint=ENDPOINT)),
    ("5xx", _answer(500, "InternalFailure"), lambda: classify(*_answer(500, "InternalFailure"), endpoint=ENDPOINT)),
    ("other throttling", _answer(400, "Throttling.User"), lambda: classify(*_answer(400, "Throttling.User"), endpoint=ENDPOINT)),
    ("connection refused", "connection", lambda: _io_failure(aiohttp.ClientOSError(111, "Connection refused"))),
    ("timeout", "timeout", lambda: _io_failure(TimeoutError())),
]
# fmt: on


@needs_sdk
@pytest.mark.parametrize(
    ("what", "transport", "agent_error"), RETRY_CASES, ids=[c[0] for c in RETRY_CASES]
)
def test_retry_rule_is_the_sdks(what, transport, agent_error):
    """SDK_RETRY says retry exactly when the SDK itself retries the same failure (I/O
    errors and Rejected.Throttling; not 5xx, not other codes), and its attempts and
    spacing are the SDK's: counted on its recorded transport and sleeps."""
    import requests

    failure = {
        "connection": requests.ConnectionError("refused"),
        "timeout": requests.ReadTimeout("slow"),
    }
    session = RecordingSession(failure.get(transport, transport))
    sdk = the_sdk()
    with sdk_transport(sdk, session) as sleeps, pytest.raises(sdk.TeaException):
        sdk_client(sdk).get_secret_value(sdk.models.GetSecretValueRequest(secret_name="a"))
    sdk_retried = len(session.sent) > 1
    assert SDK_RETRY.retryable(agent_error()) is sdk_retried
    if sdk_retried:
        assert len(session.sent) == SDK_RETRY.attempts == VECTOR["attempts_for_Rejected.Throttling"]
        assert (
            sleeps
            == [SDK_RETRY.spacing] * (SDK_RETRY.attempts - 1)
            == VECTOR["sleeps_between_attempts_s"]
        )
    else:
        assert len(session.sent) == 1 == VECTOR["attempts_for_404"]
        assert sleeps == []


def test_calls_the_agent_held_back_are_not_retried():
    """Failures of the agent's own making (the limiter, an open breaker) are not retried
    by the rule, though they carry no upstream answer either."""
    assert not SDK_RETRY.retryable(HeldByLimiter("held"))
    assert not SDK_RETRY.retryable(SourceFailing("open"))
    assert not SDK_RETRY.retryable(InvalidUpstreamRequest("mapped without upstream"))
    assert SDK_RETRY.retryable(_io_failure(TimeoutError()))


# ---------------------------------------------------------------------------- ClientKey

#: A password no message, repr or str may ever show.
PLANTED_PASSWORD = "planted-pw-" + "7f3a9c"


def _pkcs12(key, cert=None, password: str = PLANTED_PASSWORD) -> str:
    blob = pkcs12.serialize_key_and_certificates(
        b"client key", key, cert, None, serialization.BestAvailableEncryption(password.encode())
    )
    return base64.b64encode(blob).decode()


def _self_signed(key):
    from datetime import UTC, datetime, timedelta

    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip


@pytest.fixture(name="key_dir")
def _key_dir(tmp_path):
    """The vector's ClientKey file, its password file (with a trailing newline, as
    ``echo`` writes it) and the environment holding the same password."""
    (tmp_path / "clientkey.json").write_text(VECTOR["test_key"]["client_key_json"])
    (tmp_path / "password").write_text(PASSWORD + "\n")
    return tmp_path


def test_client_key_loads_from_a_password_file_or_env(key_dir):
    """The vector's ClientKey opens with its password from a file or from a named
    environment variable, to the same key the vector holds; its repr and str show the key
    id and path, never key material or the password."""
    by_file = load_client_key(
        key_dir / "clientkey.json", password_file=key_dir / "password", environ={}
    )
    by_env = load_client_key(
        key_dir / "clientkey.json", password_env="CK_PASSWORD", environ={"CK_PASSWORD": PASSWORD}
    )
    pem = serialization.load_pem_private_key(VECTOR["test_key"]["private_key_pem"].encode(), None)
    assert isinstance(pem, rsa.RSAPrivateKey)
    for key in (by_file, by_env):
        assert key.key_id == KEY_ID
        assert key.private_key.private_numbers() == pem.private_numbers()
        assert key.public_key().public_numbers() == _rsa_public(VECTOR_CERT).public_numbers()
        assert key.not_after == VECTOR_CERT.not_valid_after_utc
        for shown in (repr(key), str(key)):
            assert KEY_ID in shown
            assert "<redacted>" in shown
            assert PASSWORD not in shown
            assert PRIVATE_KEY_DATA[:40] not in shown
            assert str(pem.private_numbers().d) not in shown
    headers = dkms.request_headers(
        body=bytes.fromhex(VECTOR["body_hex"]), date=DATE, key_id=by_file.key_id,
        api_name="GetSecretValue", private_key=by_file.private_key,
    )  # fmt: skip
    assert headers["authorization"] == VECTOR["authorization"]


def _write(tmp_path, text: str):
    path = tmp_path / "clientkey.json"
    path.write_text(text)
    return path


def _refusal(path, **password) -> str:
    password = password or {"password_env": "CK", "environ": {"CK": PLANTED_PASSWORD}}
    password.setdefault("environ", {})
    with pytest.raises(ConfigError) as caught:
        load_client_key(path, where="sources.kms.client_key_file", **password)
    error = caught.value
    text = str(error)
    for shown in (text, repr(error), error.hint or ""):
        assert PLANTED_PASSWORD not in shown
        assert PASSWORD not in shown
        assert PRIVATE_KEY_DATA[:40] not in shown
    assert "\n" not in text
    assert text.startswith("sources.kms.client_key_file: ")
    return text


def test_client_key_missing_file(tmp_path):
    """A ClientKey file that does not exist: named, with the reason and what to give."""
    text = _refusal(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in text
    assert "No such file or directory" in text
    assert "ClientKey JSON file" in text


def test_client_key_bad_json(tmp_path):
    """A file that is not JSON: named, with where it breaks, not its content."""
    path = _write(tmp_path, '{"KeyId": "KAAP.1", "PrivateKeyData": "' + PRIVATE_KEY_DATA[:60])
    text = _refusal(path)
    assert str(path) in text
    assert "invalid JSON at line 1" in text
    assert "download the ClientKey again" in text


def test_client_key_json_not_an_object(tmp_path):
    """JSON that is not an object is not a ClientKey file."""
    assert "the JSON is not an object" in _refusal(_write(tmp_path, "[1, 2]"))


@pytest.mark.parametrize(
    "document",
    [{"KeyId": "KAAP.1"}, {"PrivateKeyData": "AAAA"}, {"KeyId": 7, "PrivateKeyData": "AAAA"}],
)
def test_client_key_fields_missing(tmp_path, document):
    """KeyId and PrivateKeyData must both be strings; the message names the one that is not."""
    missing = "KeyId" if not isinstance(document.get("KeyId"), str) else "PrivateKeyData"
    text = _refusal(_write(tmp_path, json.dumps(document)))
    assert f"{missing} is missing or not a string" in text


def test_client_key_id_with_control_characters(tmp_path):
    """A KeyId that could not be sent as a header (newline, space) is refused at load."""
    path = _write(
        tmp_path, json.dumps({"KeyId": "KAAP.1\r\nx-evil: 1", "PrivateKeyData": PRIVATE_KEY_DATA})
    )
    assert "KeyId is not printable ASCII" in _refusal(path)


def test_client_key_not_base64(tmp_path):
    """PrivateKeyData that is not base64 is named as such."""
    path = _write(tmp_path, json.dumps({"KeyId": "KAAP.1", "PrivateKeyData": "abc"}))
    assert "PrivateKeyData is not base64" in _refusal(path)


def test_client_key_not_pkcs12(tmp_path):
    """base64 of something that is not PKCS#12 (here a PEM key) is named as such."""
    data = base64.b64encode(VECTOR["test_key"]["private_key_pem"].encode()).decode()
    path = _write(tmp_path, json.dumps({"KeyId": "KAAP.1", "PrivateKeyData": data}))
    assert "PrivateKeyData is not PKCS#12" in _refusal(path)


def test_client_key_wrong_password(key_dir):
    """The wrong password (planted) is refused as such, and appears nowhere."""
    text = _refusal(key_dir / "clientkey.json")
    assert "the password does not open its PKCS#12" in text
    assert str(key_dir / "clientkey.json") in text


def test_client_key_holds_no_rsa_key(tmp_path):
    """A PKCS#12 with an EC key, or with only a certificate, holds no RSA private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    for data, found in (
        (_pkcs12(ec_key), "ECPrivateKey"),
        (_pkcs12(None, _self_signed(ec_key)), "no private key"),
    ):
        path = _write(tmp_path, json.dumps({"KeyId": "KAAP.1", "PrivateKeyData": data}))
        text = _refusal(path)
        assert "not an RSA private key" in text
        assert found in text


def test_client_key_password_sources(key_dir, tmp_path):
    """The password comes from exactly one of a file and an environment variable: neither,
    both, an unset or empty variable, a missing or empty file are each refused by name."""
    path = key_dir / "clientkey.json"
    assert "exactly one of" in _refusal(path, environ={})
    assert "exactly one of" in _refusal(path, password_file=key_dir / "password", password_env="CK")
    assert "CK holding the ClientKey's password is not set or empty" in _refusal(
        path, password_env="CK"
    )
    assert "is not set or empty" in _refusal(path, password_env="CK", environ={"CK": ""})
    assert "No such file or directory" in _refusal(path, password_file=tmp_path / "absent")
    (tmp_path / "empty").write_text("\n")
    assert f"password file {tmp_path / 'empty'} is empty" in _refusal(
        path, password_file=tmp_path / "empty"
    )
