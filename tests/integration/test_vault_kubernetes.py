"""Vault Kubernetes auth (``auth = "kubernetes"``) against a real OpenBao dev server whose
kubernetes auth mount is configured to call a loopback kube-apiserver fake.

OpenBao's kubernetes auth checks a login's JWT by POSTing a TokenReview to
``kubernetes_host`` (``/apis/authentication.k8s.io/v1/tokenreviews``) with the JWT itself
as the bearer (``disable_local_ca_jwt`` and no ``token_reviewer_jwt``), and again on every
renewal; the fake answers in kube-apiserver's shape. Seen from OpenBao 2.7.2 here: the
request carries ``spec.token`` and ``spec.audiences`` (the JWT's ``aud``), ``Accept:
application/json``; a refused review makes the login a 403 ``permission denied``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.conftest import PLANTED, TOKEN, running_agent
from tests.integration.test_real_peers import bao_call

TOKENREVIEW = "/apis/authentication.k8s.io/v1/tokenreviews"
AUDIENCE = "https://kubernetes.default.svc.cluster.local"
#: The cluster's service-account signing key (the fake API server's, and kubelet's).
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str
    uid: str = field(default_factory=lambda: "11111111-2222-4333-8444-" + secrets.token_hex(6))


def mint(sa: ServiceAccount, lifetime: int = 3600) -> str:
    """A projected service-account token with the claims Kubernetes puts in one."""
    now = int(time.time())
    claims = {
        "iss": AUDIENCE,
        "sub": f"system:serviceaccount:{sa.namespace}:{sa.name}",
        "aud": [AUDIENCE],
        "exp": now + lifetime,
        "iat": now,
        "nbf": now,
        "jti": secrets.token_hex(8),
        "kubernetes.io": {
            "namespace": sa.namespace,
            "pod": {
                "name": f"{sa.name}-7d9f8-x2x4k",
                "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            },
            "serviceaccount": {"name": sa.name, "uid": sa.uid},
            "node": {"name": "node-1", "uid": "0f0e0d0c-0b0a-4909-8807-060504030201"},
        },
    }
    return jwt.encode(claims, SIGNING_KEY, algorithm="RS256")


class KubeApiServer:
    """kube-apiserver's TokenReview endpoint for the tokens it issued (and not revoked).

    The reviewer must itself present an accepted bearer token (else 401 ``Status``); the
    answer is 201 with the spec echoed and ``status.user`` naming the service account
    (``system:serviceaccount:NS:NAME``, its uid, groups), or ``status.error`` for a token
    it does not accept.
    """

    def __init__(self) -> None:
        self.issued: dict[str, ServiceAccount] = {}
        self.reviews: list[tuple[str | None, dict[str, Any]]] = []

    def issue(self, sa: ServiceAccount) -> str:
        token = mint(sa)
        self.issued[token] = sa
        return token

    def revoke(self, token: str) -> None:
        del self.issued[token]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(TOKENREVIEW, self.review)
        return app

    async def review(self, request: web.Request) -> web.Response:
        body = await request.json()
        authorization = request.headers.get("Authorization")
        self.reviews.append((authorization, body))
        bearer = (authorization or "").removeprefix("Bearer ")
        if bearer not in self.issued:
            status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
            return web.json_response(
                {**status, "message": "Unauthorized", "reason": "Unauthorized", "code": 401},
                status=401,
            )
        spec = body["spec"]
        sa = self.issued.get(spec["token"])
        if sa is None:
            verdict: dict[str, Any] = {
                "user": {},
                "error": "[invalid bearer token, service account token has been invalidated]",
            }
        else:
            verdict = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{sa.namespace}:{sa.name}",
                    "uid": sa.uid,
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{sa.namespace}",
                        "system:authenticated",
                    ],
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [f"{sa.name}-7d9f8-x2x4k"],
                        "authentication.kubernetes.io/pod-uid": [
                            "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
                        ],
                    },
                },
                "audiences": spec.get("audiences") or [AUDIENCE],
            }
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": verdict,
        }
        return web.json_response(answer, status=201)

    def tokens_reviewed(self) -> list[str]:
        return [body["spec"]["token"] for _, body in self.reviews]


def any_ca_pem() -> str:
    """A CA certificate for ``kubernetes_ca_cert`` (required; unused over plain http)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(SIGNING_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(SIGNING_KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Cluster:
    """One kubernetes auth mount of the shared dev server, its API server and the pod."""

    bao: str
    api: KubeApiServer
    mount: str
    prefix: str
    sa: ServiceAccount
    jwt_file: Path

    def source(self, extra: str = "") -> str:
        return f"""
[[sources]]
name = "vault"
provider = "vault"
address = "{self.bao}"
auth = "kubernetes"
auth_mount = "{self.mount}"
role = "api"
jwt_file = "{self.jwt_file}"
match = ["{self.prefix}/*"]
verify_answers = false
{extra}
"""

    def rotate(self) -> str:
        """kubelet's refresh of the projected token: a new one in the file."""
        token = self.api.issue(self.sa)
        self.jwt_file.write_text(token)
        return token


@pytest.fixture(name="cluster")
async def _cluster(bao, aiohttp_server, tmp_path):
    """A kubernetes auth mount of its own on the dev server, calling a fresh API server
    fake; role "api" bound to payments/api may read secret/<prefix>/*; the pod's token
    in a file. ``await cluster_role(ttl=..., max_ttl=...)`` sets the role's token TTLs."""
    api = KubeApiServer()
    server = await aiohttp_server(api.app(), host="127.0.0.1")
    tag = secrets.token_hex(4)
    mount, prefix = f"k8s-{tag}", f"k8s{tag}"
    await bao_call(bao, "POST", f"/v1/sys/auth/{mount}", {"type": "kubernetes"})
    await bao_call(
        bao,
        "POST",
        f"/v1/auth/{mount}/config",
        {
            "kubernetes_host": str(server.make_url("")).rstrip("/"),
            "kubernetes_ca_cert": any_ca_pem(),
            "disable_local_ca_jwt": True,
        },
    )
    policy = f'path "secret/data/{prefix}/*" {{ capabilities = ["read"] }}'
    await bao_call(bao, "PUT", f"/v1/sys/policies/acl/{mount}", {"policy": policy})
    sa = ServiceAccount("payments", "api")
    jwt_file = tmp_path / "token"
    cluster = Cluster(bao, api, mount, prefix, sa, jwt_file)
    cluster.rotate()
    await set_role(cluster)
    yield cluster
    with contextlib.suppress(AssertionError):
        await bao_call(bao, "DELETE", f"/v1/sys/auth/{mount}")


async def set_role(cluster: Cluster, ttl: str = "1h", max_ttl: str = "2h") -> None:
    await bao_call(
        cluster.bao,
        "POST",
        f"/v1/auth/{cluster.mount}/role/api",
        {
            "bound_service_account_names": ["api"],
            "bound_service_account_namespaces": ["payments"],
            "token_policies": [cluster.mount],
            "token_ttl": ttl,
            "token_max_ttl": max_ttl,
        },
    )


async def put_secret(cluster: Cluster, name: str, value: str) -> str:
    path = f"{cluster.prefix}/{name}"
    await bao_call(cluster.bao, "POST", f"/v1/secret/data/{path}", {"data": {"password": value}})
    return path


async def read(agent, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{agent.addresses[0]}{path}", headers={"X-KMS-Token": TOKEN}) as r,
    ):
        return r.status, await r.read()


# --------------------------------------------------------------------------- tests


async def test_the_agent_logs_in_with_its_service_account_token_and_reads(tmp_path, cluster):
    """The agent posts the JWT file's token to auth/<mount>/login with its role; OpenBao
    has the API server review that very token (with it as the bearer) and the Vault token
    it issues reads the secret."""
    path = await put_secret(cluster, "db", PLANTED)
    async with running_agent(tmp_path, cluster.source()) as agent:
        status, body = await read(agent, f"/secrets/{path}?field=password&format=raw")
        provider = agent.state.router.providers["vault"]
        assert (status, body) == (200, PLANTED.encode())
        assert provider.logins == 1
        assert provider.credentials.current.origin == "kubernetes"
    token = cluster.jwt_file.read_text()
    assert cluster.api.reviews
    authorization, review = cluster.api.reviews[0]
    assert authorization == f"Bearer {token}"
    assert review["spec"] == {"token": token, "audiences": [AUDIENCE]}


async def test_the_agent_logs_in_again_when_its_token_expires(tmp_path, cluster):
    """With 3 s Vault tokens (not renewable past that: OpenBao answers renew-self 500
    "past the max TTL" near the end), reads keep succeeding on the first attempt
    (max_attempts = 1: no retry hides a refused token) across an expiry: the agent logs
    in again, with the JWT, before the token runs out."""
    await set_role(cluster, ttl="3s", max_ttl="3s")
    path = await put_secret(cluster, "db", PLANTED)
    async with running_agent(tmp_path, cluster.source("max_attempts = 1")) as agent:
        provider = agent.state.router.providers["vault"]
        statuses = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 4.5  # one and a half token lifetimes
        while loop.time() < end:
            status, _ = await read(agent, f"/secrets/{path}?format=raw&refresh=true")
            statuses.append(status)
            await asyncio.sleep(0.1)  # pacing the client loop while the tokens age
        assert provider.logins >= 2
    assert set(statuses) == {200}
    assert len(cluster.api.reviews) >= 2  # each login (and renewal) was reviewed


async def test_a_revoked_token_is_replaced_by_a_login_with_the_rotated_jwt(tmp_path, cluster):
    """kubelet rotates the JWT and the old one stops being accepted; when the Vault token
    is revoked, the agent's next read logs in again with the file's new JWT and
    succeeds."""
    path = await put_secret(cluster, "db", PLANTED)
    async with running_agent(tmp_path, cluster.source()) as agent:
        provider = agent.state.router.providers["vault"]
        assert (await read(agent, f"/secrets/{path}?format=raw"))[0] == 200
        old = cluster.jwt_file.read_text()
        new = cluster.rotate()
        cluster.api.revoke(old)
        vault_token = provider.credentials.current.access_key_secret
        await bao_call(cluster.bao, "POST", "/v1/auth/token/revoke", {"token": vault_token})
        status, body = await read(agent, f"/secrets/{path}?field=password&format=raw&refresh=true")
        assert (status, body) == (200, PLANTED.encode())
        assert provider.logins == 2
        assert provider.credentials.current.access_key_secret != vault_token
    assert cluster.api.tokens_reviewed()[-1] == new


async def test_a_refused_login_is_bad_credentials_without_the_jwt(tmp_path, cluster):
    """A JWT the API server no longer accepts makes the login a 403; the read is a 502
    UpstreamBadCredentials saying the kubernetes login was refused, with a hint, and
    neither the JWT nor the value appears in the answer."""
    path = await put_secret(cluster, "db", PLANTED)
    token = cluster.jwt_file.read_text()
    cluster.api.revoke(token)
    async with running_agent(tmp_path, cluster.source()) as agent:
        status, body = await read(agent, f"/secrets/{path}")
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (502, "UpstreamBadCredentials")
    assert "Vault kubernetes login refused (HTTP 403: permission denied)" in error["message"]
    assert error.get("hint")
    assert token not in body.decode()
    assert PLANTED not in body.decode()


async def test_a_service_account_the_role_is_not_bound_to_is_refused(tmp_path, cluster):
    """A valid token of another service account (default/web) is refused by the role's
    bindings: the agent reports the refused login, and reads nothing."""
    path = await put_secret(cluster, "db", PLANTED)
    cluster.sa = ServiceAccount("default", "web")
    cluster.rotate()
    async with running_agent(tmp_path, cluster.source()) as agent:
        status, body = await read(agent, f"/secrets/{path}")
        assert agent.state.router.providers["vault"].logins == 0
    assert (status, json.loads(body)["error"]["code"]) == (502, "UpstreamBadCredentials")
    assert PLANTED not in body.decode()
