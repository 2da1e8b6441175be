"""ECS task roles: the container credentials endpoint as ECS hands it to a task
(``$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` on 169.254.170.2, the token inline in
``$AWS_CONTAINER_AUTHORIZATION_TOKEN``), as botocore's ContainerProvider reads them
(botocore credentials.py ContainerProvider, utils.py ContainerMetadataFetcher.full_url).
The link-local host is never contacted here: where a request is made, the full URI
points at a loopback fake."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web

from kms_agent.credentials import aws as aws_credentials
from kms_agent.errors import ConfigError
from kms_agent.upstream import new_session
from tests.conftest import PLANTED

WHERE = "sources.aws.credentials"
TOKEN = f"ecs-auth-token-{PLANTED}"


def resolve(table: dict[str, str], environ: dict[str, str]) -> str:
    """The credential kind chosen (no request is made: the fetch is not called)."""

    def no_session() -> aiohttp.ClientSession:
        raise AssertionError("no request is made while resolving")

    kind, _ = aws_credentials.resolve(
        table, environ, region="us-east-1", session=no_session, where=WHERE
    )
    return kind


@pytest.mark.parametrize(
    ("table", "environ", "uri"),
    [
        ({}, {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc"},
         "http://169.254.170.2/v2/credentials/abc"),
        ({}, {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc",
              "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/full"},
         "http://169.254.170.2/v2/credentials/abc"),
        ({"container_uri": "http://127.0.0.1:9/x"},
         {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc"},
         "http://127.0.0.1:9/x"),
    ],
    ids=["relative", "relative-wins-over-full", "table-wins"],
)  # fmt: skip
def test_the_endpoint_is_picked_as_botocore_picks_it(table, environ, uri):
    """The relative URI is on 169.254.170.2 and wins over the full URI (botocore's
    order); a container_uri in the table wins over both. Either variable alone makes
    auto pick the container path."""
    assert aws_credentials.container_uri(table, environ, WHERE) == uri
    assert resolve(table, environ) == "container"


def test_a_token_with_a_line_break_is_refused_at_start():
    """An inline token that is not a legal header value is a configuration error (botocore
    raises at the fetch), and the error does not show the token."""
    env = {
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": f"{TOKEN}\r\nX-Evil: 1",
    }
    with pytest.raises(ConfigError, match="line break") as caught:
        resolve({}, env)
    assert PLANTED not in str(caught.value)


@pytest.mark.parametrize("with_file", [False, True], ids=["inline", "file-wins"])
async def test_the_inline_token_is_sent_unless_a_token_file_is_set(
    aiohttp_server, tmp_path, with_file
):
    """The endpoint gets $AWS_CONTAINER_AUTHORIZATION_TOKEN as Authorization; when a token
    file is set as well, the file's content is sent instead (botocore: the file wins)."""
    seen: list[str | None] = []

    async def credentials(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        expires = datetime.fromtimestamp(time.time() + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response({
            "AccessKeyId": "ASIAECS", "SecretAccessKey": f"{PLANTED}-s",
            "Token": "t", "Expiration": expires, "RoleArn": "arn:aws:iam::1:role/task",
        })  # fmt: skip

    app = web.Application()
    app.router.add_get("/v2/credentials/abc", credentials)
    server = await aiohttp_server(app, host="127.0.0.1")
    env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": str(server.make_url("/v2/credentials/abc")),
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": TOKEN,
    }
    if with_file:
        token_file = tmp_path / "token"
        token_file.write_text("from-the-file")
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = str(token_file)
    http = new_session(connect_timeout=1.0, total_timeout=2.0)
    try:
        kind, fetch = aws_credentials.resolve(
            {}, env, region="us-east-1", session=lambda: http, where=WHERE
        )
        creds = await fetch()
    finally:
        await http.close()
    assert kind == "container"
    assert creds.access_key_id == "ASIAECS"
    assert seen == ["from-the-file" if with_file else TOKEN]
