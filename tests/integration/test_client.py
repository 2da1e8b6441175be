"""kms_agent_client against a running agent: values, errors, keep-alive, reconnects, tokens.

The client blocks, the agent runs on the test's event loop: every call goes through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from kms_agent.store import LocalStore
from kms_agent_client import Client, ClientError
from tests.conftest import PLANTED, TOKEN, running_agent


def store(tmp_path: Path) -> LocalStore:
    local = LocalStore(tmp_path / "d")
    local.init()
    return local


def client(agent, token: str = TOKEN) -> Client:
    return Client(agent.addresses[0], token=token)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_values_versions_fields_and_binary(tmp_path):
    local = store(tmp_path)
    first = local.put("db-password", (PLANTED + "-old").encode())
    local.put("db-password", PLANTED.encode())
    local.put("db/json", json.dumps({"user": "app", "password": PLANTED}).encode())
    local.put("tls/key", b"\x00\xff" + PLANTED.encode(), data_type="binary")
    async with running_agent(tmp_path) as agent:
        with client(agent) as c:
            assert await asyncio.to_thread(c.get_text, "db-password") == PLANTED
            assert (
                await asyncio.to_thread(c.get_text, "db-password", version_stage="ACSPrevious")
                == PLANTED + "-old"
            )
            assert (
                await asyncio.to_thread(c.get_text, "db-password", version_id=first)
                == PLANTED + "-old"
            )
            assert await asyncio.to_thread(c.get_text, "db/json", field="password") == PLANTED
            assert (await asyncio.to_thread(c.get_json, "db/json"))["user"] == "app"
            assert await asyncio.to_thread(c.get, "tls/key") == b"\x00\xff" + PLANTED.encode()
            assert await asyncio.to_thread(c.get_text, "db-password", refresh=True) == PLANTED


async def test_errors_carry_the_agents_code_and_hint_and_never_a_secret(tmp_path):
    store(tmp_path).put("db-password", PLANTED.encode())
    async with running_agent(tmp_path) as agent:
        with client(agent) as c:
            with pytest.raises(ClientError) as missing:
                await asyncio.to_thread(c.get, "no-such-secret")
            assert (missing.value.status, missing.value.code, missing.value.not_found) == (
                404,
                "SecretNotFound",
                True,
            )
            assert missing.value.hint
            with pytest.raises(ClientError) as bad:
                await asyncio.to_thread(c.get, "db-password", field="nope")
            assert bad.value.status == 400 and not bad.value.not_found
        wrong = "w" * 32
        with client(agent, token=wrong) as c:
            with pytest.raises(ClientError) as denied:
                await asyncio.to_thread(c.get, "db-password")
            assert denied.value.status == 403
            shown = f"{denied.value!s} {denied.value!r} {denied.value.hint} {c!r}"
            assert wrong not in shown and TOKEN not in shown and PLANTED not in shown


async def test_one_connection_for_many_reads_and_a_reconnect_when_the_agent_closed_it(tmp_path):
    store(tmp_path).put("db-password", PLANTED.encode())
    async with running_agent(tmp_path) as agent:
        connections = agent.listeners.connections
        state = agent.state
        with client(agent) as c:
            for _ in range(5):
                assert await asyncio.to_thread(c.get_text, "db-password") == PLANTED
            assert len(connections) == 1
            first = c._sock
            served = state.request_counter
            for conn in list(connections.open):  # as the agent's keep-alive timeout would
                conn.shut()
            assert await asyncio.to_thread(c.get_text, "db-password") == PLANTED
            assert c._sock is not first and state.request_counter == served + 1
            for _ in range(3):
                assert await asyncio.to_thread(c.get_text, "db-password") == PLANTED
            assert c._sock is not None and state.request_counter == served + 4


async def test_a_rotated_token_file_is_read_again_after_a_403(tmp_path):
    store(tmp_path).put("db-password", PLANTED.encode())
    token_file = tmp_path / "token"
    token_file.write_text("# rotated by the operator\n" + "o" * 32 + "\n")
    async with running_agent(tmp_path) as agent:
        with Client(agent.addresses[0], token_file=token_file) as c:
            with pytest.raises(ClientError) as denied:
                await asyncio.to_thread(c.get, "db-password")
            assert denied.value.status == 403
            token_file.write_text("o" * 32 + "\n" + TOKEN + "\n")  # the new line is the live one
            assert await asyncio.to_thread(c.get_text, "db-password") == PLANTED


async def test_token_from_the_environment_as_value_or_file(tmp_path):
    store(tmp_path).put("db-password", PLANTED.encode())
    (tmp_path / "t").write_text(TOKEN + "\n")
    async with running_agent(tmp_path) as agent:
        for value in (TOKEN, f"file://{tmp_path / 't'}"):
            with Client(agent.addresses[0], environ={"KMS_TOKEN": value}) as c:
                assert await asyncio.to_thread(c.get_text, "db-password") == PLANTED
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "token").write_text(TOKEN + "\n")  # where an agent writes its own
        for env in ({"KMS_AGENT_RUNTIME_DIR": str(tmp_path / "run")},
                    {"XDG_RUNTIME_DIR": str(tmp_path), "HOME": "/nonexistent"}):  # fmt: skip
            if "XDG_RUNTIME_DIR" in env:
                (tmp_path / "kms-agent").mkdir()
                (tmp_path / "kms-agent" / "token").write_text(TOKEN + "\n")
            with Client(agent.addresses[0], environ=env) as c:
                assert await asyncio.to_thread(c.get_text, "db-password") == PLANTED
    with pytest.raises(ClientError, match="cannot read the token file"):
        Client(environ={"KMS_TOKEN": f"file://{tmp_path / 'absent'}"})
    with pytest.raises(ClientError, match="control characters"):
        Client(token="abc\r\nX-Injected: 1")


async def test_an_absent_agent_is_a_clear_error(tmp_path):
    with Client(f"127.0.0.1:{free_port()}", token=TOKEN) as c:
        with pytest.raises(ClientError) as down:
            c.get("db-password")
    assert down.value.code == "AgentUnreachable" and down.value.status == 0
    assert "kms-agent run" in (down.value.hint or "")
    with pytest.raises(ClientError, match="not an agent address"):
        Client("localhost", token=TOKEN)


async def test_unix_socket_and_threads_taking_turns(tmp_path):
    local = store(tmp_path)
    for i in range(4):
        local.put(f"s{i}", f"{PLANTED}-{i}".encode())
    sock = tmp_path / "agent.sock"
    async with running_agent(tmp_path, env={"KMS_AGENT_SERVER_LISTEN": f"unix:{sock}"}):
        with Client(f"unix:{sock}", token=TOKEN) as c:

            def reads(i: int) -> list[str]:
                return [c.get_text(f"s{i}") for _ in range(25)]

            results = await asyncio.gather(*(asyncio.to_thread(reads, i) for i in range(4)))
    assert results == [[f"{PLANTED}-{i}"] * 25 for i in range(4)]
