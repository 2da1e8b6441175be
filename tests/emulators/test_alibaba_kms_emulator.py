"""The Alibaba KMS emulator judged by Alibaba's own SDKs: what they sign is accepted, any
one-byte change to a signed part is refused, and the agent's signer equals the SDK's."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp
import pytest
import yarl
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_agent.credentials import Credentials
from kms_agent.signing import Request, canonical_query
from kms_agent.signing import alibaba as agent_signer
from tests.conftest import PLANTED

READ_ALL = {"Statement": [{"Effect": "Allow", "Action": ["kms:*"], "Resource": ["*"]}]}


def tea_client(kms_url: str, ak: str, sk: str, token: str | None = None):
    from alibabacloud_kms20160120.client import Client
    from alibabacloud_tea_openapi.models import Config

    cfg = Config(
        access_key_id=ak,
        access_key_secret=sk,
        security_token=token,
        endpoint=kms_url.removeprefix("http://"),
        protocol="http",
        region_id="cn-hangzhou",
    )
    return Client(cfg)


def tea_get(kms_url, ak, sk, name, token=None):
    from alibabacloud_kms20160120.models import GetSecretValueRequest

    return tea_client(kms_url, ak, sk, token).get_secret_value(
        GetSecretValueRequest(secret_name=name)
    )


async def test_tea_sdk_acs3_request_is_accepted(kms, kms_url):
    """A GetSecretValue signed by the Tea SDK (ACS3-HMAC-SHA256) is served, with a name
    that needs percent-encoding."""
    ak, sk = kms.add_access_key(READ_ALL)
    kms.add_secret("aigw!secret-abc", PLANTED, product="aigw")
    resp = await asyncio.to_thread(tea_get, kms_url, ak, sk, "aigw!secret-abc")
    assert resp.body.secret_data == PLANTED
    assert resp.body.version_stages.version_stage == ["ACSCurrent"]
    assert kms.recorded[-1][2]  # headers were recorded
    assert dict(kms.recorded[-1][2])["Authorization"].startswith("ACS3-HMAC-SHA256 ")


async def test_tea_sdk_with_sts_token_is_accepted_and_checked(kms, kms_url):
    """Temporary credentials: accepted with their token, refused with another token."""
    ident = kms._temporary(READ_ALL, "assumed-role/app", 3600)
    kms.add_secret("db", PLANTED)
    resp = await asyncio.to_thread(
        tea_get, kms_url, ident.access_key_id, ident.secret, "db", ident.security_token
    )
    assert resp.body.secret_data == PLANTED
    from Tea.exceptions import TeaException

    with pytest.raises(TeaException) as info:
        await asyncio.to_thread(
            tea_get, kms_url, ident.access_key_id, ident.secret, "db", "CAISwrong"
        )
    assert info.value.code == "InvalidSecurityToken.MismatchWithAccessKey"


async def replay(
    kms_url: str, method: str, path_qs: str, headers: list[tuple[str, str]], body: bytes
):
    send = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
    async with aiohttp.ClientSession(
        skip_auto_headers=["User-Agent", "Accept", "Accept-Encoding", "Content-Type"]
    ) as s:
        async with s.request(
            method, yarl.URL(kms_url + path_qs, encoded=True), headers=send, data=body
        ) as r:
            return r.status, await r.json(content_type=None)


def flip(text: str, at: int) -> str:
    ch = text[at]
    new = "0" if ch != "0" else "1"
    if not ch.isalnum():
        new = "A"
    return text[:at] + new + text[at + 1 :]


async def test_acs3_any_one_byte_change_is_refused(kms, kms_url):
    """Replaying the SDK's request with one byte changed in any signed part is refused;
    the unchanged replay is refused as a reused nonce."""
    ak, sk = kms.add_access_key(READ_ALL)
    kms.add_secret("aigw!secret-abc", PLANTED)
    await asyncio.to_thread(tea_get, kms_url, ak, sk, "aigw!secret-abc")
    method, path_qs, headers, body = kms.recorded[-1]
    status, answer = await replay(kms_url, method, path_qs, headers, body)
    assert (status, answer["Code"]) == (400, "SignatureNonceUsed")
    signed = dict(headers)["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    cases = []
    for name in signed:
        if name == "host":
            continue  # changing Host sends the request elsewhere; checked via the query below
        cases.append(
            (
                "header " + name,
                path_qs,
                [(k, flip(v, len(v) // 2) if k.lower() == name else v) for k, v in headers],
            )
        )
    q = path_qs.index("SecretName=") + len("SecretName=") + 1
    cases.append(("query value", path_qs[:q] + "x" + path_qs[q + 1 :], headers))
    cases.append(
        (
            "signature",
            path_qs,
            [(k, flip(v, len(v) - 3) if k == "Authorization" else v) for k, v in headers],
        )
    )
    for label, qs, hdrs in cases:
        status, answer = await replay(kms_url, method, qs, hdrs, body)
        assert status == 400, label
        assert answer["Code"] in ("SignatureDoesNotMatch", "IncompleteSignature"), (label, answer)
        if answer["Code"] == "SignatureDoesNotMatch":
            assert "server string to sign is:" in answer["Message"]
    assert len(cases) >= 8


def legacy_get(kms_url, ak, sk, name, token=None):
    from aliyunsdkcore.auth.credentials import StsTokenCredential
    from aliyunsdkcore.client import AcsClient
    from aliyunsdkkms.request.v20160120.GetSecretValueRequest import GetSecretValueRequest

    port = int(kms_url.rsplit(":", 1)[1])
    if token:
        client = AcsClient(
            region_id="cn-hangzhou", credential=StsTokenCredential(ak, sk, token), port=port
        )
    else:
        client = AcsClient(ak, sk, "cn-hangzhou", port=port)
    request = GetSecretValueRequest()
    request.set_SecretName(name)
    request.set_endpoint("127.0.0.1")
    request.set_protocol_type("http")
    return json.loads(client.do_action_with_exception(request))


async def test_legacy_sdk_rpc_v1_request_is_accepted_and_tampering_refused(kms, kms_url):
    """The legacy SDK's HMAC-SHA1 (signature version 1.0) request is served; a changed
    parameter or signature is refused."""
    ak, sk = kms.add_access_key(READ_ALL)
    kms.add_secret("aigw!secret-abc", PLANTED)
    answer = await asyncio.to_thread(legacy_get, kms_url, ak, sk, "aigw!secret-abc")
    assert answer["SecretData"] == PLANTED
    method, path_qs, headers, body = kms.recorded[-1]
    assert "Signature=" in path_qs + body.decode()
    tampered = path_qs.replace("SecretName=aigw", "SecretName=aigx")
    status, refused = await replay(kms_url, method, tampered, headers, body)
    assert (status, refused["Code"]) == (400, "SignatureDoesNotMatch")
    sig_at = path_qs.index("Signature=") + len("Signature=") + 2
    status, refused = await replay(
        kms_url,
        method,
        path_qs[:sig_at] + ("A" if path_qs[sig_at] != "A" else "B") + path_qs[sig_at + 1 :],
        headers,
        body,
    )
    assert (status, refused["Code"]) == (400, "SignatureDoesNotMatch")


async def test_legacy_sdk_with_sts_token(kms, kms_url):
    """The legacy SDK's SecurityToken parameter is checked against the temporary key."""
    ident = kms._temporary(READ_ALL, "assumed-role/app", 3600)
    kms.add_secret("db", PLANTED)
    answer = await asyncio.to_thread(
        legacy_get, kms_url, ident.access_key_id, ident.secret, "db", ident.security_token
    )
    assert answer["SecretData"] == PLANTED


async def test_time_window_and_unknown_key(kms, kms_url):
    """A request dated 16 minutes off, or from an unknown AccessKey, is refused."""
    from Tea.exceptions import TeaException

    ak, sk = kms.add_access_key(READ_ALL)
    kms.add_secret("db", PLANTED)
    real = kms.clock
    kms.clock = lambda: real() + 16 * 60
    with pytest.raises(TeaException) as info:
        await asyncio.to_thread(tea_get, kms_url, ak, sk, "db")
    assert info.value.code == "IllegalTimestamp"
    kms.clock = real
    with pytest.raises(TeaException) as info:
        await asyncio.to_thread(tea_get, kms_url, "LTAInotakey", sk, "db")
    assert info.value.code == "InvalidAccessKeyId.NotFound"


def sdk_authorization(method, query, headers, ak, sk) -> str:
    from alibabacloud_openapi_util.client import Client
    from Tea.request import TeaRequest

    request = TeaRequest()
    request.method, request.pathname, request.query, request.headers = (
        method,
        "/",
        dict(query),
        dict(headers),
    )
    authorization: str = Client.get_authorization(
        request, "ACS3-HMAC-SHA256", agent_signer.EMPTY_SHA256, ak, sk
    )
    return authorization


def test_agent_signer_matches_the_vector_and_the_sdk():
    """The agent's ACS3 signer reproduces PROTOCOLS.md's vector and the SDK's result."""
    query = {"SecretName": "aigw!secret abc*~", "VersionStage": "ACSCurrent"}
    headers = {
        "accept": "application/json",
        "host": "kms.cn-hangzhou.aliyuncs.com",
        "x-acs-action": "GetSecretValue",
        "x-acs-content-sha256": agent_signer.EMPTY_SHA256,
        "x-acs-date": "2023-10-26T10:22:32Z",
        "x-acs-security-token": "tok/+=",
        "x-acs-signature-nonce": "3156853299f313e23d1673dc12e1703d",
        "x-acs-version": "2016-01-20",
    }
    ours = agent_signer.authorization(Request("POST", "/", query, headers), "testid", "testsecret")
    assert ours.endswith(
        "Signature=89899c9e27fc02ecad1350660b44e2b81b0c6004806ec8d17108138585b61a36"
    )
    assert ours == sdk_authorization("POST", query, headers, "testid", "testsecret")


_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x24F), max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    name=_text.filter(bool),
    stage=st.sampled_from(["ACSCurrent", "ACSPrevious", "custom stage/ä"]),
    token=st.one_of(st.none(), _text.filter(bool)),
    nonce=st.text(alphabet="0123456789abcdef", min_size=8, max_size=32),
)
def test_agent_signer_equals_sdk_signer_for_any_input(name, stage, token, nonce):
    """For arbitrary names, stages and tokens the two signers agree byte for byte: the
    headers the agent's Signer sends carry the authorization the SDK computes for them."""
    query = {"SecretName": name, "VersionStage": stage}
    request = agent_signer.rpc("GetSecretValue", "2016-01-20", query).to(
        "kms.cn-hangzhou.aliyuncs.com"
    )
    request = replace(request, headers={**request.headers, "x-acs-signature-nonce": nonce})
    creds = Credentials("LTAIak", "sk/+=", security_token=(token.strip() or "t") if token else None)
    sent = agent_signer.Acs3().sign(request, creds, now=1795046400.0)
    assert sent["x-acs-date"] == "2026-11-19T00:00:00Z"
    assert sent["x-acs-signature-nonce"] == nonce
    ours = sent.pop("authorization")
    assert ours == sdk_authorization("POST", query, sent, "LTAIak", "sk/+=")


async def test_emulator_throttles_at_the_documented_quota(kms, kms_url):
    """Past 450 GetSecretValue calls in one second the emulator answers Rejected.Throttling."""
    from kms_agent.signing.alibaba import EMPTY_SHA256

    ak, sk = kms.add_access_key(READ_ALL)
    kms.add_secret("db", PLANTED)
    frozen = kms.clock()
    kms.clock = lambda: frozen
    host = kms_url.removeprefix("http://")
    codes = []
    async with aiohttp.ClientSession() as s:
        for i in range(455):
            headers = {
                "host": host,
                "x-acs-action": "GetSecretValue",
                "x-acs-version": "2016-01-20",
                "x-acs-date": time_iso(frozen),
                "x-acs-signature-nonce": f"n{i}",
                "x-acs-content-sha256": EMPTY_SHA256,
                "accept": "application/json",
            }
            query = {"SecretName": "db"}
            headers["Authorization"] = agent_signer.authorization(
                Request("POST", "/", query, headers), ak, sk
            )
            url = yarl.URL(f"{kms_url}/?{canonical_query(query)}", encoded=True)
            async with s.post(url, headers=headers, data=b"") as r:
                codes.append((await r.json()).get("Code", "ok"))
    assert codes[:450] == ["ok"] * 450
    assert codes[450:] == ["Rejected.Throttling"] * 5


def time_iso(epoch: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
