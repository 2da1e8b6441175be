"""The blocks the clouds' credential sources are composed of
(:mod:`kms_agent.credentials.blocks`), each alone: static keys, an INI profile, an OIDC
exchange, a JSON credential document, a metadata service (against a loopback fake) and
the shared assume-role refusal."""

from __future__ import annotations

import calendar

import aiohttp
import pytest
from aiohttp import web

from kms_agent.credentials import Credentials, Refreshing, StaleCredentials, assume, blocks
from kms_agent.errors import BadCredentials, ConfigError
from tests.conftest import PLANTED, FakeClock

WHERE = "sources.s.credentials"
NAMES = blocks.KeyNames(("ak", "X_AK"), ("sk", "X_SK"), ("token", "X_TOKEN"), "test keys")
EXPIRES = "2024-05-01T12:00:00Z"
NOON = float(calendar.timegm((2024, 5, 1, 12, 0, 0, 0, 0, 0)))


# --------------------------------------------------------------------------- kinds


def test_kinds_take_the_type_or_discover_it_and_keep_chain_keys_to_the_chain():
    """ "auto" asks the cloud's discovery, another type is taken as given, and only the
    chained type may carry a chain's keys."""
    kinds = blocks.Kinds({"type", "ak", "base"}, ("auto", "static", "chain"), "chain")
    assert kinds.of({}, WHERE, lambda: "static") == "static"
    assert kinds.of({"type": "chain", "base": {}}, WHERE, lambda: "static") == "chain"
    with pytest.raises(ConfigError, match=r"credentials\.base: only taken with type = 'chain'"):
        kinds.of({"type": "static", "base": {}}, WHERE, lambda: "static")
    with pytest.raises(ConfigError, match=r"credentials\.sk: unknown setting"):
        kinds.of({"sk": "x"}, WHERE, lambda: "static")


# --------------------------------------------------------------------------- static keys


async def test_static_keys_come_from_the_table_before_the_environment():
    """Each key is the table's if set, else the environment's; the fetch hands out the
    same credentials every time, never expiring."""
    env = {"X_AK": "AKENV", "X_SK": f"{PLANTED}-env", "X_TOKEN": "tok-env"}
    assert blocks.static_keys({"ak": "AKTABLE"}, env, NAMES, WHERE) == (
        "AKTABLE",
        f"{PLANTED}-env",
        "tok-env",
    )
    assert blocks.static_keys({}, {"X_AK": "A", "X_SK": "S"}, NAMES, WHERE) == ("A", "S", None)
    fetch = blocks.static("A", f"{PLANTED}-s", None, "origin-x")
    first = await fetch()
    assert first == Credentials("A", f"{PLANTED}-s", None, None, origin="origin-x")
    assert await fetch() is first


@pytest.mark.parametrize("table", [{}, {"ak": "A"}, {"sk": "S"}], ids=["none", "no-sk", "no-ak"])
def test_static_keys_without_id_and_secret_are_a_config_error(table):
    """A missing key id or secret names both settings and both variables."""
    with pytest.raises(ConfigError) as caught:
        blocks.static_keys(table, {}, NAMES, WHERE)
    assert caught.value.message == f"{WHERE}: test keys need ak and sk (or $X_AK and $X_SK)"


# --------------------------------------------------------------------------- profile file


def layout(*, literal: bool, recheck: float | None = None) -> blocks.ProfileLayout:
    return blocks.ProfileLayout("key", "secret", "token", literal=literal, recheck=recheck)


async def test_a_profile_is_read_literally_or_interpolated_as_the_cloud_reads_it(tmp_path):
    """Literal layouts keep '%' as written (botocore); interpolated ones resolve '%%'
    (Alibaba's SDK uses ConfigParser)."""
    path = tmp_path / "credentials"
    path.write_text("[p]\nkey = K\nsecret = a%%b\ntoken = t\n", encoding="utf-8")
    literal = await blocks.profile_file(path, "p", layout(literal=True), "o", WHERE)()
    interpolated = await blocks.profile_file(path, "p", layout(literal=False), "o", WHERE)()
    assert (literal.access_key_secret, literal.security_token) == ("a%%b", "t")
    assert interpolated.access_key_secret == "a%b"


async def test_a_profile_with_a_recheck_expires_then_and_is_read_again(tmp_path):
    """With ``recheck`` the keys expire that long after reading (on the given clock), and
    the next fetch reads the file as it is then."""
    path = tmp_path / "credentials"
    path.write_text("[p]\nkey = OLD\nsecret = s\n", encoding="utf-8")
    clock = FakeClock(start=1000.0)
    fetch = blocks.profile_file(path, "p", layout(literal=True, recheck=60), "o", WHERE, clock)
    first = await fetch()
    assert (first.access_key_id, first.security_token, first.expiration) == ("OLD", None, 1060.0)
    path.write_text("[p]\nkey = NEW\nsecret = s\n", encoding="utf-8")
    clock.advance(60)
    assert (await fetch()).access_key_id == "NEW"
    unexpiring = await blocks.profile_file(path, "p", layout(literal=True), "o", WHERE, clock)()
    assert unexpiring.expiration is None


@pytest.mark.parametrize(
    "text",
    ["[q]\nkey = K\nsecret = s\n", f"[p]\nkey = {PLANTED}\n", f"{PLANTED} not ini\n"],
    ids=["no-profile", "no-secret", "not-ini"],
)
async def test_an_unusable_profile_names_file_profile_and_keys_only(tmp_path, text):
    """A missing profile, a missing key or a file that is not INI is BadCredentials naming
    the file, the profile and the keys wanted, quoting nothing of the file."""
    path = tmp_path / "credentials"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadCredentials) as caught:
        await blocks.profile_file(path, "p", layout(literal=True), "o", WHERE)()
    assert caught.value.message.startswith(f"{WHERE}: {path} has no [p] key/secret (")
    assert PLANTED not in caught.value.message


async def test_a_missing_profile_file_is_named_as_unreadable(tmp_path):
    """A credentials file that is not there says so, by path."""
    path = tmp_path / "absent"
    with pytest.raises(BadCredentials) as caught:
        await blocks.profile_file(path, "p", layout(literal=True), "o", WHERE)()
    assert caught.value.message == f"credentials file {path} cannot be read (FileNotFoundError)"


# --------------------------------------------------------------------------- OIDC exchange


async def test_the_token_file_is_read_afresh_for_every_exchange(tmp_path):
    """Each fetch reads the token file as it is then (kubelet rotates it) and hands it to
    the exchange; an unreadable file stops before the exchange, with the hint."""
    path = tmp_path / "token"
    seen: list[str] = []

    async def exchange(token: str) -> Credentials:
        seen.append(token)
        return Credentials("A", "S", "T", NOON, origin="oidc")

    fetch = blocks.token_exchange(str(path), "OIDC token file", exchange, hint="mounted?")
    path.write_text(f"{PLANTED}-1\n", encoding="utf-8")
    await fetch()
    path.write_text(f"{PLANTED}-2\n", encoding="utf-8")
    await fetch()
    assert seen == [f"{PLANTED}-1", f"{PLANTED}-2"]
    path.unlink()
    with pytest.raises(BadCredentials, match=r"OIDC token file .* cannot be read") as caught:
        await fetch()
    assert caught.value.hint == "mounted?"
    assert len(seen) == 2


def test_a_refusal_is_named_by_its_code_else_its_status():
    """The service's code wins; without one, the HTTP status; a 200 without credentials
    says so rather than "HTTP 200"."""
    assert blocks.refusal("AccessDenied", 403) == "AccessDenied"
    assert blocks.refusal("", 503) == "HTTP 503"
    assert blocks.refusal("", 200) == "an answer without usable credentials"


# --------------------------------------------------------------------------- documents


FLAT = blocks.Document("Id", "Secret", "Token", "Expiration", success=("Code", "Success"))
NESTED = blocks.Document("a", "s", "t", "exp", token_optional=True, within="credential")


def test_a_document_yields_its_credentials_with_their_expiry():
    """The named fields become the credentials; the expiration is parsed."""
    body = {"Code": "Success", "Id": "A", "Secret": "S", "Token": "T", "Expiration": EXPIRES}
    assert FLAT.credentials(body, "imds") == Credentials("A", "S", "T", NOON, origin="imds")
    nested = {"credential": {"a": "A", "s": "S", "exp": EXPIRES}}
    assert NESTED.credentials(nested, "ecs") == Credentials("A", "S", None, NOON, origin="ecs")


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"Code": "Failure", "Id": "A", "Secret": "S", "Token": "T", "Expiration": EXPIRES},
        {"Code": "Success", "Secret": "S", "Token": "T", "Expiration": EXPIRES},
        {"Code": "Success", "Id": "A", "Secret": "", "Token": "T", "Expiration": EXPIRES},
        {"Code": "Success", "Id": "A", "Secret": "S", "Expiration": EXPIRES},
        {"Code": "Success", "Id": "A", "Secret": "S", "Token": "T"},
    ],
    ids=["null", "list", "not-success", "no-id", "empty-secret", "no-token", "no-expiry"],
)
def test_anything_short_of_a_document_is_none(body):
    """Not an object, the success marker missing, or a required field missing or empty:
    None, for the caller to report as a refusal."""
    assert FLAT.credentials(body, "imds") is None


def test_a_document_with_a_broken_expiry_is_bad_credentials():
    """An expiration that is not an ISO 8601 time with a zone is refused by origin."""
    body = {"credential": {"a": "A", "s": "S", "exp": "2024-05-01 12:00"}}
    with pytest.raises(BadCredentials, match="expiration of the ecs credentials is not"):
        NESTED.credentials(body, "ecs")


# --------------------------------------------------------------------------- metadata


TOKEN_SPEC = blocks.SessionToken("/token", "X-Ttl", "X-Token", "Test metadata")


class MetadataService:
    """A loopback metadata service: PUT /token issues a session token (or answers
    ``token_status``); GET /roles/ lists ``roles``; GET /roles/<name> answers the
    document with ``document_status`` if the session token came with it, else 401."""

    def __init__(self) -> None:
        self.token_status = 200
        self.roles = "app-role\nother-role\n"
        self.document_status = 200
        self.requests: list[str] = []
        self.ttls: list[str | None] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/token", self.token)
        app.router.add_get("/roles/", self.listing)
        app.router.add_get("/roles/{name}", self.document)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.ttls.append(request.headers.get("X-Ttl"))
        return web.Response(status=self.token_status, text="session-1\n")

    def _authorized(self, request: web.Request) -> bool:
        self.requests.append(request.path)
        return request.headers.get("X-Token") == "session-1"

    async def listing(self, request: web.Request) -> web.Response:
        if not self._authorized(request) or not self.roles:
            return web.Response(status=404, text="<html>not found</html>")
        return web.Response(text=self.roles)

    async def document(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401, text="<html>no token</html>")
        if self.document_status != 200:
            return web.Response(status=self.document_status, text="<html>no</html>")
        return web.json_response(
            {
                "Code": "Success",
                "Id": f"id-of-{request.match_info['name']}",
                "Secret": f"{PLANTED}-secret",
                "Token": "T",
                "Expiration": EXPIRES,
            }
        )


@pytest.fixture(name="service")
def _service() -> MetadataService:
    return MetadataService()


@pytest.fixture(name="endpoint")
async def _endpoint(aiohttp_server, service) -> str:
    server = await aiohttp_server(service.app(), host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


@pytest.fixture(name="http")
async def _http():
    session = aiohttp.ClientSession()
    yield session
    await session.close()


def instance(endpoint: str, http: aiohttp.ClientSession, role: str | None = None):
    return blocks.metadata(
        lambda: http,
        "the test metadata service",
        blocks.session_token(endpoint, TOKEN_SPEC),
        blocks.instance_role(
            f"{endpoint}/roles/",
            role,
            lambda status: BadCredentials(f"no role attached (HTTP {status})"),
            lambda name: f"refused the credentials of role {name!r}",
        ),
        FLAT,
        "test",
        hint="attach a role",
    )


async def test_token_then_first_listed_role_then_its_document(service, endpoint, http):
    """A session token (asked for METADATA_TOKEN_TTL seconds) goes with each request; the
    first role listed is the one whose document is read."""
    creds = await instance(endpoint, http)()
    assert (creds.access_key_id, creds.expiration, creds.origin) == ("id-of-app-role", NOON, "test")
    assert service.ttls == [str(blocks.METADATA_TOKEN_TTL)]
    assert service.requests == ["/roles/", "/roles/app-role"]


async def test_a_configured_role_is_not_looked_up(service, endpoint, http):
    """With the role named, the listing is not asked."""
    creds = await instance(endpoint, http, role="other-role")()
    assert creds.access_key_id == "id-of-other-role"
    assert service.requests == ["/roles/other-role"]


async def test_a_refused_session_token_stops_there(service, endpoint, http):
    """A refused token request is BadCredentials with its status; nothing else is asked."""
    service.token_status = 403
    with pytest.raises(BadCredentials, match=r"^Test metadata token request failed: HTTP 403$"):
        await instance(endpoint, http)()
    assert service.requests == []


async def test_no_role_listed_is_the_clouds_no_role_error(service, endpoint, http):
    """An empty or refused listing raises the cloud's own error, with the status."""
    service.roles = ""
    with pytest.raises(BadCredentials, match=r"^no role attached \(HTTP 404\)$"):
        await instance(endpoint, http)()


async def test_an_error_status_is_checked_before_the_body_is_parsed(service, endpoint, http):
    """A refused document whose body is not JSON is the cloud's refusal with the status
    and the hint, not a decoding failure."""
    service.document_status = 404
    with pytest.raises(BadCredentials) as caught:
        await instance(endpoint, http)()
    assert caught.value.message == "refused the credentials of role 'app-role' (HTTP 404)"
    assert caught.value.hint == "attach a role"


async def test_a_fixed_document_url_without_headers(service, endpoint, http):
    """``at`` reads a document at a fixed URL; without the session token the fake refuses,
    which proves no token was sent."""

    async def no_headers(_service: blocks.Service) -> dict[str, str]:
        return {}

    fetch = blocks.metadata(
        lambda: http,
        "the test endpoint",
        no_headers,
        blocks.at(f"{endpoint}/roles/x", "the test endpoint refused"),
        FLAT,
        "test",
    )
    with pytest.raises(BadCredentials, match=r"^the test endpoint refused \(HTTP 401\)$"):
        await fetch()
    assert service.ttls == []


def test_a_metadata_endpoint_must_be_http():
    """The endpoint setting is the table's or the default, without a trailing slash, and
    must be an http(s) URL."""
    assert blocks.endpoint_setting({}, "ep", "http://169.254.169.254/", WHERE) == (
        "http://169.254.169.254"
    )
    with pytest.raises(ConfigError, match=r"credentials\.ep: 'file:///x' is not an http"):
        blocks.endpoint_setting({"ep": "file:///x"}, "ep", "http://h", WHERE)


# --------------------------------------------------------------------------- assume role


@pytest.mark.parametrize(
    ("token", "code", "raised"),
    [
        ("base-token", "ExpiredToken", StaleCredentials),
        (None, "ExpiredToken", BadCredentials),
        ("base-token", "AccessDenied", BadCredentials),
    ],
    ids=["stale-temporary", "permanent-keys", "other-code"],
)
async def test_an_assume_role_refusal_is_stale_only_for_temporary_base_keys(token, code, raised):
    """A stale code refusing temporary base credentials is StaleCredentials (fetch them
    anew); permanent keys or another code are BadCredentials naming role and code."""
    chain = assume.settings({"role_arn": "arn:role/r"}, "chain", WHERE)

    async def call(signer: Credentials) -> tuple[Credentials | None, str]:
        return None, code

    fetch = assume.assumer(call, chain, ("ExpiredToken",), f"{WHERE}.base")
    with pytest.raises(BadCredentials) as caught:
        await fetch(Credentials("A", "S", token, origin="base"))
    assert type(caught.value) is raised
    assert caught.value.message.startswith(f"STS AssumeRole of arn:role/r refused: {code}")


async def test_signed_with_invalidates_base_credentials_refused_as_stale():
    """When the assume call says the base credentials are stale, the held ones are dropped,
    so the next attempt fetches new base credentials."""
    issued: list[Credentials] = []

    async def base() -> Credentials:
        issued.append(Credentials(f"B{len(issued)}", "S", "T", origin="base"))
        return issued[-1]

    async def stale_once(signer: Credentials) -> Credentials:
        if signer.access_key_id == "B0":
            raise StaleCredentials("stale")
        return Credentials("R", "S", "T", origin="role")

    held = Refreshing(base, "base")
    fetch = assume.signed_with(held, stale_once)
    with pytest.raises(StaleCredentials):
        await fetch()
    assert (await fetch()).access_key_id == "R"
    assert [c.access_key_id for c in issued] == ["B0", "B1"]


def test_a_document_without_the_success_key_is_still_read() -> None:
    """IMDS documents carry ``Code: Success``, but botocore checks only the fields and
    moto's IMDS sends no Code: a document is refused only when it says another code."""
    document = blocks.Document(
        "AccessKeyId", "SecretAccessKey", "Token", "Expiration", success=("Code", "Success")
    )
    fields = {"AccessKeyId": "A", "SecretAccessKey": "S", "Token": "T",
              "Expiration": "2030-01-01T00:00:00Z"}  # fmt: skip
    assert document.credentials(fields, "imds") is not None
    assert document.credentials({**fields, "Code": "Success"}, "imds") is not None
    assert document.credentials({**fields, "Code": "Failure"}, "imds") is None
