"""kms-agent as a process, called with curl exactly as an application container does."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess

import pytest

from tests.conftest import PLANTED

pytestmark = pytest.mark.e2e


def test_fresh_install_serves_a_stored_secret_to_curl(agent):
    """No config: store put, then curl ?format=raw prints exactly the stored bytes, and the
    compat endpoint answers in the AWS shape with the AWS agent's token header."""
    value = f"{PLANTED}-aigw value with spaces & symbols !@#"
    put = agent.cli("store", "put", "aigw!secret-abc", stdin=value.encode() + b"\n")
    assert put.returncode == 0, put.stderr
    agent.start()
    status, body = agent.curl("/secrets/aigw!secret-abc?format=raw")
    assert (status, body) == (200, value.encode())
    status, body = agent.curl(
        "/secretsmanager/get?secretId=aigw%21secret-abc", header="X-Aws-Parameters-Secrets-Token"
    )
    assert status == 200
    doc = json.loads(body)
    assert doc["Name"] == "aigw!secret-abc"
    assert doc["SecretString"] == value
    assert doc["VersionStages"] == ["AWSCURRENT"]  # AWS spelling, whatever the store
    token_path = agent.root / "run" / "kms-agent" / "token"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o640
    ready = agent.wait_for(lambda e: e.get("event") == "tokens_loaded", 1)
    assert ready["origins"] == [str(token_path)]


def test_kms_agent_get_exit_codes(agent, agent_factory):
    """`kms-agent get` prints the value (0), reports not found (1), unreachable (2)."""
    agent.cli("store", "put", "db-password", stdin=PLANTED.encode())
    agent.start()
    got = agent.cli("get", "--agent", agent.address, "db-password")
    assert (got.returncode, got.stdout) == (0, PLANTED.encode())
    missing = agent.cli("get", "--agent", agent.address, "no-such-secret")
    assert missing.returncode == 1
    assert b"does not exist" in missing.stderr
    bad_token = agent.cli(
        "get", "--agent", agent.address, "db-password", env={"KMS_TOKEN": "x" * 20}
    )
    assert bad_token.returncode == 2
    assert b"not valid" in bad_token.stderr
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    down = agent.cli("get", "--agent", f"127.0.0.1:{free}", "db-password")
    assert down.returncode == 2
    assert b"unreachable" in down.stderr


def test_json_field_and_binary_values(agent):
    """field=KEY of a JSON secret, and a binary secret's raw bytes, through curl."""
    agent.cli(
        "store", "put", "db/creds", stdin=json.dumps({"user": "app", "password": PLANTED}).encode()
    )
    blob = bytes(range(256))
    agent.cli("store", "put", "tls/key.der", "--binary", stdin=blob)
    agent.start()
    assert agent.curl("/secrets/db/creds?field=password&format=raw") == (200, PLANTED.encode())
    assert agent.curl("/secrets/tls/key.der?format=raw") == (200, blob)


@pytest.mark.parametrize(
    ("args", "kwargs", "status", "code"),
    [
        ((), {"token": "wrong-token-0123456789"}, 403, "Forbidden"),
        ((), {"token": ""}, 401, "MissingToken"),
        (("-H", "X-Forwarded-For: 203.0.113.9"), {}, 400, "ProxiedRequestRefused"),
        (("-X", "POST"), {}, 405, "MethodNotAllowed"),
        (("-X", "DELETE"), {}, 405, "MethodNotAllowed"),
    ],
    ids=["wrong-token", "no-token", "xff", "post", "delete"],
)
def test_refusals_over_the_wire(agent, args, kwargs, status, code):
    """Wrong token, missing token, proxies and writes are refused with JSON errors."""
    agent.cli("store", "put", "db", stdin=PLANTED.encode())
    agent.start()
    got_status, body = agent.curl("/secrets/db", *args, **kwargs)
    assert got_status == status
    assert json.loads(body)["error"]["code"] == code


def test_unknown_name_and_route(agent):
    """An unknown secret is 404 SecretNotFound; an unknown route 404 RouteNotFound."""
    agent.start()
    status, body = agent.curl("/secrets/aigw!missing")
    assert (status, json.loads(body)["error"]["code"]) == (404, "SecretNotFound")
    status, body = agent.curl("/v2/whatever")
    assert (status, json.loads(body)["error"]["code"]) == (404, "RouteNotFound")


def test_store_change_is_picked_up_live(agent):
    """A value changed with `store put` while the agent runs is served without restart,
    even though the old one was cached with a 300 s TTL."""
    agent.cli("store", "put", "api-key", stdin=b"one-" + PLANTED.encode())
    agent.start()
    assert agent.curl("/secrets/api-key?format=raw") == (200, b"one-" + PLANTED.encode())
    mark = len(agent.lines)
    agent.cli("store", "put", "api-key", stdin=b"two-" + PLANTED.encode())
    agent.wait_for(
        lambda e: e.get("event") == "source_changed" and e["entries_dropped"] >= 1, 10, mark
    )
    assert agent.curl("/secrets/api-key?format=raw") == (200, b"two-" + PLANTED.encode())
    prev = agent.curl("/secrets/api-key?format=raw&version_stage=ACSPrevious")
    assert prev == (200, b"one-" + PLANTED.encode())
    mark = len(agent.lines)
    agent.cli("store", "delete", "api-key")
    agent.wait_for(lambda e: e.get("event") == "source_changed", 10, mark)
    assert agent.curl("/secrets/api-key?format=raw")[0] == 404


def test_sigterm_exits_zero_after_draining(agent):
    """SIGTERM drains and exits 0, logging the drain."""
    agent.start()
    assert agent.curl("/healthz")[0] == 200
    assert agent.stop(signal.SIGTERM) == 0
    events = [e.get("event") for e in agent.events()]
    assert events.index("draining") < events.index("stopped")


def test_non_loopback_listener_is_refused(agent):
    """Binding 0.0.0.0 without allow_non_loopback fails fast with the reason."""
    result = agent.cli("run", "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert b"not a loopback address" in result.stderr


def test_tokens_from_env_and_unix_socket(agent_factory, tmp_path):
    """$KMS_TOKEN replaces the generated token; a unix socket listener works with curl."""
    token = "env-token-" + "k" * 24
    agent = agent_factory(env={"KMS_TOKEN": token})
    agent.cli("store", "put", "db", stdin=PLANTED.encode())
    sock = tmp_path / "agent.sock"
    agent.start(listen=f"unix:{sock}")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--unix-socket",
            str(sock),
            "-H",
            f"X-KMS-Token: {token}",
            "http://localhost/secrets/db?format=raw",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    assert out == PLANTED.encode()
    assert not (agent.root / "run" / "kms-agent" / "token").exists()
    assert token not in "\n".join(agent.lines)


def test_store_cli_refuses_to_delete_the_default_key(agent):
    """The default key can be listed and used, never deleted or disabled."""
    agent.cli("store", "init")
    listed = agent.cli("store", "key", "list")
    assert b"local/default" in listed.stdout
    for action in ("delete", "disable"):
        result = agent.cli("store", "key", action, "local/default")
        assert result.returncode == 1
        assert b"never deleted or disabled" in result.stderr


def test_corrupt_store_file_is_reported_without_traceback(agent):
    """A tampered store file gives a clear error naming the file, over HTTP and in the CLI."""
    agent.cli("store", "put", "db", stdin=PLANTED.encode())
    files = list((agent.root / "data" / "kms-agent" / "secrets").glob("*.json"))
    files[0].write_bytes(files[0].read_bytes()[:50])
    result = agent.cli("store", "get", "db")
    assert result.returncode == 1
    assert str(files[0]).encode() in result.stderr
    assert b"Traceback" not in result.stderr
    agent.start()
    status, body = agent.curl("/secrets/db")
    assert status == 500
    assert json.loads(body)["error"]["code"] == "StoreCorrupt"


def test_token_file_is_reloaded_on_change(agent_factory, tmp_path):
    """Editing a configured token file swaps the accepted tokens without a restart."""
    old, new = "old-token-" + "o" * 20, "new-token-" + "n" * 20
    tokens = tmp_path / "tokens"
    tokens.write_text(old + "\n")
    tokens.chmod(0o640)
    config = tmp_path / "kms.toml"
    config.write_text(f'[auth]\ntoken_files = ["{tokens}"]\n')
    agent = agent_factory()
    agent.cli("store", "put", "db", stdin=PLANTED.encode())
    agent.start("--config", str(config))
    assert agent.curl("/secrets/db?format=raw", token=old)[0] == 200
    mark = len(agent.lines)
    tokens.write_text(f"{old}\n{new}\n")  # rotation: both live
    agent.wait_for(lambda e: e.get("event") == "config_reloaded" and e["tokens"] == 2, 10, mark)
    assert agent.curl("/secrets/db?format=raw", token=new)[0] == 200
    assert agent.curl("/secrets/db?format=raw", token=old)[0] == 200
    mark = len(agent.lines)
    tokens.write_text(new + "\n")  # the old one retired
    agent.wait_for(lambda e: e.get("event") == "config_reloaded" and e["tokens"] == 1, 10, mark)
    assert agent.curl("/secrets/db?format=raw", token=old)[0] == 403
    assert agent.curl("/secrets/db?format=raw", token=new)[0] == 200
    log = "\n".join(agent.lines)
    assert old not in log
    assert new not in log


def test_listen_address_in_use_is_a_clear_error(agent):
    """A taken port ends the process with exit 2 and one line naming the key, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = agent.cli("run", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"server.listen: cannot listen on 127.0.0.1:{port}" in result.stderr.decode()
    assert b"Traceback" not in result.stderr + result.stdout
