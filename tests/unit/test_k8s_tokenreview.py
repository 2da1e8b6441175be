"""TokenReview mode: the API server's verdict on each new token, remembered and rate-limited.

The API server is a loopback aiohttp app answering ``POST
/apis/authentication.k8s.io/v1/tokenreviews`` in kube-apiserver's shape (201, the spec
echoed back, ``status.user.extra`` with the pod and node), counting reviews.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from kms_agent.errors import BadCredentials, ConfigError, Forbidden, Unavailable
from kms_agent.k8s_identity import JwksSource, ServiceAccountVerifier
from kms_agent.k8s_tokenreview import (
    TOKENREVIEW_BURST,
    TOKENREVIEW_CACHE_TTL,
    TOKENREVIEW_NEGATIVE_TTL,
    TOKENREVIEW_RATE,
    TokenReviewer,
)
from tests.conftest import PLANTED, FakeClock
from tests.unit.test_k8s_identity import (
    AUDIENCE,
    ISSUER,
    RSA_A,
    RSA_B,
    START,
    jwk_of,
    jwks,
    mint,
    sa_claims,
)

AGENT_TOKEN = "agent-sa-token-" + PLANTED


class FakeReviews:
    """kube-apiserver's TokenReview endpoint for the tokens it was told are valid."""

    def __init__(self) -> None:
        self.valid: dict[str, str] = {}  # token -> namespace:serviceaccount
        self.reviews: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.status = 201
        self.audiences: list[str] | None = None  # None: the audiences asked for
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.reviews.append(body)
        self.authorizations.append(request.headers.get("Authorization"))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 201:
            return web.json_response({"kind": "Status", "code": self.status}, status=self.status)
        spec = body["spec"]
        status: dict[str, Any] = {"user": {}}
        who = self.valid.get(spec["token"])
        if who is None:
            status["error"] = "[invalid bearer token, service account token has been invalidated]"
        else:
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{who}",
                    "uid": "11111111-2222-4333-8444-555555555555",
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                    "extra": {
                        "authentication.kubernetes.io/credential-id": ["JTI=5b0e2d1c"],
                        "authentication.kubernetes.io/node-name": ["node-1.internal"],
                        "authentication.kubernetes.io/pod-name": ["api-7d9f8-x2x4k"],
                        "authentication.kubernetes.io/pod-uid": [
                            "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
                        ],
                    },
                },
                "audiences": self.audiences if self.audiences is not None else spec["audiences"],
            }
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(answer, status=201)


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture(name="api")
def _api() -> FakeReviews:
    return FakeReviews()


@pytest.fixture(name="agent_token_file")
def _agent_token_file(tmp_path):
    path = tmp_path / "agent-token"
    path.write_text(AGENT_TOKEN + "\n")
    return path


@pytest.fixture(name="make_reviewer")
async def _make_reviewer(aiohttp_server, api, agent_token_file, clock):
    server = await aiohttp_server(api.app(), host="127.0.0.1")
    made = []

    def make(**kwargs) -> TokenReviewer:
        reviewer = TokenReviewer(
            (AUDIENCE,),
            api_url=str(server.make_url("")),
            token_file=agent_token_file,
            ca_file=None,
            clock=clock,
            **kwargs,
        )
        made.append(reviewer)
        return reviewer

    yield make
    for reviewer in made:
        await reviewer.close()


def valid_token(api: FakeReviews, clock: FakeClock, sa: str = "api", **over) -> bytes:
    token = mint(sa_claims(clock(), sa=sa, **over))
    api.valid[token.decode()] = f"payments:{sa}"
    return token


async def test_review_names_the_caller_with_pod_and_node(make_reviewer, api, clock):
    """An authenticated review gives the principal, pod, pod uid and node from the answer's
    user info, and the token's exp; the review carried the agent's token, the caller's
    token and the agent's audience."""
    reviewer = make_reviewer()
    token = valid_token(api, clock)
    identity = await reviewer.verify(token)
    assert identity.principal == "k8s:payments:api"
    assert (identity.pod, identity.pod_uid, identity.node) == (
        "api-7d9f8-x2x4k",
        "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
        "node-1.internal",
    )
    assert identity.expires_at == int(clock()) + 3600
    assert api.reviews == [
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token.decode(), "audiences": [AUDIENCE]},
        }
    ]
    assert api.authorizations == [f"Bearer {AGENT_TOKEN}"]


async def test_accepted_token_is_re_reviewed_after_the_ttl(make_reviewer, api, clock):
    """An accepted token is answered from memory for TOKENREVIEW_CACHE_TTL, then reviewed
    again: a token revoked meanwhile is refused from then on."""
    reviewer = make_reviewer()
    token = valid_token(api, clock)
    await reviewer.verify(token)
    clock.advance(TOKENREVIEW_CACHE_TTL - 1)
    await reviewer.verify(token)
    assert len(api.reviews) == 1
    del api.valid[token.decode()]  # its pod was deleted
    clock.advance(1)
    with pytest.raises(Forbidden, match="did not authenticate"):
        await reviewer.verify(token)
    assert len(api.reviews) == 2


async def test_refused_token_is_remembered_briefly(make_reviewer, api, clock):
    """A refused token is refused from memory for TOKENREVIEW_NEGATIVE_TTL, then asked
    about again."""
    reviewer = make_reviewer()
    token = mint(sa_claims(clock()))
    for _ in range(5):
        with pytest.raises(Forbidden):
            await reviewer.verify(token)
    assert len(api.reviews) == 1
    clock.advance(TOKENREVIEW_NEGATIVE_TTL)
    with pytest.raises(Forbidden):
        await reviewer.verify(token)
    assert len(api.reviews) == 2


async def test_new_tokens_beyond_the_rate_are_turned_away(make_reviewer, api, clock):
    """A flood of distinct bad tokens costs the API server TOKENREVIEW_BURST reviews; the
    rest are answered 503 at once; a second later the bucket has refilled by the rate."""
    reviewer = make_reviewer()
    flood = [mint(sa_claims(clock(), sa=f"x{i}")) for i in range(int(TOKENREVIEW_BURST) + 25)]
    errors = []
    for token in flood:
        with pytest.raises((Forbidden, Unavailable)) as info:
            await reviewer.verify(token)
        errors.append(info.value)
    assert sum(isinstance(e, Forbidden) for e in errors) == TOKENREVIEW_BURST
    assert sum(isinstance(e, Unavailable) for e in errors) == 25
    assert len(api.reviews) == TOKENREVIEW_BURST
    assert reviewer.throttled == 25
    clock.advance(1)
    more = [mint(sa_claims(clock(), sa=f"y{i}")) for i in range(int(TOKENREVIEW_RATE) + 5)]
    for token in more:
        with pytest.raises((Forbidden, Unavailable)):
            await reviewer.verify(token)
    assert len(api.reviews) == TOKENREVIEW_BURST + TOKENREVIEW_RATE


async def test_concurrent_callers_share_one_review(make_reviewer, api, clock):
    """Twenty callers with one new token at once cause one review."""
    reviewer = make_reviewer()
    token = valid_token(api, clock)
    api.gate = asyncio.Event()
    tasks = [asyncio.ensure_future(reviewer.verify(token)) for _ in range(20)]
    await api.arrived.wait()
    api.gate.set()
    identities = await asyncio.gather(*tasks)
    assert {i.principal for i in identities} == {"k8s:payments:api"}
    assert len(api.reviews) == 1


async def test_offline_check_first_keeps_forgeries_away(make_reviewer, api, clock, tmp_path):
    """With an offline verifier, a forged token is refused without a review; a genuine one
    whose pod is gone (the API server refuses it) is refused although it verifies offline."""
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk_of(RSA_A, "rsa-a")))
    offline = ServiceAccountVerifier(
        ISSUER, (AUDIENCE,), JwksSource.from_file(path, clock=clock), clock=clock
    )
    await offline.ensure_loaded()
    reviewer = make_reviewer(offline=offline)
    with pytest.raises(Forbidden, match="signature"):
        await reviewer.verify(mint(sa_claims(clock()), RSA_B, "rsa-a"))
    assert api.reviews == []
    revoked = mint(sa_claims(clock()))
    assert offline.verify(revoked).principal == "k8s:payments:api"
    with pytest.raises(Forbidden, match="did not authenticate"):
        await reviewer.verify(revoked)
    assert len(api.reviews) == 1
    good = valid_token(api, clock, sa="worker")
    assert (await reviewer.verify(good)).principal == "k8s:payments:worker"


async def test_offline_and_review_must_agree(make_reviewer, api, clock, tmp_path):
    """If the API server names another account than the verified token, it is refused."""
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk_of(RSA_A, "rsa-a")))
    offline = ServiceAccountVerifier(
        ISSUER, (AUDIENCE,), JwksSource.from_file(path, clock=clock), clock=clock
    )
    await offline.ensure_loaded()
    reviewer = make_reviewer(offline=offline)
    token = mint(sa_claims(clock()))
    api.valid[token.decode()] = "payments:someone-else"
    with pytest.raises(Forbidden, match="disagree"):
        await reviewer.verify(token)


async def test_review_for_another_audience_is_refused(make_reviewer, api, clock):
    """An authenticated answer whose audiences do not include ours is refused."""
    reviewer = make_reviewer()
    token = valid_token(api, clock)
    api.audiences = ["https://kubernetes.default.svc"]
    with pytest.raises(Forbidden, match="another audience"):
        await reviewer.verify(token)


@pytest.mark.parametrize(("status", "error"), [(403, BadCredentials), (500, Unavailable)])
async def test_api_server_errors(make_reviewer, api, clock, status, error):
    """403 (the agent lacks system:auth-delegator) is BadCredentials with that hint, 500
    Unavailable; neither is remembered, and no message carries a token."""
    reviewer = make_reviewer()
    token = valid_token(api, clock)
    api.status = status
    with pytest.raises(error) as info:
        await reviewer.verify(token)
    text = f"{info.value} {info.value!r} {info.value.hint}"
    assert token.decode() not in text and PLANTED not in text
    if status == 403:
        assert "system:auth-delegator" in text
    api.status = 201
    assert (await reviewer.verify(token)).principal == "k8s:payments:api"


async def test_tokens_never_in_messages_or_reprs(make_reviewer, api, clock, log_capture):
    """Refusals, the reviewer's repr and the log never show the caller's or agent's token."""
    reviewer = make_reviewer()
    token = mint(sa_claims(clock(), planted=PLANTED))
    with pytest.raises(Forbidden) as info:
        await reviewer.verify(token)
    good = valid_token(api, clock)
    identity = await reviewer.verify(good)
    for shown in (
        str(info.value),
        repr(info.value),
        info.value.hint or "",
        repr(reviewer),
        repr(identity),
        log_capture.getvalue(),
    ):
        for secret in (token.decode(), good.decode(), PLANTED):
            assert secret not in shown


def test_config_is_checked(agent_token_file):
    """No audience, a zero rate or plain http to a non-loopback host are config errors."""
    with pytest.raises(ConfigError):
        TokenReviewer((), token_file=agent_token_file)
    with pytest.raises(ConfigError):
        TokenReviewer((AUDIENCE,), token_file=agent_token_file, rate=0)
    with pytest.raises(ConfigError, match="loopback"):
        TokenReviewer((AUDIENCE,), api_url="http://kubernetes.default.svc")
