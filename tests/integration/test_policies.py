"""Least privilege per caller, through the running agent: named tokens, Kubernetes
service-account tokens and Unix-socket peers, each held to its policy before the cache."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import PLANTED, ScriptedProvider, running_agent
from tests.unit.test_k8s_identity import (
    ISSUER,
    RSA_A,
    RSA_B,
    forged,
    jwk_of,
    jwks,
    mint,
    sa_claims,
)

TOKEN_A = "alpha-" + "a" * 26
TOKEN_B = "bravo-" + "b" * 26

POLICIES = """
[policies.teams]
document = '''
{"Version": "2017-10-17", "Statement": [
  {"Sid": "Alpha", "Effect": "Allow", "Principal": ["token:alpha", "k8s:payments:api"],
   "Action": ["kms:GetSecretValue", "kms:ListSecrets"], "Resource": "secret/payments/**"},
  {"Sid": "Bravo", "Effect": "Allow", "Principal": ["token:bravo", "k8s:shop:*"],
   "Action": ["kms:GetSecretValue", "kms:ListSecrets"], "Resource": "secret/shop/**"},
  {"Sid": "Shared", "Effect": "Allow", "Principal": "*", "Action": "kms:GetSecretValue",
   "Resource": "secret/shared/*"},
  {"Sid": "NoRoot", "Effect": "Deny", "Principal": "*", "Action": "kms:*",
   "Resource": "secret/payments/root"}]}
'''
"""


@pytest.fixture(name="values")
def _values() -> ScriptedProvider:
    provider = ScriptedProvider()
    provider.values.update(
        {
            "payments/db": PLANTED + "-payments",
            "payments/root": PLANTED + "-root",
            "shop/db": PLANTED + "-shop",
            "shared/motd": "hello",
        }
    )
    return provider


def config(tmp_path, extra: str = "", policies: str = POLICIES) -> str:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alpha:{TOKEN_A}\nbravo:{TOKEN_B}\n")
    tokens.chmod(0o600)
    return f"""
[auth]
token_files = ["{tokens}"]
{extra}
{policies}
"""


async def get(agent, path: str, **headers: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{agent.addresses[0]}{path}", headers=headers) as resp,
    ):
        text = await resp.text()
        return resp.status, json.loads(text) if text else {}


async def test_each_named_token_reads_only_what_its_policy_grants(tmp_path, values, log_capture):
    """token:alpha reads payments/, token:bravo reads shop/; each other's is 403
    AccessDeniedByPolicy naming the principal and the action (never a value); an explicit
    Deny wins over the Allow; one access line per denial carries the principal."""
    env = {"KMS_TOKEN": ""}
    async with running_agent(tmp_path, config(tmp_path), env, sources=[(("*",), values)]) as agent:
        status, body = await get(agent, "/secrets/payments/db", **{"X-KMS-Token": TOKEN_A})
        assert (status, body["value"]) == (200, PLANTED + "-payments")
        status, body = await get(agent, "/secrets/shop/db", **{"X-KMS-Token": TOKEN_A})
        assert status == 403
        err = body["error"]
        assert err["code"] == "AccessDeniedByPolicy"
        assert "token:alpha" in err["message"] and "kms:GetSecretValue" in err["message"]
        assert PLANTED not in json.dumps(body)
        status, body = await get(agent, "/secrets/payments/root", **{"X-KMS-Token": TOKEN_A})
        assert status == 403
        assert "NoRoot" in body["error"]["message"]
        status, body = await get(agent, "/secrets/shared/motd", **{"X-KMS-Token": TOKEN_B})
        assert (status, body["value"]) == (200, "hello")
        assert values.calls["shop/db"] == 0  # decided before the cache: no upstream call
        denials = agent.state.metrics.policy_denials
        assert denials.labels("no_allow")._value.get() == 1
        assert denials.labels("explicit_deny")._value.get() == 1
    lines = [
        json.loads(line)
        for line in log_capture.getvalue().splitlines()
        if "AccessDeniedByPolicy" in line
    ]
    assert [line["principal"] for line in lines] == ["token:alpha", "token:alpha"]


async def test_a_value_cached_for_one_caller_reaches_another_only_if_allowed(tmp_path, values):
    """The cache is shared and the decision is per request: alpha's read fills the cache,
    bravo is refused from it; once a reloaded policy grants bravo, it gets the cached
    value (a hit, no second upstream call) without a restart or a dropped request."""
    path_policies = POLICIES
    text = config(tmp_path, policies=path_policies)
    async with running_agent(
        tmp_path, text, {"KMS_TOKEN": ""}, sources=[(("*",), values)], loader=True
    ) as agent:
        assert (await get(agent, "/secrets/payments/db", **{"X-KMS-Token": TOKEN_A}))[0] == 200
        assert (await get(agent, "/secrets/payments/db", **{"X-KMS-Token": TOKEN_B}))[0] == 403
        widened = POLICIES.replace(
            '"token:bravo", "k8s:shop:*"', '"token:bravo", "k8s:shop:*", "token:alpha"'
        ).replace(
            '"Resource": "secret/shop/**"', '"Resource": ["secret/shop/**", "secret/payments/db"]'
        )
        (tmp_path / "kms.toml").write_text(config(tmp_path, policies=widened))
        await agent.reload("test")
        status, body = await get(agent, "/secrets/payments/db", **{"X-KMS-Token": TOKEN_B})
        assert (status, body["value"]) == (200, PLANTED + "-payments")
        assert values.calls["payments/db"] == 1


async def test_listing_shows_only_names_the_caller_may_read(tmp_path, values):
    """GET /secrets?prefix= lists what the caller may read: bravo sees shop/ and not
    payments/ (nor shared/, which it may read but not list)."""
    async with running_agent(
        tmp_path, config(tmp_path), {"KMS_TOKEN": ""}, sources=[(("*",), values)]
    ) as agent:
        status, body = await get(agent, "/secrets?prefix=", **{"X-KMS-Token": TOKEN_B})
        assert status == 200
        assert [s["name"] for s in body["secrets"]] == ["shop/db"]
        status, body = await get(agent, "/secrets?prefix=", **{"X-KMS-Token": TOKEN_A})
        assert [s["name"] for s in body["secrets"]] == ["payments/db"]  # root: denied


async def test_without_policies_every_token_reads_everything(tmp_path, values):
    """No [policies]: behaviour is exactly as before — any live token reads any secret."""
    async with running_agent(
        tmp_path, config(tmp_path, policies=""), {"KMS_TOKEN": ""}, sources=[(("*",), values)]
    ) as agent:
        for token in (TOKEN_A, TOKEN_B):
            for name in ("payments/db", "shop/db", "payments/root"):
                assert (await get(agent, f"/secrets/{name}", **{"X-KMS-Token": token}))[0] == 200


# --------------------------------------------------------------------------- service accounts


def k8s_config(tmp_path, keys: bytes) -> str:
    path = tmp_path / "jwks.json"
    path.write_bytes(keys)
    return config(tmp_path, extra=f'[auth.kubernetes]\nissuer = "{ISSUER}"\njwks_file = "{path}"\n')


async def test_service_accounts_read_their_own_prefix_offline(tmp_path, values, log_capture):
    """A projected service-account token (RS256, claims as Kubernetes issues them) read
    as a bearer token or in the token header: payments/api reads payments/, shop's
    service account reads shop/, and each is 403 on the other's; the pod is in the log
    line and the token never is."""
    text = k8s_config(tmp_path, jwks(jwk_of(RSA_A, "rsa-a")))
    async with running_agent(
        tmp_path, text, {"KMS_TOKEN": ""}, sources=[(("*",), values)]
    ) as agent:
        now = time.time()
        payments = mint(sa_claims(now, ns="payments", sa="api")).decode()
        shop = mint(sa_claims(now, ns="shop", sa="web")).decode()
        bearer = {"Authorization": f"Bearer {payments}"}
        status, body = await get(agent, "/secrets/payments/db", **bearer)
        assert (status, body["value"]) == (200, PLANTED + "-payments")
        assert (await get(agent, "/secrets/shop/db", **bearer))[0] == 403
        assert (await get(agent, "/secrets/shop/db", **{"X-KMS-Token": shop}))[0] == 200
        status, body = await get(agent, "/secrets/payments/db", **{"X-KMS-Token": shop})
        assert status == 403
        assert "k8s:shop:web" in body["error"]["message"]
    logs = log_capture.getvalue()
    assert payments not in logs and shop not in logs
    assert '"pod": "api-7d9f8-x2x4k"' in logs


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-issuer",
        "alg-none",
        "hs256-public-key",
        "other-key",
    ],
)
async def test_bad_service_account_tokens_are_refused(tmp_path, values, case):
    """Each forgery or misfit token is 403 through the front door, never a read."""
    text = k8s_config(tmp_path, jwks(jwk_of(RSA_A, "rsa-a")))
    now = time.time()
    claims = sa_claims(now)
    public_pem = RSA_A.public_key().public_bytes(
        encoding=__import__(
            "cryptography.hazmat.primitives.serialization", fromlist=["x"]
        ).Encoding.PEM,
        format=__import__(
            "cryptography.hazmat.primitives.serialization", fromlist=["x"]
        ).PublicFormat.SubjectPublicKeyInfo,
    )
    token = {
        "expired": lambda: mint(
            {**claims, "exp": int(now) - 120, "iat": int(now) - 4000, "nbf": int(now) - 4000}
        ),
        "not-yet-valid": lambda: mint({**claims, "nbf": int(now) + 600, "iat": int(now) + 600}),
        "wrong-audience": lambda: mint({**claims, "aud": ["vault"]}),
        "wrong-issuer": lambda: mint({**claims, "iss": "https://evil.example"}),
        "alg-none": lambda: forged({"alg": "none", "kid": "rsa-a"}, claims, None),
        "hs256-public-key": lambda: forged(
            {"alg": "HS256", "kid": "rsa-a", "typ": "JWT"}, claims, public_pem
        ),
        "other-key": lambda: mint(claims, key=RSA_B, kid="rsa-a"),
    }[case]()
    async with running_agent(
        tmp_path, text, {"KMS_TOKEN": ""}, sources=[(("*",), values)]
    ) as agent:
        status, body = await get(
            agent, "/secrets/payments/db", Authorization=f"Bearer {token.decode()}"
        )
        assert status == 403, body
        assert values.calls["payments/db"] == 0


async def test_a_jwks_rotation_mid_run(tmp_path, values):
    """The cluster rotates its signing key: a token under the new key (unknown kid) is
    accepted after one JWKS re-read, and tokens under the removed key stop working."""
    text = k8s_config(tmp_path, jwks(jwk_of(RSA_A, "rsa-a")))
    async with running_agent(
        tmp_path, text, {"KMS_TOKEN": ""}, sources=[(("*",), values)]
    ) as agent:
        old = mint(sa_claims(time.time())).decode()
        assert (await get(agent, "/secrets/payments/db", Authorization=f"Bearer {old}"))[0] == 200
        (tmp_path / "jwks.json").write_bytes(jwks(jwk_of(RSA_B, "rsa-b")))
        new = mint(sa_claims(time.time()), key=RSA_B, kid="rsa-b").decode()
        status, body = await get(agent, "/secrets/payments/db", Authorization=f"Bearer {new}")
        assert (status, body.get("value")) == (200, PLANTED + "-payments")
        assert (await get(agent, "/secrets/payments/db", Authorization=f"Bearer {old}"))[0] == 403


# --------------------------------------------------------------------------- unix peers

PEER_SCRIPT = r"""
import json, os, socket, sys
path, uid, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if uid != os.getuid():
    os.setgid(uid)
    os.setgroups([])
    os.setuid(uid)
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(f"GET /secrets/{name}?format=raw HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode())
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b" ", 2)[1].decode())
"""


@pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to another uid needs root (CI runs as root)"
)
async def test_unix_peers_with_different_uids_get_different_answers(tmp_path, values):
    """Two processes on the agent's Unix socket, root and uid 65534 (nobody), no token:
    each is known by SO_PEERCRED and gets what its policy grants, the same secret
    answering 200 to one and 403 to the other."""
    sockdir = tempfile.mkdtemp(prefix="kms-peer-", dir="/tmp")
    os.chmod(sockdir, 0o755)  # noqa: S103 (the other uid must reach the socket)
    sock = os.path.join(sockdir, "agent.sock")
    policies = """
[policies.peers]
document = '''{"Statement": [
  {"Effect": "Allow", "Principal": "unix:uid:0", "Action": "kms:GetSecretValue", "Resource": "secret/payments/*"},
  {"Effect": "Allow", "Principal": "unix:uid:65534", "Action": "kms:GetSecretValue", "Resource": "secret/shop/*"}]}'''
"""
    text = config(tmp_path, policies=policies)
    text = f'[server]\nlisten = ["unix:{sock}"]\nsocket_mode = "0666"\n' + text
    async with running_agent(
        tmp_path,
        text,
        {"KMS_TOKEN": "", "KMS_AGENT_SERVER_LISTEN": f"unix:{sock}"},
        sources=[(("*",), values)],
    ):

        async def status(uid: int, name: str) -> str:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                PEER_SCRIPT,
                sock,
                str(uid),
                name,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            return out.decode().strip()

        assert await status(0, "payments/db") == "200"
        assert await status(65534, "payments/db") == "403"
        assert await status(65534, "shop/db") == "200"
        assert await status(0, "shop/db") == "403"


@pytest.mark.parametrize(
    ("principal", "action", "name", "code", "says"),
    [
        ("k8s:payments:api", "kms:GetSecretValue", "payments/db", 0, "Sid Alpha"),
        ("k8s:payments:api", "kms:GetSecretValue", "payments/root", 1, "denied by"),
        ("k8s:shop:web", "kms:GetSecretValue", "payments/db", 1, "no statement allows it"),
        ("token:bravo", "kms:ListSecrets", "shop/db", 0, "Sid Bravo"),
    ],
)
def test_policy_check_says_which_statement_decided(
    tmp_path, capsys, principal, action, name, code, says
):
    """`kms-agent policy check` answers allow/deny for operators writing policies, names
    the deciding statement, and exits 0 for allow and 1 for deny."""
    from kms_agent.cli import main

    path = tmp_path / "kms.toml"
    path.write_text(config(tmp_path))
    argv = ["--config", str(path), "policy", "check", "--principal", principal,
            "--action", action, name]  # fmt: skip
    assert main(argv, environ={}) == code
    out = capsys.readouterr().out
    assert out.startswith("allow" if code == 0 else "deny")
    assert says in out


async def test_a_watched_policy_file_reloads_without_dropping_a_request(tmp_path, values):
    """Policies in a policy file of their own: a change to it is picked up by the watcher
    (no signal, no restart) while a client reads in a loop; no request fails, and the
    changed grant holds from then on."""
    policy_file = tmp_path / "policies.toml"
    policy_file.write_text(POLICIES)
    text = f'policy_files = ["{policy_file}"]\n' + config(tmp_path, policies="")
    async with running_agent(
        tmp_path, text, {"KMS_TOKEN": ""}, sources=[(("*",), values)], loader=True
    ) as agent:
        failures: list[int] = []
        done = asyncio.Event()

        async def client() -> None:
            async with aiohttp.ClientSession() as session:
                while not done.is_set():
                    async with session.get(
                        f"http://{agent.addresses[0]}/secrets/payments/db",
                        headers={"X-KMS-Token": TOKEN_A},
                    ) as resp:
                        if resp.status != 200:
                            failures.append(resp.status)

        reader = asyncio.create_task(client())
        assert (await get(agent, "/secrets/shop/db", **{"X-KMS-Token": TOKEN_A}))[0] == 403
        reloads = agent.state.metrics.config_reloads
        async with agent.reloaded:  # a broken file is refused; the policies in force hold
            policy_file.write_text(POLICIES.replace('"Effect": "Deny"', '"Effect": "deny"'))
            await agent.reloaded.wait_for(lambda: reloads.labels("error")._value.get() >= 1)
        widened = POLICIES.replace(
            '"Resource": "secret/payments/**"',
            '"Resource": ["secret/payments/**", "secret/shop/db"]',
        )

        def shop_allowed() -> bool:
            policies = agent.state.config.policies
            allowed: bool = policies.decide(
                ("token:alpha",), "kms:GetSecretValue", "shop/db"
            ).allowed
            return allowed

        async with agent.reloaded:
            policy_file.write_text(widened)
            await agent.reloaded.wait_for(shop_allowed)
        assert (await get(agent, "/secrets/shop/db", **{"X-KMS-Token": TOKEN_A}))[0] == 200
        done.set()
        await reader
        assert failures == []


async def test_the_python_client_sends_a_projected_token_file(tmp_path, values):
    """An application reads with kms_agent_client and the kubelet's projected token file
    as its token_file: the agent knows it as its service account, and a secret outside
    its policy is a ClientError with the code AccessDeniedByPolicy."""
    from kms_agent_client import Client, ClientError

    text = k8s_config(tmp_path, jwks(jwk_of(RSA_A, "rsa-a")))
    token_file = tmp_path / "sa-token"
    token_file.write_bytes(mint(sa_claims(time.time(), ns="payments", sa="api")))
    async with running_agent(
        tmp_path, text, {"KMS_TOKEN": ""}, sources=[(("*",), values)]
    ) as agent:

        def read() -> tuple[str, str]:
            with Client(agent.addresses[0], token_file=token_file, environ={}) as client:
                first = client.get_text("payments/db")
                try:
                    client.get_text("shop/db")
                except ClientError as exc:
                    refused = exc.code
            return first, refused

        first, refused = await asyncio.to_thread(read)
        assert first == PLANTED + "-payments"
        assert refused == "AccessDeniedByPolicy"


def test_service_accounts_without_policies_are_refused_at_start(tmp_path):
    """[auth.kubernetes] with no [policies] would let every pod read everything (any pod
    can get a token for the audience): the config is refused, saying why and what to add."""
    from kms_agent.config import load
    from kms_agent.errors import ConfigError

    path = tmp_path / "kms.toml"
    path.write_text(f'[auth.kubernetes]\nissuer = "{ISSUER}"\njwks_file = "x"\n')
    with pytest.raises(ConfigError, match=r"need \[policies\]") as info:
        load(path, environ={})
    assert "k8s:payments:app" in (info.value.hint or "")


async def test_tokenreview_mode_asks_the_api_server_once_per_token(
    tmp_path, values, aiohttp_server
):
    """mode = "tokenreview": a new token waits for the API server's TokenReview (after the
    offline check), then reads what its policy grants; its second request is answered
    from the remembered review; a token the API server no longer accepts (its pod was
    deleted) is 403 although it verifies offline."""
    import certifi

    from tests.unit.test_k8s_tokenreview import FakeReviews

    reviews = FakeReviews()
    server = await aiohttp_server(reviews.app(), host="127.0.0.1")
    agent_token = tmp_path / "agent-token"
    agent_token.write_text("agent-own-token-0123456789\n")
    keys = tmp_path / "jwks.json"
    keys.write_bytes(jwks(jwk_of(RSA_A, "rsa-a")))
    extra = (
        f'[auth.kubernetes]\nissuer = "{ISSUER}"\njwks_file = "{keys}"\nmode = "tokenreview"\n'
        f'api_url = "http://127.0.0.1:{server.port}"\ntoken_file = "{agent_token}"\n'
        f'ca_file = "{certifi.where()}"\n'
    )
    live = mint(sa_claims(time.time(), ns="payments", sa="api")).decode()
    gone = mint(sa_claims(time.time(), ns="payments", sa="api", jti="deleted-pod")).decode()
    reviews.valid[live] = "payments:api"
    async with running_agent(
        tmp_path, config(tmp_path, extra=extra), {"KMS_TOKEN": ""}, sources=[(("*",), values)]
    ) as agent:
        bearer = {"Authorization": f"Bearer {live}"}
        status, body = await get(agent, "/secrets/payments/db", **bearer)
        assert (status, body["value"]) == (200, PLANTED + "-payments")
        assert (await get(agent, "/secrets/payments/db", **bearer))[0] == 200
        assert len(reviews.reviews) == 1
        assert (await get(agent, "/secrets/payments/db", Authorization=f"Bearer {gone}"))[0] == 403
        assert len(reviews.reviews) == 2
