"""Kubernetes projected service-account tokens, verified offline against the cluster's JWKS.

Keys are generated here, tokens minted here with the claims kube-apiserver issues, the
clock injected; the API server's JWKS endpoint is a loopback aiohttp app that counts its
fetches and records the bearer token it was sent.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hmac
import ipaddress
import json
import ssl
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kms_agent import k8s_identity
from kms_agent.errors import BadCredentials, ConfigError, Forbidden, Unauthorized, Unavailable
from kms_agent.k8s_identity import (
    CLOCK_LEEWAY,
    FILE_RECHECK_INTERVAL,
    JWKS_DEFAULT_MAX_AGE,
    JWKS_MAX_MAX_AGE,
    JWKS_MIN_MAX_AGE,
    JWKS_RETRY_INTERVAL,
    UNKNOWN_KID_REFETCH_INTERVAL,
    JwksSource,
    K8sIdentity,
    ServiceAccountVerifier,
    UnknownSigningKey,
    bearer_token,
    cache_max_age,
)
from tests.conftest import PLANTED, FakeClock

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "kms-agent"
START = 1_800_000_000.0

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_A = ec.generate_private_key(ec.SECP256R1())


def jwk_of(private_key, kid: str) -> dict[str, Any]:
    """The public JWK kube-apiserver would publish for ``private_key``."""
    public = private_key.public_key()
    if isinstance(private_key, rsa.RSAPrivateKey):
        entry = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        alg = "RS256"
    else:
        entry = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        alg = "ES256"
    return {**entry, "kid": kid, "use": "sig", "alg": alg}


def jwks(*entries: object) -> bytes:
    """A JWKS document of ``entries`` (not all need be keys, or even objects)."""
    return json.dumps({"keys": list(entries)}).encode()


def sa_claims(now: float, *, ns: str = "payments", sa: str = "api", **over) -> dict[str, Any]:
    """Claims exactly as kube-apiserver issues a pod-bound projected token."""
    claims = {
        "aud": [AUDIENCE],
        "exp": int(now) + 3600,
        "iat": int(now),
        "iss": ISSUER,
        "jti": "5b0e2d1c-7f7a-4bd4-9c1f-0d2a1f7f5c11",
        "kubernetes.io": {
            "namespace": ns,
            "node": {"name": "node-1.internal", "uid": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"},
            "pod": {"name": "api-7d9f8-x2x4k", "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"},
            "serviceaccount": {"name": sa, "uid": "11111111-2222-4333-8444-555555555555"},
        },
        "nbf": int(now),
        "sub": f"system:serviceaccount:{ns}:{sa}",
    }
    claims.update(over)
    return claims


def mint(claims: dict[str, Any], key=RSA_A, kid: str = "rsa-a", alg: str = "RS256") -> bytes:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid}).encode()


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> bytes:
    """A token assembled by hand, as an attacker would (HS256 with ``secret``, or no
    signature at all)."""
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = b"" if secret is None else b64(hmac.new(secret, signing_input, "sha256").digest())
    return signing_input + b"." + signature


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture(name="jwks_file")
def _jwks_file(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk_of(RSA_A, "rsa-a"), jwk_of(EC_A, "ec-a")))
    return path


@pytest.fixture(name="verifier")
async def _verifier(jwks_file, clock) -> ServiceAccountVerifier:
    verifier = ServiceAccountVerifier(
        ISSUER, (AUDIENCE,), JwksSource.from_file(jwks_file, clock=clock), clock=clock
    )
    await verifier.ensure_loaded()
    return verifier


class FakeApiServer:
    """``GET /openid/v1/jwks`` as kube-apiserver answers it, counting fetches."""

    def __init__(self) -> None:
        self.document = jwks(jwk_of(RSA_A, "rsa-a"))
        self.cache_control = "public, max-age=3600"
        self.status = 200
        self.fetches = 0
        self.authorizations: list[str | None] = []
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/openid/v1/jwks", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.authorizations.append(request.headers.get("Authorization"))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.json_response({"kind": "Status", "code": self.status}, status=self.status)
        return web.Response(
            body=self.document,
            content_type="application/jwk-set+json",
            headers={"Cache-Control": self.cache_control},
        )


@pytest.fixture(name="api")
def _api() -> FakeApiServer:
    return FakeApiServer()


@pytest.fixture(name="sa_token_file")
def _sa_token_file(tmp_path):
    path = tmp_path / "agent-token"
    path.write_text("agent-sa-token-" + PLANTED + "\n")
    return path


@pytest.fixture(name="url_source")
async def _url_source(aiohttp_server, api, sa_token_file, clock):
    server = await aiohttp_server(api.app(), host="127.0.0.1")
    source = JwksSource.from_url(
        str(server.make_url("/openid/v1/jwks")), token_file=sa_token_file, ca_file=None, clock=clock
    )
    yield source
    await source.close()


def refusal(verifier: ServiceAccountVerifier, token: bytes) -> Forbidden:
    with pytest.raises(Forbidden) as info:
        verifier.verify(token)
    return info.value


# --- accepted tokens ---------------------------------------------------------------------


def test_valid_rs256_token_names_the_service_account(verifier, clock):
    """An RS256 token as kube-apiserver issues it proves k8s:<ns>:<sa>, with the pod's name
    and uid and the node's name for the log line, and its exp."""
    claims = sa_claims(clock())
    identity = verifier.verify(mint(claims))
    assert identity == K8sIdentity(
        principal="k8s:payments:api",
        namespace="payments",
        service_account="api",
        pod="api-7d9f8-x2x4k",
        pod_uid="9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
        node="node-1.internal",
        expires_at=float(claims["exp"]),
    )


def test_valid_es256_token_names_the_service_account(verifier, clock):
    """An ES256 token (a cluster with an EC signing key) is accepted the same way."""
    token = mint(sa_claims(clock(), ns="batch", sa="nightly.report"), EC_A, "ec-a", "ES256")
    identity = verifier.verify(token)
    assert identity.principal == "k8s:batch:nightly.report"
    assert (identity.namespace, identity.service_account) == ("batch", "nightly.report")


def test_token_not_bound_to_a_pod_has_no_pod(verifier, clock):
    """`kubectl create token` issues tokens without pod or node: still the principal, with
    pod, pod uid and node None."""
    claims = sa_claims(clock())
    claims["kubernetes.io"] = {
        "namespace": "payments",
        "serviceaccount": {"name": "api", "uid": "11111111-2222-4333-8444-555555555555"},
    }
    identity = verifier.verify(mint(claims))
    assert identity.principal == "k8s:payments:api"
    assert (identity.pod, identity.pod_uid, identity.node) == (None, None, None)


# --- refused tokens ----------------------------------------------------------------------


def test_expired_token_is_refused_past_the_leeway(verifier, clock):
    """A token whose exp lies more than CLOCK_LEEWAY in the past is refused; one within the
    leeway is still accepted (clock skew)."""
    now = clock()
    within = mint(sa_claims(now - 7200, exp=int(now - CLOCK_LEEWAY + 2)))
    assert verifier.verify(within).principal == "k8s:payments:api"
    exc = refusal(verifier, mint(sa_claims(now - 7200, exp=int(now - CLOCK_LEEWAY - 1))))
    assert "expired" in exc.message
    assert "k8s:payments:api" in exc.message


def test_not_yet_valid_token_is_refused(verifier, clock):
    """nbf or iat more than CLOCK_LEEWAY in the future is refused; within it, accepted."""
    now = clock()
    late = int(now + CLOCK_LEEWAY + 5)
    for claims in (sa_claims(now, nbf=late), sa_claims(now, iat=late)):
        exc = refusal(verifier, mint(claims))
        assert "not valid yet" in exc.message
    assert verifier.verify(mint(sa_claims(now, nbf=int(now + CLOCK_LEEWAY - 2))))


def test_wrong_audience_is_refused(verifier, clock):
    """A token for another audience (the API server's own, say) is refused."""
    exc = refusal(verifier, mint(sa_claims(clock(), aud=["https://kubernetes.default.svc"])))
    assert "audience" in exc.message


def test_wrong_issuer_is_refused(verifier, clock):
    """A token from another issuer, signed by a key we hold, is still refused."""
    exc = refusal(verifier, mint(sa_claims(clock(), iss="https://oidc.other-cluster.example")))
    assert f"not issued by {ISSUER}" in exc.message


def test_alg_none_is_refused(verifier, clock):
    """An unsigned token (alg none) naming a known kid is refused before any key is used."""
    token = forged({"alg": "none", "typ": "JWT", "kid": "rsa-a"}, sa_claims(clock()), None)
    exc = refusal(verifier, token)
    assert "algorithm" in exc.message
    assert jwt.decode(token, options={"verify_signature": False})["sub"]  # a well-formed JWT


async def test_hs256_signed_with_the_rsa_public_key_is_refused(verifier, clock, tmp_path):
    """The key-confusion attack: HS256 with the RSA public key (PEM, and the JWK's n) as
    the HMAC secret, naming the RSA key's kid, is refused; so is HS256 naming an `oct` key
    that a JWKS carries."""
    pem = RSA_A.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = sa_claims(clock())
    for secret in (pem, jwk_of(RSA_A, "rsa-a")["n"].encode()):
        exc = refusal(verifier, forged({"alg": "HS256", "kid": "rsa-a"}, claims, secret))
        assert "algorithm" in exc.message
    octet = {"kty": "oct", "kid": "hmac", "k": b64(b"s" * 32).decode()}
    path = tmp_path / "with-oct.json"
    path.write_bytes(jwks(jwk_of(RSA_A, "rsa-a"), octet))
    with_oct = ServiceAccountVerifier(
        ISSUER, (AUDIENCE,), JwksSource.from_file(path, clock=clock), clock=clock
    )
    await with_oct.ensure_loaded()
    loaded = with_oct.jwks.current()
    assert loaded is not None
    assert sorted(loaded.keys) == ["rsa-a"]
    refusal(with_oct, forged({"alg": "HS256", "kid": "hmac"}, claims, b"s" * 32))


def test_algorithm_must_match_the_key(verifier, clock):
    """An ES256 token naming the RSA key's kid is refused (a key serves one algorithm)."""
    exc = refusal(verifier, mint(sa_claims(clock()), EC_A, "rsa-a", "ES256"))
    assert "does not match its key" in exc.message


def test_bad_signature_is_refused(verifier, clock):
    """A token signed by another RSA key under a known kid is refused."""
    exc = refusal(verifier, mint(sa_claims(clock()), RSA_B, "rsa-a"))
    assert "signature" in exc.message


def test_subject_and_kubernetes_claim_must_agree(verifier, clock):
    """sub naming one namespace (or account) and kubernetes.io another is refused; a subject
    that is not a service account is refused."""
    now = clock()
    other_ns = sa_claims(now)
    other_ns["kubernetes.io"] = {**other_ns["kubernetes.io"], "namespace": "kube-system"}
    other_sa = sa_claims(now)
    other_sa["kubernetes.io"] = {
        **other_sa["kubernetes.io"],
        "serviceaccount": {"name": "admin", "uid": "1"},
    }
    for claims in (other_ns, other_sa):
        assert "disagree" in refusal(verifier, mint(claims)).message
    for sub in (
        "system:node:node-1",
        "system:serviceaccount:payments",
        "system:serviceaccount:a:b:c",
        "system:serviceaccount:Payments:api",
    ):
        assert "subject" in refusal(verifier, mint(sa_claims(now, sub=sub))).message


def test_malformed_pod_or_node_is_refused(verifier, clock):
    """Pod and node names go into the log line: a name that is not a DNS subdomain (a
    newline, upper case, a non-string) or a pod claim that is not an object is refused."""
    for pod in (
        {"name": "api\nlevel=admin", "uid": "1"},
        {"name": "API", "uid": "1"},
        {"name": 7, "uid": "1"},
        {"name": "api", "uid": "not a uid"},
        "api",
    ):
        claims = sa_claims(clock())
        claims["kubernetes.io"] = {**claims["kubernetes.io"], "pod": pod}
        assert "malformed" in refusal(verifier, mint(claims)).message
    claims = sa_claims(clock())
    claims["kubernetes.io"] = {**claims["kubernetes.io"], "node": {"name": "a b"}}
    assert "malformed" in refusal(verifier, mint(claims)).message


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf", "iss", "aud", "sub", "kubernetes.io"])
def test_required_claims(verifier, clock, claim):
    """A token lacking any claim kube-apiserver always sets is refused, naming the claim."""
    claims = sa_claims(clock())
    del claims[claim]
    assert f"lacks the {claim} claim" in refusal(verifier, mint(claims)).message


def test_times_must_be_numbers(verifier, clock):
    """exp as a string, a boolean or an infinite number (JSON's Infinity, which Python's
    json reads) is refused, as is a string nbf."""
    now = clock()
    for exp in ("9999999999", True, float("inf")):
        assert (
            "exp claim is not a number" in refusal(verifier, mint(sa_claims(now, exp=exp))).message
        )
    assert "nbf claim is not a number" in refusal(verifier, mint(sa_claims(now, nbf="0"))).message


def test_malformed_and_missing_tokens(verifier, clock):
    """No token is Unauthorized; garbage, an overlong token and a token without kid are
    Forbidden with a one-line message."""
    with pytest.raises(Unauthorized):
        verifier.verify(b"")
    for garbage in (b"not-a-jwt", b"a.b.c", b"\xff\xfe.\x00.x", b"eyJ" * 6000):
        exc = refusal(verifier, garbage)
        assert "\n" not in exc.message
    no_kid = jwt.encode(sa_claims(clock()), RSA_A, algorithm="RS256").encode()
    assert "kid" in refusal(verifier, no_kid).message


def test_unsafe_algorithms_cannot_be_configured(jwks_file, clock):
    """none and HS* never enter the allow-list: the constructor says which to choose."""
    source = JwksSource.from_file(jwks_file, clock=clock)
    for algorithms in (("none",), ("RS256", "HS256"), ()):
        with pytest.raises(ConfigError, match="choose from"):
            ServiceAccountVerifier(ISSUER, (AUDIENCE,), source, algorithms=algorithms)
    with pytest.raises(ConfigError):
        ServiceAccountVerifier("", (AUDIENCE,), source)
    with pytest.raises(ConfigError):
        ServiceAccountVerifier(ISSUER, (), source)


async def test_only_the_allowed_algorithms_verify(jwks_file, clock):
    """With algorithms=("RS256",) an ES256 token from a published EC key is refused."""
    source = JwksSource.from_file(jwks_file, clock=clock)
    await source.ensure_fresh()
    rsa_only = ServiceAccountVerifier(ISSUER, (AUDIENCE,), source, ("RS256",), clock)
    exc = refusal(rsa_only, mint(sa_claims(clock()), EC_A, "ec-a", "ES256"))
    assert "not one of RS256" in exc.message


# --- secrets stay secret -----------------------------------------------------------------


async def test_token_never_in_a_message_or_repr(verifier, clock, log_capture):
    """A token carrying a planted marker, refused for every reason, never shows in an
    error's message, hint, str or repr, nor in PyJWT's chained text, nor in a log line; the
    identity, the verifier and the key set reprs hold no token either."""
    now = clock()
    base = sa_claims(now, planted=PLANTED)
    other_ns = dict(base)
    other_ns["kubernetes.io"] = {**base["kubernetes.io"], "namespace": "x"}
    bad = [
        mint({**base, "exp": int(now - 999)}),
        mint({**base, "nbf": int(now + 999)}),
        mint({**base, "aud": ["other"]}),
        mint({**base, "iss": "https://evil.example"}),
        mint(base, RSA_B),
        mint(base, RSA_A, "gone"),
        mint(other_ns),
        mint({**base, "exp": PLANTED}),
        forged({"alg": "none", "kid": "rsa-a"}, base, None),
        forged({"alg": "HS256", "kid": "rsa-a"}, base, b"k"),
        b"x." + b64(PLANTED.encode()) + b".y",
    ]
    for token in bad:
        with pytest.raises(Forbidden) as info:
            await verifier.verify_async(token)
        exc = info.value
        text = " ".join((str(exc), repr(exc), exc.message, exc.hint or ""))
        for secret in (token.decode(), PLANTED, token.decode().split(".")[1]):
            assert secret not in text
        assert exc.__cause__ is None
        assert exc.__context__ is None or exc.__suppress_context__
    good = mint(base)
    identity = verifier.verify(good)
    for shown in (
        repr(identity),
        str(identity),
        repr(verifier),
        repr(verifier.jwks),
        repr(verifier.jwks.current()),
        log_capture.getvalue(),
    ):
        assert good.decode() not in shown and PLANTED not in shown


# --- the verified-token cache ------------------------------------------------------------


@pytest.fixture(name="decode_calls")
def _decode_calls(monkeypatch):
    calls = []
    real = jwt.decode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_second_verify_is_a_cache_hit(verifier, clock, decode_calls):
    """A token verified once is answered from the cache: PyJWT is not called again, until
    the token expires, when it is refused."""
    claims = sa_claims(clock(), exp=int(clock() + 600))
    token = mint(claims)
    first = verifier.verify(token)
    assert len(decode_calls) == 1
    clock.advance(599)
    assert verifier.verify(token) is first
    assert len(decode_calls) == 1
    clock.advance(1 + CLOCK_LEEWAY)
    assert "expired" in refusal(verifier, token).message
    assert verifier.cached == 0


def test_refused_tokens_are_not_cached(verifier, clock, decode_calls):
    """A refused token is checked again each time (and never becomes accepted)."""
    token = mint(sa_claims(clock(), aud=["other"]))
    for _ in range(3):
        refusal(verifier, token)
    assert len(decode_calls) == 3
    assert verifier.cached == 0


async def test_cache_is_bounded_evicting_expired_then_oldest(jwks_file, clock, decode_calls):
    """The cache never holds more than its bound; when full, expired entries go first, then
    the oldest, and the survivors are still answered without PyJWT."""
    source = JwksSource.from_file(jwks_file, clock=clock)
    await source.ensure_fresh()
    verifier = ServiceAccountVerifier(ISSUER, (AUDIENCE,), source, clock=clock, cache_entries=10)
    now = clock()
    short = [mint(sa_claims(now, sa=f"short-{i}", exp=int(now + 60))) for i in range(5)]
    long = [mint(sa_claims(now, sa=f"long-{i}", exp=int(now + 3600))) for i in range(5)]
    for token in short + long:
        verifier.verify(token)
    assert verifier.cached == 10
    clock.advance(60 + CLOCK_LEEWAY + 1)
    verifier.verify(mint(sa_claims(clock(), sa="new-0")))
    assert verifier.cached == 6  # the five expired ones went, nothing live
    calls = len(decode_calls)
    for token in long:
        verifier.verify(token)
    assert len(decode_calls) == calls
    more = [mint(sa_claims(clock(), sa=f"more-{i}")) for i in range(5)]
    for token in more:
        verifier.verify(token)
        assert verifier.cached <= 10
    calls = len(decode_calls)
    verifier.verify(more[-1])
    assert len(decode_calls) == calls  # the newest survived
    verifier.verify(long[0])
    assert len(decode_calls) == calls + 1  # the oldest was evicted


# --- JWKS rotation -----------------------------------------------------------------------


async def test_file_rotation_drops_cached_verifications(verifier, jwks_file, clock, decode_calls):
    """The JWKS file rotated to a new key: once the file is re-checked (within
    FILE_RECHECK_INTERVAL), tokens of the retired key are refused even though they were
    cached, and tokens of the new key are accepted."""
    old = mint(sa_claims(clock()))
    verifier.verify(old)
    jwks_file.write_bytes(jwks(jwk_of(RSA_B, "rsa-b"), jwk_of(EC_A, "ec-a")))
    verifier.verify(old)  # not re-checked yet: still the cached answer
    assert len(decode_calls) == 1
    clock.advance(FILE_RECHECK_INTERVAL)
    with pytest.raises(UnknownSigningKey):
        verifier.verify(old)
    clock.advance(UNKNOWN_KID_REFETCH_INTERVAL)
    with pytest.raises(Forbidden, match="not in the cluster's JWKS"):
        await verifier.verify_async(old)
    new = mint(sa_claims(clock()), RSA_B, "rsa-b")
    assert verifier.verify(new).principal == "k8s:payments:api"


def test_key_replaced_under_the_same_kid(verifier, jwks_file, clock):
    """A kid re-used for a different key: verifications made with the old key are dropped
    and its tokens refused; the new key's tokens are accepted."""
    old = mint(sa_claims(clock()))
    verifier.verify(old)
    jwks_file.write_bytes(jwks(jwk_of(RSA_B, "rsa-a")))
    clock.advance(FILE_RECHECK_INTERVAL)
    assert "signature" in refusal(verifier, old).message
    assert verifier.verify(mint(sa_claims(clock()), RSA_B, "rsa-a"))


def test_broken_file_keeps_the_old_keys(verifier, jwks_file, clock, log_capture):
    """A JWKS file rewritten with garbage is logged once and the keys in use stay."""
    token = mint(sa_claims(clock()))
    mark = len(log_capture.getvalue())
    jwks_file.write_text("{not json")
    for _ in range(3):
        clock.advance(FILE_RECHECK_INTERVAL)
        assert verifier.verify(token).principal == "k8s:payments:api"
    assert log_capture.getvalue()[mark:].count("jwks_load_failed") == 1


async def test_missing_file_is_a_config_error(tmp_path, clock):
    """A JWKS file that does not exist fails the first load with a ConfigError naming it."""
    source = JwksSource.from_file(tmp_path / "absent.json", clock=clock)
    with pytest.raises(ConfigError, match=r"absent\.json does not exist"):
        await source.ensure_fresh()


async def test_api_server_rotation_via_unknown_kid(url_source, api, clock, decode_calls):
    """The API server rotates: a token with the new kid triggers one refetch, which brings
    the new key set; tokens of the retired key, although cached, are then refused."""
    verifier = ServiceAccountVerifier(ISSUER, (AUDIENCE,), url_source, clock=clock)
    await verifier.ensure_loaded()
    old = mint(sa_claims(clock()))
    verifier.verify(old)
    api.document = jwks(jwk_of(RSA_B, "rsa-b"))
    clock.advance(UNKNOWN_KID_REFETCH_INTERVAL)
    new = mint(sa_claims(clock()), RSA_B, "rsa-b")
    assert (await verifier.verify_async(new)).principal == "k8s:payments:api"
    assert api.fetches == 2
    with pytest.raises(UnknownSigningKey):
        verifier.verify(old)
    assert verifier.cached == 1


# --- unknown kid: rate-limited refetch ---------------------------------------------------


async def test_unknown_kid_refetches_at_most_once_per_interval(url_source, api, clock):
    """A token with an unknown kid causes one refetch and is then refused; a second such
    token within UNKNOWN_KID_REFETCH_INTERVAL causes no fetch; after the interval, one
    more. The synchronous verify never fetches."""
    verifier = ServiceAccountVerifier(ISSUER, (AUDIENCE,), url_source, clock=clock)
    await verifier.ensure_loaded()
    assert api.fetches == 1
    stranger = mint(sa_claims(clock()), RSA_B, "stranger")
    for _ in range(3):
        with pytest.raises(UnknownSigningKey):
            verifier.verify(stranger)
    assert api.fetches == 1
    clock.advance(UNKNOWN_KID_REFETCH_INTERVAL)
    with pytest.raises(Forbidden, match="not in the cluster's JWKS"):
        await verifier.verify_async(stranger)
    assert api.fetches == 2
    clock.advance(UNKNOWN_KID_REFETCH_INTERVAL - 1)
    other = mint(sa_claims(clock()), RSA_B, "stranger-2")
    for token in (stranger, other):
        with pytest.raises(Forbidden):
            await verifier.verify_async(token)
    assert api.fetches == 2
    assert url_source.refetches_suppressed == 2
    clock.advance(1)
    with pytest.raises(Forbidden):
        await verifier.verify_async(other)
    assert api.fetches == 3


async def test_concurrent_unknown_kids_share_one_fetch(url_source, api, clock):
    """Callers with unknown kids at once cause one fetch between them; those arriving while
    it runs wait for it rather than being turned away by the rate limit, so every token of
    the newly published key is accepted and every stranger refused."""
    verifier = ServiceAccountVerifier(ISSUER, (AUDIENCE,), url_source, clock=clock)
    await verifier.ensure_loaded()
    api.document = jwks(jwk_of(RSA_A, "rsa-a"), jwk_of(RSA_B, "rsa-b"))
    clock.advance(UNKNOWN_KID_REFETCH_INTERVAL)
    api.gate = asyncio.Event()
    api.arrived.clear()
    first = asyncio.ensure_future(verifier.verify_async(mint(sa_claims(clock()), RSA_B, "rsa-b")))
    await api.arrived.wait()  # the fetch has started and is held at the server
    new = [mint(sa_claims(clock(), sa=f"app-{i}"), RSA_B, "rsa-b") for i in range(30)]
    strangers = [mint(sa_claims(clock()), RSA_B, f"kid-{i}") for i in range(20)]
    tasks = [asyncio.ensure_future(verifier.verify_async(t)) for t in new + strangers]
    api.gate.set()  # the 50 tasks take their first step before the held fetch resumes
    results = await asyncio.gather(first, *tasks, return_exceptions=True)
    accepted = [r.principal for r in results if isinstance(r, K8sIdentity)]
    assert accepted == ["k8s:payments:api"] + [f"k8s:payments:app-{i}" for i in range(30)]
    assert all(isinstance(r, UnknownSigningKey) for r in results[31:])
    assert api.fetches == 2


async def test_no_jwks_yet_loads_on_first_token_then_503(url_source, api, clock):
    """Before any JWKS is loaded, the first token loads it (and is verified); with the API
    server down, callers get 503 and the retries are rate-limited too."""
    verifier = ServiceAccountVerifier(ISSUER, (AUDIENCE,), url_source, clock=clock)
    token = mint(sa_claims(clock()))
    with pytest.raises(UnknownSigningKey, match="not loaded"):
        verifier.verify(token)
    assert (await verifier.verify_async(token)).principal == "k8s:payments:api"
    down = ServiceAccountVerifier(
        ISSUER,
        (AUDIENCE,),
        JwksSource.from_url(url_source.origin, token_file=None, ca_file=None, clock=clock),
        clock=clock,
    )
    api.status = 503
    fetches = api.fetches
    for _ in range(5):
        with pytest.raises(Unavailable):
            await down.verify_async(token)
    assert api.fetches == fetches + 1
    await down.jwks.close()


# --- the API server's JWKS endpoint ------------------------------------------------------


async def test_fetch_sends_the_agents_bearer_token_reread_each_time(url_source, api, sa_token_file):
    """Each fetch carries the agent's own service-account token, re-read from its file (the
    kubelet rotates it)."""
    await url_source.refresh()
    sa_token_file.write_text("rotated-agent-token\n")
    await url_source.refresh()
    assert api.authorizations == [f"Bearer agent-sa-token-{PLANTED}", "Bearer rotated-agent-token"]


async def test_max_age_is_respected(url_source, api, clock):
    """ensure_fresh() fetches again only once Cache-Control max-age has passed."""
    api.cache_control = "public, max-age=120"
    await url_source.ensure_fresh()
    clock.advance(119)
    await url_source.ensure_fresh()
    assert api.fetches == 1
    clock.advance(1)
    await url_source.ensure_fresh()
    assert api.fetches == 2


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("public, max-age=120", 120),
        ("max-age=1", JWKS_MIN_MAX_AGE),
        ("max-age=99999999", JWKS_MAX_MAX_AGE),
        ("no-store", JWKS_MIN_MAX_AGE),
        ('private, MAX-AGE="90"', 90),
        ("public", JWKS_DEFAULT_MAX_AGE),
        ("max-age=abc", JWKS_DEFAULT_MAX_AGE),
    ],
)
async def test_max_age_floor_and_cap(url_source, api, clock, header, expected):
    """max-age is clamped to [JWKS_MIN_MAX_AGE, JWKS_MAX_MAX_AGE], no-store/no-cache mean
    the floor, and no usable max-age the default."""
    api.cache_control = header
    keys = await url_source.refresh()
    assert keys.stale_at - clock() == expected
    assert cache_max_age([header]) == expected


async def test_refused_and_broken_answers_keep_the_old_keys(url_source, api, clock):
    """401 is BadCredentials, 500 and a non-JWKS body Unavailable; the keys in use stay and
    no message carries the agent's token."""
    first = await url_source.refresh()
    for status, document, error in (
        (401, None, BadCredentials),
        (500, None, Unavailable),
        (200, b'{"kind": "Status"}', Unavailable),
        (200, b"<html>", Unavailable),
        (200, jwks({"kty": "oct", "kid": "x", "k": "c2VjcmV0"}), Unavailable),
    ):
        api.status = status
        api.document = document or api.document
        with pytest.raises(error) as info:
            await url_source.refresh()
        assert PLANTED not in str(info.value) + (info.value.hint or "")
        assert url_source.current() is first


async def test_unreadable_agent_token_is_bad_credentials(url_source, api, sa_token_file):
    """A missing token file of the agent's own fails the fetch with BadCredentials naming
    the file, and sends nothing."""
    sa_token_file.unlink()
    with pytest.raises(BadCredentials, match="agent-token"):
        await url_source.refresh()
    assert api.fetches == 0


def test_plain_http_only_to_loopback():
    """The JWKS URL is https, or http only to a loopback host."""
    with pytest.raises(ConfigError, match="loopback"):
        JwksSource.from_url("http://kubernetes.default.svc/openid/v1/jwks")


async def test_keep_fresh_refreshes_at_max_age_and_retries_failures(url_source, api, clock):
    """The background loop sleeps until the max-age passes, refreshes, and after a failure
    waits JWKS_RETRY_INTERVAL."""
    api.cache_control = "max-age=600"
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)
        if len(sleeps) == 2:
            api.status = 500
        if len(sleeps) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await url_source.keep_fresh(sleep=fake_sleep)
    assert sleeps == [600, 600, JWKS_RETRY_INTERVAL]
    assert api.fetches == 3


@pytest.fixture(name="tls")
def _tls(tmp_path):
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)

    def cert(subject, issuer, public, signer, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test cluster CA", "test cluster CA", ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert("kube-apiserver", "test cluster CA", key.public_key(), ca_key, ca=False)
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    return ca_file, context


async def test_tls_verified_against_the_cluster_ca(aiohttp_server, api, sa_token_file, tls, clock):
    """Over https the API server's certificate is checked against the configured CA file:
    with it the fetch succeeds; without it (system roots) the fetch fails as Unavailable."""
    ca_file, context = tls
    server = await aiohttp_server(api.app(), host="127.0.0.1", ssl=context)
    url = str(server.make_url("/openid/v1/jwks"))
    assert url.startswith("https://127.0.0.1:")
    good = JwksSource.from_url(url, token_file=sa_token_file, ca_file=ca_file, clock=clock)
    bad = JwksSource.from_url(url, token_file=sa_token_file, ca_file=None, clock=clock)
    try:
        assert sorted((await good.refresh()).keys) == ["rsa-a"]
        with pytest.raises(Unavailable):
            await bad.refresh()
        assert api.fetches == 1
    finally:
        await good.close()
        await bad.close()


# --- helpers -----------------------------------------------------------------------------


def test_bearer_token_from_authorization():
    """The credentials of a Bearer Authorization value, any case of the scheme; None for
    other schemes or an empty value."""
    assert bearer_token(b"Bearer eyJ.a.b") == b"eyJ.a.b"
    assert bearer_token(b"bearer   eyJ.a.b ") == b"eyJ.a.b"
    assert bearer_token(b"Basic dXNlcjpwdw==") is None
    assert bearer_token(b"Bearer ") is None
    assert bearer_token(b"") is None


def test_keyset_skips_unusable_keys(tmp_path, clock):
    """A JWKS with encryption keys, private keys, keys without kid and an oct key yields
    only the signing keys; a duplicated kid is an error."""
    private = jwt.algorithms.RSAAlgorithm.to_jwk(RSA_B, as_dict=True)
    entries = [
        jwk_of(RSA_A, "rsa-a"),
        {**jwk_of(RSA_B, "enc"), "use": "enc"},
        {**private, "kid": "private"},
        {k: v for k, v in jwk_of(EC_A, "x").items() if k != "kid"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        "not an object",
    ]
    keys = k8s_identity.KeySet.parse(jwks(*entries), origin="t", loaded_at=0, stale_at=1)
    assert sorted(keys.keys) == ["rsa-a"]
    with pytest.raises(ValueError, match="twice"):
        k8s_identity.KeySet.parse(
            jwks(jwk_of(RSA_A, "k"), jwk_of(EC_A, "k")), origin="t", loaded_at=0, stale_at=1
        )
