"""What a new user meets first at the command line: options, hints, output streams."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys

import pytest

from tests.conftest import PLANTED

pytestmark = pytest.mark.e2e


def _no_traceback(result: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in result.stdout + result.stderr, result.stderr.decode()[-2000:]


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{config}", "check-config"],
        ["check-config", "--config", "{config}"],
        ["check-config", "--config={config}", "--log-level", "debug"],
    ],
)
def test_global_options_are_accepted_after_the_subcommand(agent, tmp_path, argv):
    """--config (and the other global options) work before or after the subcommand."""
    config = tmp_path / "kms.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:2999"\n')
    result = agent.cli(*(a.format(config=config) for a in argv))
    assert result.returncode == 0, result.stderr
    assert b"listen 127.0.0.1:2999" in result.stdout


def test_data_dir_after_a_nested_subcommand(agent, tmp_path):
    """`store put NAME --data-dir DIR` writes where it says, like `--data-dir DIR store put`."""
    elsewhere = tmp_path / "elsewhere"
    put = agent.cli("store", "put", "db", "--data-dir", str(elsewhere), stdin=PLANTED.encode())
    assert put.returncode == 0, put.stderr
    got = agent.cli("--data-dir", str(elsewhere), "store", "get", "db")
    assert got.stdout == PLANTED.encode()
    listed = agent.cli("store", "--data-dir", str(elsewhere), "list")
    assert listed.stdout.split() == [b"db"]
    # the default data dir was not touched
    assert agent.cli("store", "list").stdout == b""
    # given twice, the one after the subcommand wins
    twice = agent.cli(
        "--data-dir", str(tmp_path / "x"), "store", "list", "--data-dir", str(elsewhere)
    )
    assert twice.stdout.split() == [b"db"]


@pytest.mark.parametrize("name", ["nope!x", "team@a/b!c", "plain"])
def test_hints_quote_names_for_a_shell(agent, name):
    """A hint's command pastes into bash as is: `!` (history expansion), quotes and spaces in
    the name are quoted, so the pasted command names the same secret."""
    got = agent.cli("store", "get", name)
    assert got.returncode == 1
    hint = got.stderr.decode()
    expected = f"kms-agent store put {shlex.quote(name)} < value-file"
    assert expected in hint, hint
    assert shlex.split(expected)[3] == name
    agent.cli("store", "put", name, stdin=b"v")
    described = agent.cli("store", "get", name, "--version-id", "no-such")
    assert f"kms-agent store describe {shlex.quote(name)}" in described.stderr.decode()


@pytest.mark.parametrize("stdin", [b"", b"\n"])
def test_put_with_empty_stdin_is_refused(agent, stdin):
    """`store put NAME < /dev/null` stores nothing and says why (exit 1) unless
    --allow-empty; an earlier value stays current."""
    assert agent.cli("store", "put", "db", stdin=PLANTED.encode()).returncode == 0
    refused = agent.cli("store", "put", "db", stdin=stdin)
    assert refused.returncode == 1
    assert b"empty" in refused.stderr and b"--allow-empty" in refused.stderr
    assert agent.cli("store", "get", "db").stdout == PLANTED.encode()
    allowed = agent.cli("store", "put", "db", "--allow-empty", stdin=stdin)
    assert allowed.returncode == 0, allowed.stderr
    got = agent.cli("store", "get", "db")
    assert (got.returncode, got.stdout) == (0, b"")


def test_doctor_stdout_is_the_report_alone(agent):
    """`doctor --json` prints JSON that parses as it is; logs of the command go to stderr."""
    agent.cli("store", "put", "db", stdin=PLANTED.encode())
    result = agent.cli("doctor", "--json", "db")
    _no_traceback(result)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["failed_step"] is None
    text = agent.cli("doctor", "db", "--log-level", "debug")
    assert text.stdout.decode().splitlines()[0] == "kms-agent doctor db"
    assert b"local_store_opened" in text.stderr  # the log line went to stderr


def test_check_config_show_redacts_every_credential(agent, tmp_path):
    """`check-config --show` prints no credential: planted values under every credential-like
    key (secret, token, password, private key, sk) are redacted; names, paths and ids stay."""
    config = tmp_path / "kms.toml"
    config.write_text(
        f"""
[[sources]]
name = "alibaba"
provider = "alibaba"
match = ["aigw!*"]
region = "cn-hangzhou"
[sources.credentials]
type = "access_key"
access_key_id = "LTAI-visible-id"
access_key_secret = "{PLANTED}-aks"
security_token = "{PLANTED}-sts"

[[sources]]
name = "huawei"
provider = "huawei"
match = ["db-*"]
region = "cn-north-4"
project_id = "p-visible"
[sources.credentials]
type = "aksk"
ak = "AK-visible"
sk = "{PLANTED}-sk"

[[sources]]
name = "vault"
provider = "vault"
match = ["vault/*"]
address = "http://127.0.0.1:8200"
auth = "token"
token = "{PLANTED}-vault-token"

[[sources]]
name = "approle"
provider = "vault"
match = ["ar/*"]
address = "http://127.0.0.1:8200"
auth = "approle"
role_id = "role-visible"
secret_id = "{PLANTED}-secret-id"

[[sources]]
name = "local"
provider = "local"
"""
    )
    result = agent.cli("check-config", "--show", "--config", str(config))
    _no_traceback(result)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert PLANTED not in out
    shown = json.loads(out)
    creds = {s["name"]: s["options"] for s in shown["sources"]}
    assert creds["alibaba"]["credentials"]["access_key_secret"] == "[redacted]"
    assert creds["alibaba"]["credentials"]["access_key_id"] == "LTAI-visible-id"
    assert creds["huawei"]["credentials"]["sk"] == "[redacted]"
    assert creds["vault"]["token"] == "[redacted]"
    assert creds["approle"]["role_id"] == "role-visible"
    assert shown["auth"]["token_env"]  # variable names are not credentials


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_health_wait_returns_once_the_agent_is_ready(agent):
    """`health --wait S`, started before the agent, exits 0 as soon as /readyz says ready:
    what a script runs between starting the agent and its first curl."""
    agent.env["KMS_AGENT_METRICS_LISTEN"] = f"127.0.0.1:{_free_port()}"
    waiter = subprocess.Popen(
        [sys.executable, "-m", "kms_agent", "health", "--wait", "30"],
        env=agent.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        agent.start()
        out, err = waiter.communicate(timeout=40)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, err
    assert out.strip() == b"ready"


def test_health_wait_gives_up_with_one_line(agent):
    """With nothing ready before the deadline, `health --wait` exits 2 with a one-line reason."""
    result = agent.cli("health", "--wait", "0.5", "--agent", f"127.0.0.1:{_free_port()}")
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kms-agent: not ready after 0.5 s:"), lines
    assert "unreachable" in lines[0]
