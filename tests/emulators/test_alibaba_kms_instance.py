"""The emulator as a KMS 3.0 instance (dedicated gateway on TLS), judged by Alibaba's own
SDKs: the dkms-gcs SDK (ClientKey) and the Tea SDK (RAM auth) are served over TLS with the
test CA, any one-byte change to a signed request is refused, clients that do not trust the
CA cannot connect, and refusals come back in the shapes the SDKs turn into their errors."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import json
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
import yarl
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import PLANTED
from tests.emulators import dkms_sdk
from tests.emulators.alibaba_kms import (
    INSTANCE_DOMAIN,
    RFC1123,
    KmsEmulator,
    make_client_key_file,
    make_instance_tls,
    pb_decode,
    pb_encode,
    pb_string,
)

READ_ALL = {"Statement": [{"Effect": "Allow", "Action": ["kms:*"], "Resource": ["*"]}]}
#: An application access point's policy: GetSecretValue on aigw's default secrets only.
AIGW_ONLY = {
    "Statement": [
        {"Effect": "Allow", "Action": ["kms:GetSecretValue"], "Resource": ["secret/aigw!*"]}
    ]
}
#: The request recorded from the SDK (a copy of shared/vectors, kept with the tests).
VECTOR = Path(__file__).resolve().parents[1] / "fixtures" / "alibaba-dkms-gcs.json"


def host_port(url: str) -> str:
    return url.removeprefix("https://")


def sdk_client(url: str, client_key, ca_file=None, *, key_id: str | None = None):
    """A dkms-gcs SDK client signing with ``client_key``'s private key as ``key_id``."""
    return dkms_sdk.client(
        host_port(url), key_id or client_key.key_id, dkms_sdk.pkcs1_pem(client_key), ca_file
    )


async def sdk_get(client, name: str, **options):
    return await asyncio.to_thread(dkms_sdk.get_secret_value, client, name, **options)


def tea_client(url: str, ak: str, sk: str, ca_file=None):
    from alibabacloud_kms20160120.client import Client
    from alibabacloud_tea_openapi.models import Config

    cfg = Config(access_key_id=ak, access_key_secret=sk, endpoint=host_port(url), protocol="https",
                 region_id="cn-hangzhou", ca=str(ca_file) if ca_file else None)  # fmt: skip
    return Client(cfg)


async def tea_get(client, name: str):
    from alibabacloud_kms20160120.models import GetSecretValueRequest

    return await asyncio.to_thread(client.get_secret_value, GetSecretValueRequest(secret_name=name))


def sdk_error(body: bytes):
    """A protobuf Error body as the SDK's own generated class reads it."""
    dkms_sdk.sdk()
    from openapi_util.protobuf import api_pb2

    error = api_pb2.Error()
    error.ParseFromString(body)
    return error


def flip(text: str, at: int) -> str:
    """``text`` with the character at ``at`` changed by one bit (stays printable ASCII)."""
    return text[:at] + chr(ord(text[at]) ^ 1) + text[at + 1 :]


async def replay(
    session: aiohttp.ClientSession, url: str, headers: list[tuple[str, str]], body: bytes
):
    """POST exactly these headers and body (the length is recomputed); status and body."""
    send = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
    async with session.post(yarl.URL(url + "/", encoded=True), headers=send, data=body) as resp:
        return resp.status, await resp.read()


def tls_session(tls) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls.client_context()),
        skip_auto_headers=["User-Agent", "Accept", "Accept-Encoding", "Content-Type"],
    )


async def test_dkms_sdk_reads_a_paid_default_secret_over_tls(
    kms_instance, kms_instance_url, instance_ca_file
):
    """The dkms-gcs SDK, trusting the instance CA, reads a paid default secret under the
    instance's customer key with a ClientKey; the request it sent is the documented one."""
    client_key = kms_instance.add_client_key(AIGW_ONLY)
    version = kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    assert kms_instance.secrets["aigw!secret-abc"].key_id == kms_instance.instance_key_id
    resp = await sdk_get(
        sdk_client(kms_instance_url, client_key, instance_ca_file), "aigw!secret-abc"
    )
    assert (resp.secret_name, resp.secret_data, resp.secret_data_type) == (
        "aigw!secret-abc",
        PLANTED,
        "text",
    )
    assert (resp.version_stages, resp.version_id, resp.secret_type) == (
        ["ACSCurrent"],
        version.id,
        "Generic",
    )
    assert resp.request_id
    _, path, headers, body = kms_instance.recorded[-1]
    sent = {k.lower(): v for k, v in headers}
    assert path == "/"
    assert sent["x-kms-acccesskeyid"] == client_key.key_id
    assert sent["x-kms-apiversion"] == "dkms-gcs-0.2"
    assert sent["content-sha256"] == hashlib.sha256(body).hexdigest().upper()
    assert sent["authorization"].startswith("Bearer ")
    assert kms_instance.calls[-1][1:] == ("GetSecretValue", client_key.key_id)


async def test_dkms_request_with_any_one_byte_changed_is_refused(
    kms_instance, kms_instance_url, instance_ca_file, instance_tls
):
    """Replaying the SDK's request unchanged is accepted; changing any one byte of the body,
    the body hash, content-type, date or an x-kms header, a byte of the signature, or adding
    an x-kms header is refused with a protobuf Error whose StatusCode is the HTTP status."""
    client_key = kms_instance.add_client_key(AIGW_ONLY)
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    await sdk_get(sdk_client(kms_instance_url, client_key, instance_ca_file), "aigw!secret-abc")
    _, _, headers, body = kms_instance.recorded[-1]
    names = [k for k, _ in headers]

    def with_header(name: str, value: str) -> list[tuple[str, str]]:
        return [(k, value if k == name else v) for k, v in headers]

    cases: list[tuple[str, list[tuple[str, str]], bytes]] = []
    for i in range(len(body)):
        cases.append((f"body byte {i}", headers, body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]))
    forged = bytes([body[0] ^ 1]) + body[1:]
    cases.append(
        (
            "body with its hash recomputed",
            with_header(
                next(k for k in names if k.lower() == "content-sha256"),
                hashlib.sha256(forged).hexdigest().upper(),
            ),
            forged,
        )
    )
    for name, value in headers:
        low = name.lower()
        if low in ("content-sha256", "content-type", "date") or low.startswith("x-kms-"):
            cases += [
                (f"{low}[{i}]", with_header(name, flip(value, i)), body) for i in range(len(value))
            ]
        if low == "authorization":
            cases += [(f"signature[{i}]", with_header(name, flip(value, i)), body)
                      for i in range(len("Bearer "), len(value) - 2, 5)]  # fmt: skip
    cases.append(("an added x-kms header", [*headers, ("x-kms-extra", "1")], body))

    async with tls_session(instance_tls) as session:
        status, answer = await replay(session, kms_instance_url, headers, body)
        assert status == 200
        assert PLANTED.encode() in answer
        refused = set()
        for label, hdrs, data in cases:
            status, answer = await replay(session, kms_instance_url, hdrs, data)
            error = sdk_error(answer)
            assert status in (400, 401, 404), label
            assert error.StatusCode == status, label
            refused.add(error.ErrorCode)
    assert refused == {"InvalidParam", "InvalidApiVersion", "Unauthorized", "SignatureNotMatch"}
    assert len(cases) > 250


async def test_tea_sdk_get_secret_value_at_the_instance_endpoint(
    kms_instance, kms_instance_url, instance_ca_file, instance_tls
):
    """The Tea SDK (RAM auth, ACS3) pointed at the instance endpoint with the CA reads the
    same paid default secret; its request with one byte of a signed header, the query or the
    signature changed is refused."""
    ak, sk = kms_instance.add_access_key(READ_ALL)
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    resp = await tea_get(tea_client(kms_instance_url, ak, sk, instance_ca_file), "aigw!secret-abc")
    assert resp.body.secret_data == PLANTED
    assert resp.body.version_stages.version_stage == ["ACSCurrent"]
    _, path_qs, headers, body = kms_instance.recorded[-1]
    auth = dict(headers)["Authorization"]
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    cases = [(f"header {n}", path_qs, [(k, flip(v, len(v) // 2) if k.lower() == n else v) for k, v in headers])
             for n in signed if n != "host"]  # fmt: skip
    q = path_qs.index("SecretName=") + len("SecretName=")
    cases.append(("query", flip(path_qs, q), headers))
    cases.append(
        (
            "signature",
            path_qs,
            [(k, flip(v, len(v) - 3) if k == "Authorization" else v) for k, v in headers],
        )
    )
    async with tls_session(instance_tls) as session:
        for label, qs, hdrs in cases:
            send = [(k, v) for k, v in hdrs if k.lower() != "content-length"]
            async with session.post(
                yarl.URL(kms_instance_url + qs, encoded=True), headers=send, data=body
            ) as r:
                answer = await r.json(content_type=None)
            assert r.status == 400, label
            assert answer["Code"] in ("SignatureDoesNotMatch", "IncompleteSignature"), label
    assert len(cases) >= 7


async def test_a_client_that_does_not_trust_the_ca_cannot_connect(
    kms_instance, kms_instance_url, tmp_path
):
    """Without the instance CA (the SDKs' default bundle) or with another CA, the TLS
    handshake fails in both SDKs and in a plain client, before any request is read."""
    client_key = kms_instance.add_client_key(AIGW_ONLY)
    ak, sk = kms_instance.add_access_key(READ_ALL)
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    other_ca = make_instance_tls(kms_instance.instance_host).write_ca(tmp_path / "other-ca.pem")
    for ca_file in (None, other_ca):
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await sdk_get(
                sdk_client(kms_instance_url, client_key, ca_file), "aigw!secret-abc", retry=False
            )
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await tea_get(tea_client(kms_instance_url, ak, sk, ca_file), "aigw!secret-abc")
    port = int(kms_instance_url.rsplit(":", 1)[1])
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context())
    assert kms_instance.recorded == []


async def test_the_certificate_names_the_instance_endpoint(
    kms_instance, kms_instance_url, instance_tls
):
    """With the CA, a handshake for ``<instance>.cryptoservice.kms.aliyuncs.com`` (as SNI)
    succeeds and one for another instance's host name fails."""
    port = int(kms_instance_url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=instance_tls.client_context(),
        server_hostname=kms_instance.instance_host,
    )
    peer = writer.get_extra_info("peercert")
    writer.close()
    await writer.wait_closed()
    assert ("DNS", kms_instance.instance_host) in peer["subjectAltName"]
    assert kms_instance.instance_host == f"{kms_instance.instance_id}.{INSTANCE_DOMAIN}"
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=instance_tls.client_context(),
            server_hostname=f"kst-hzzother.{INSTANCE_DOMAIN}",
        )


async def test_wrong_client_key_and_unknown_key_id_are_refused(
    kms_instance, kms_instance_url, instance_ca_file
):
    """Signing as a registered KeyId with another private key gives the SDK 401
    ``SignatureNotMatch``; an unregistered KeyId gives 404 ``Unauthorized`` (the instance
    API's documented codes); neither is retried."""
    from Tea.exceptions import TeaException

    registered = kms_instance.add_client_key(AIGW_ONLY)
    stranger = make_client_key_file()
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    forged = sdk_client(kms_instance_url, stranger, instance_ca_file, key_id=registered.key_id)
    with pytest.raises(TeaException) as info:
        await sdk_get(forged, "aigw!secret-abc")
    assert (info.value.code, info.value.data["httpCode"]) == ("SignatureNotMatch", 401)
    with pytest.raises(TeaException) as info:
        await sdk_get(sdk_client(kms_instance_url, stranger, instance_ca_file), "aigw!secret-abc")
    assert (info.value.code, info.value.data["httpCode"]) == ("Unauthorized", 404)
    assert kms_instance.rejections == ["SignatureNotMatch", "Unauthorized"]


async def test_not_found_is_the_protobuf_error_the_sdk_raises(
    kms_instance, kms_instance_url, instance_ca_file
):
    """A secret that does not exist comes back as protobuf Error 404
    ``Forbidden.ResourceNotFound``, which the SDK raises as its exception with that code and
    the request id, after one attempt; the same body read by the SDK's generated class says
    StatusCode 404."""
    from Tea.exceptions import TeaException

    client_key = kms_instance.add_client_key(READ_ALL)
    with pytest.raises(TeaException) as info:
        await sdk_get(sdk_client(kms_instance_url, client_key, instance_ca_file), "aigw!missing")
    assert (info.value.code, info.value.data["httpCode"]) == ("Forbidden.ResourceNotFound", 404)
    assert info.value.message == "The resource is not found."
    assert info.value.data["requestId"]
    assert len(kms_instance.recorded) == 1
    error = sdk_error(pb_encode([(1, 404), (2, "Forbidden.ResourceNotFound"), (4, "r")]))
    assert (error.StatusCode, error.ErrorCode, error.RequestId) == (
        404,
        "Forbidden.ResourceNotFound",
        "r",
    )


async def test_the_client_keys_policy_and_the_instance_key(
    kms_instance, kms_instance_url, instance_ca_file
):
    """A ClientKey whose policy covers only ``secret/aigw!*`` reads aigw's secret and is
    refused another product's with 403 ``Forbidden.NoPermission``; a RAM identity without
    ``kms:Decrypt`` on the instance's customer key is refused the aigw secret, naming the key."""
    from Tea.exceptions import TeaException

    client_key = kms_instance.add_client_key(AIGW_ONLY)
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    kms_instance.add_secret("bailian!secret-1", PLANTED, product="bailian")
    dkms = sdk_client(kms_instance_url, client_key, instance_ca_file)
    assert (await sdk_get(dkms, "aigw!secret-abc")).secret_data == PLANTED
    with pytest.raises(TeaException) as info:
        await sdk_get(dkms, "bailian!secret-1")
    assert (info.value.code, info.value.data["httpCode"]) == ("Forbidden.NoPermission", 403)
    no_decrypt = {
        "Statement": [{"Effect": "Allow", "Action": ["kms:GetSecretValue"], "Resource": ["*"]}]
    }
    ak, sk = kms_instance.add_access_key(no_decrypt)
    with pytest.raises(TeaException) as info:
        await tea_get(tea_client(kms_instance_url, ak, sk, instance_ca_file), "aigw!secret-abc")
    assert info.value.code == "Forbidden.NoPermission"
    assert kms_instance.instance_key_id in info.value.message


def test_instance_secrets_are_under_a_key_of_the_instance(kms_instance):
    """In instance mode a secret is encrypted under the instance's customer key unless
    another key of the instance is named; a key of no instance, or a default secret not
    named ``product!id``, is a set-up error."""
    second = kms_instance.add_key()
    kms_instance.add_secret("aigw!a", "x", product="aigw")
    kms_instance.add_secret("aigw!b", "x", product="aigw", key_id=second)
    assert kms_instance.secrets["aigw!a"].key_id == kms_instance.instance_key_id
    assert kms_instance.secrets["aigw!b"].key_id == second
    assert kms_instance.keys[second].instance_id == kms_instance.instance_id
    with pytest.raises(ValueError, match="not a key of instance"):
        kms_instance.add_secret("aigw!c", "x", product="aigw", key_id="key-elsewhere")
    with pytest.raises(ValueError, match="is named aigw!<id>"):
        kms_instance.add_secret("secret-abc", "x", product="aigw")
    with pytest.raises(ValueError, match="kst-"):
        KmsEmulator(instance_id="hzz-123")


async def test_dkms_date_outside_the_window_is_refused(
    kms_instance, kms_instance_url, instance_ca_file
):
    """With the instance's clock 16 minutes ahead of the SDK's Date the request is refused
    with 400 ``RequestTimeTooSkewed``; 14 minutes ahead it is served."""
    from Tea.exceptions import TeaException

    client_key = kms_instance.add_client_key(AIGW_ONLY)
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    dkms = sdk_client(kms_instance_url, client_key, instance_ca_file)
    kms_instance.clock = lambda: time.time() + 16 * 60
    with pytest.raises(TeaException) as info:
        await sdk_get(dkms, "aigw!secret-abc")
    assert (info.value.code, info.value.data["httpCode"]) == ("RequestTimeTooSkewed", 400)
    kms_instance.clock = lambda: time.time() + 14 * 60
    assert (await sdk_get(dkms, "aigw!secret-abc")).secret_data == PLANTED


async def test_throttling_is_one_instance_limit_and_the_sdk_retries_it(
    kms_instance, kms_instance_url, instance_ca_file
):
    """The instance's QPS is shared by both ways in; past it both are refused with
    ``Rejected.Throttling``, which the dkms SDK retries (4 attempts in all) while it retries
    neither an injected 500 nor a 404; an injected throttle once is retried and then served."""
    from Tea.exceptions import TeaException, UnretryableException

    client_key = kms_instance.add_client_key(READ_ALL)
    ak, sk = kms_instance.add_access_key(READ_ALL)
    kms_instance.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    dkms = sdk_client(kms_instance_url, client_key, instance_ca_file)
    tea = tea_client(kms_instance_url, ak, sk, instance_ca_file)
    kms_instance.faults.next.append("throttle")
    assert (await sdk_get(dkms, "aigw!secret-abc")).secret_data == PLANTED
    assert kms_instance.rejections == ["Rejected.Throttling"]
    kms_instance.faults.next.append("500")
    with pytest.raises(TeaException) as info:
        await sdk_get(dkms, "aigw!secret-abc")
    assert (info.value.code, info.value.data["httpCode"]) == ("InternalFailure", 500)
    frozen = time.time() + 5  # a new one-second window, the SDK's Date still in the 15 minutes
    kms_instance.clock = lambda: frozen
    kms_instance.qps = 2
    kms_instance.rejections.clear()
    assert (await sdk_get(dkms, "aigw!secret-abc")).secret_data == PLANTED
    assert (await tea_get(tea, "aigw!secret-abc")).body.secret_data == PLANTED
    with pytest.raises(TeaException) as info:
        await tea_get(tea, "aigw!secret-abc")
    assert info.value.code == "Rejected.Throttling"
    with pytest.raises(UnretryableException) as retried:
        await sdk_get(dkms, "aigw!secret-abc")
    assert (retried.value.code, retried.value.data["httpCode"]) == ("Rejected.Throttling", 429)
    assert kms_instance.rejections == ["Rejected.Throttling"] * 5


async def test_the_recorded_sdk_request_is_accepted_and_a_changed_one_refused(
    kms_instance, kms_instance_url, instance_tls
):
    """The request recorded from the SDK (tests/fixtures; its throwaway ClientKey's public
    key registered, the clock at its Date) is served byte for byte; its response parses with
    the SDK's class to the vector's fields; one signature byte changed is refused."""
    dkms_sdk.sdk()
    from openapi_util.protobuf import api_pb2

    vector = json.loads(VECTOR.read_text())
    public = load_pem_private_key(vector["test_key"]["private_key_pem"].encode(), None).public_key()
    kms_instance.register_client_key(vector["test_key"]["KeyId"], public, READ_ALL)
    kms_instance.add_secret("db-password", "hunter2")
    when = calendar.timegm(time.strptime(vector["headers"]["date"], RFC1123))
    kms_instance.clock = lambda: when
    headers = [(k, v) for k, v in vector["headers"].items() if k != "host"]
    body = bytes.fromhex(vector["body_hex"])
    async with tls_session(instance_tls) as session:
        status, answer = await replay(session, kms_instance_url, headers, body)
        assert status == 200
        parsed = api_pb2.GetSecretValueResponse()
        parsed.ParseFromString(answer)
        expected = vector["parsed_response"]
        for field in ("SecretName", "SecretType", "SecretData", "SecretDataType"):
            assert getattr(parsed, field) == expected[field], field
        assert list(parsed.VersionStages) == expected["VersionStages"]
        auth = vector["headers"]["authorization"]
        at = next(i for i in range(len(auth) // 2, len(auth)) if auth[i].isdigit())  # stays base64
        tampered = [(k, flip(v, at) if k == "authorization" else v) for k, v in headers]
        status, answer = await replay(session, kms_instance_url, tampered, body)
    assert (status, sdk_error(answer).ErrorCode) == (401, "SignatureNotMatch")


_text = st.text(max_size=40)


@settings(max_examples=150, deadline=None)
@given(name=_text, stage=_text, version_id=_text, fetch=st.booleans())
def test_emulator_reads_what_the_sdk_serializes(name, stage, version_id, fetch):
    """The emulator's protobuf decoding of a GetSecretValueRequest equals what the SDK's
    serializer wrote, for any strings."""
    dkms_sdk.sdk()
    from openapi_util.client import Client

    data = Client.get_serialized_get_secret_value_request(
        {
            "SecretName": name,
            "VersionStage": stage,
            "VersionId": version_id,
            "FetchExtendedConfig": fetch,
        }
    )
    fields = pb_decode(data)
    assert [pb_string(fields, n) for n in (1, 2, 3)] == [name, stage, version_id]
    assert bool(fields.get(4, [0])[-1]) is fetch


@settings(max_examples=150, deadline=None)
@given(values=st.lists(_text, min_size=4, max_size=4), stages=st.lists(_text, max_size=3))
def test_sdk_reads_what_the_emulator_encodes(values, stages):
    """The emulator's GetSecretValueResponse, read by the SDK's parser, gives back every
    field, repeated VersionStages included."""
    dkms_sdk.sdk()
    from openapi_util.client import Client

    name, data, version_id, request_id = values
    body = pb_encode([(1, name), (3, data), (5, stages), (6, version_id), (8, request_id)])
    parsed = Client.parse_get_secret_value_response(body)
    assert (parsed["SecretName"], parsed["SecretData"], parsed["VersionId"], parsed["RequestId"]) == (
        name, data, version_id, request_id)  # fmt: skip
    assert parsed["VersionStages"] == stages


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_emulator_decoding_of_any_bytes_is_a_value_or_a_value_error(data):
    """Arbitrary bytes decode to fields or raise ValueError (answered InvalidParameter),
    never another exception."""
    try:
        fields = pb_decode(data)
        strings = [
            pb_string(fields, n) for n, values in fields.items() if isinstance(values[-1], bytes)
        ]
    except ValueError:
        return
    assert all(isinstance(v, int | bytes) for values in fields.values() for v in values)
    assert all(isinstance(s, str) for s in strings)
