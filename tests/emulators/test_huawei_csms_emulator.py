"""The CSMS emulator judged by Huawei's own SDK: what huaweicloudsdkcore signs is accepted,
any one-byte change to a signed part is refused, and the agent's signer equals the SDK's."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import yarl
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_agent.credentials import Credentials
from kms_agent.signing import Request
from kms_agent.signing import huawei as agent_signer
from tests.conftest import PLANTED


def sdk_client(url, ak, sk, project, token=None):
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcsms.v1 import CsmsClient

    creds = BasicCredentials(ak, sk, project)
    if token:
        creds = creds.with_security_token(token)
    return CsmsClient.new_builder().with_credentials(creds).with_endpoint(url).build()


def sdk_read(url, ak, sk, project, name, token=None, version="latest"):
    from huaweicloudsdkcsms.v1 import ShowSecretVersionRequest

    return sdk_client(url, ak, sk, project, token).show_secret_version(
        ShowSecretVersionRequest(secret_name=name, version_id=version)
    )


async def test_sdk_request_is_accepted(csms, csms_url):
    """ShowSecretVersion signed by huaweicloudsdkcore is served from the default key."""
    ak, sk = csms.add_identity(["*"])
    csms.add_secret("db-password", PLANTED)
    resp = await asyncio.to_thread(sdk_read, csms_url, ak, sk, csms.project_id, "db-password")
    assert resp.version.secret_string == PLANTED
    assert resp.version.version_metadata.version_stages == ["SYSCURRENT"]
    assert csms.keys[resp.version.version_metadata.kms_key_id].alias == "csms/default"


async def test_sdk_request_with_security_token(csms, csms_url):
    """Temporary AK/SK with a security token: accepted, and refused with another token."""
    ident = csms.add_temporary(["*"], 3600)
    csms.add_secret("db-password", PLANTED)
    resp = await asyncio.to_thread(
        sdk_read, csms_url, ident.ak, ident.sk, csms.project_id, "db-password", ident.security_token
    )
    assert resp.version.secret_string == PLANTED
    from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException

    with pytest.raises(ClientRequestException) as info:
        await asyncio.to_thread(
            sdk_read, csms_url, ident.ak, ident.sk, csms.project_id, "db-password", "gQwrong"
        )
    assert info.value.error_code == "APIGW.0301"


async def replay(url, method, path_qs, headers, body):
    send = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
    async with aiohttp.ClientSession(
        skip_auto_headers=["User-Agent", "Accept", "Accept-Encoding", "Content-Type"]
    ) as s:
        async with s.request(
            method, yarl.URL(url + path_qs, encoded=True), headers=send, data=body
        ) as r:
            return r.status, await r.json(content_type=None)


def flip(text: str) -> str:
    at = len(text) // 2
    return text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :]


async def test_any_one_byte_change_is_refused(csms, csms_url):
    """Replaying the SDK's request verbatim works (no nonce in APIG); one changed byte in any
    signed header, the path or the signature is refused with APIGW.0301."""
    ak, sk = csms.add_identity(["*"])
    csms.add_secret("db-password", PLANTED)
    await asyncio.to_thread(sdk_read, csms_url, ak, sk, csms.project_id, "db-password")
    method, path_qs, headers, body = csms.recorded[-1]
    status, answer = await replay(csms_url, method, path_qs, headers, body)
    assert status == 200
    assert answer["version"]["secret_string"] == PLANTED
    signed = dict(headers)["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    cases = [
        ("header " + n, path_qs, [(k, flip(v) if k.lower() == n else v) for k, v in headers])
        for n in signed
        if n != "host"
    ]
    cases.append(("path", path_qs.replace("db-password", "db-passwore"), headers))
    cases.append(
        ("signature", path_qs, [(k, flip(v) if k == "Authorization" else v) for k, v in headers])
    )
    for label, qs, hdrs in cases:
        status, answer = await replay(csms_url, method, qs, hdrs, body)
        assert (status, answer["error_code"]) == (401, "APIGW.0301"), label
    assert len(cases) >= 4


def sdk_signature(path, query, headers, ak, sk):
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.sdk_request import SdkRequest
    from huaweicloudsdkcore.signer.signer import Signer

    request = SdkRequest(
        method="GET",
        schema="https",
        host=headers["Host"],
        resource_path=path,
        query_params=list(query.items()),
        header_params=dict(headers),
        body="",
    )
    return Signer(BasicCredentials(ak, sk)).sign(request).header_params["Authorization"]


def test_agent_signer_matches_the_vector_and_the_sdk():
    """The agent's signer reproduces PROTOCOLS.md's vector, as does the SDK's."""
    headers = {
        "Host": "kms.cn-north-4.myhuaweicloud.com",
        "Content-Type": "application/json",
        "X-Sdk-Date": "20240101T000000Z",
        "X-Project-Id": "0123456789abcdef0123456789abcdef",
        "X-Security-Token": "sts-token",
    }
    path = "/v1/0123456789abcdef0123456789abcdef/secrets/my-secret/versions/latest"
    ours = agent_signer.authorization(
        Request("GET", path, {}, headers), "AKTESTAKTEST", "SKTESTSKTESTSKTEST"
    )
    assert ours.endswith(
        "Signature=6efd9d7883f86ae4abdc12e847cb275f56eff1407fb750271f8ab8d921e2d380"
    )
    assert ours == sdk_signature(path, {}, headers, "AKTESTAKTEST", "SKTESTSKTESTSKTEST")


@settings(max_examples=100, deadline=None)
@given(
    name=st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True),
    marker=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x24F), max_size=20),
    token=st.one_of(st.none(), st.text(alphabet="abcXYZ019+/=", min_size=1, max_size=40)),
)
def test_agent_signer_equals_sdk_signer_for_any_input(name, marker, token):
    """Arbitrary names, query values and tokens: the headers the agent's Signer sends
    carry the authorization the SDK computes for them."""
    headers = {"Content-Type": "application/json", "X-Project-Id": "p1"}
    path = f"/v1/p1/secrets/{name}/versions/latest"
    query = {"marker": marker} if marker else {}
    request = Request("GET", path, query, headers).to("127.0.0.1:8444")
    sent = agent_signer.SdkHmac().sign(
        request, Credentials("AK", "SK", security_token=token), now=1795046400.0
    )
    assert sent["X-Sdk-Date"] == "20261119T000000Z"
    assert sent.get("X-Security-Token") == token
    ours = sent.pop("Authorization")
    assert ours == sdk_signature(path, query, sent, "AK", "SK")


async def test_default_key_cannot_be_disabled_and_disabled_cmk_fails_to_decrypt(csms, csms_url):
    """csms/default refuses to be disabled; a secret under a disabled customer key answers
    CSMS.0401 through the SDK."""
    ak, sk = csms.add_identity(["*"])
    csms.add_secret("a", PLANTED)
    with pytest.raises(ValueError, match="cannot be disabled"):
        csms.set_key_state(csms.default_key().id, "disabled")
    cmk = csms.add_key("app/cmk")
    csms.add_secret("b", PLANTED, key=cmk)
    csms.set_key_state(cmk.id, "disabled")
    from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException

    with pytest.raises(ClientRequestException) as info:
        await asyncio.to_thread(sdk_read, csms_url, ak, sk, csms.project_id, "b")
    assert info.value.error_code == "CSMS.0401"
