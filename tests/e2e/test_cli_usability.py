"""What a new user meets first at the command line: options, hints, output streams."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kms_agent import cli
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


# --------------------------------------------------------------------------- store faults


def _fill(mnt):
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (4096, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def test_cli_on_a_full_then_read_only_disk(agent, tmpfs):
    """store put on a full disk, first and later, and on a read-only one: exit 1 with the
    file and what to do, no traceback; nothing stored before is lost."""
    data = str(tmpfs / "data")
    filler = _fill(tmpfs)
    first = agent.cli("store", "put", "a", "--data-dir", data, stdin=PLANTED.encode())
    _no_traceback(first)
    assert first.returncode == 1
    assert b"keys/default.json: the disk is full" in first.stderr, first.stderr
    filler.unlink()
    assert (
        agent.cli("store", "put", "a", "--data-dir", data, stdin=PLANTED.encode()).returncode == 0
    )
    filler = _fill(tmpfs)
    later = agent.cli("store", "put", "b", "--data-dir", data, stdin=PLANTED.encode() * 100)
    _no_traceback(later)
    assert later.returncode == 1
    assert b"the disk is full" in later.stderr and b"hint:" in later.stderr
    assert agent.cli("store", "get", "a", "--data-dir", data).stdout == PLANTED.encode()
    filler.unlink()
    ro = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, check=False)
    if ro.returncode != 0:
        pytest.skip(f"cannot remount read-only: {ro.stderr.decode().strip()}")
    refused = agent.cli("store", "put", "b", "--data-dir", data, stdin=b"x")
    _no_traceback(refused)
    assert refused.returncode == 1
    assert b"read-only" in refused.stderr
    assert agent.cli("store", "list", "--data-dir", data).stdout == b"a\n"


def _cli_as_nobody(argv: list[str]) -> tuple[int, str]:
    """cli.main in a forked child that switched to uid 65534 first: (exit code, stderr).
    Forked, not exec'd: that user may not be able to reach this venv's interpreter."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            sys.stderr = open(write_end, "w", encoding="utf-8")  # noqa: SIM115
            os.setuid(65534)
            code = cli.main(argv, environ={})
            sys.stderr.flush()
        except BaseException as exc:
            print(f"Traceback: {exc!r}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    os.close(write_end)
    with open(read_end, encoding="utf-8") as fh:
        err = fh.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_cli_as_a_user_who_may_not_read_the_key(agent, tmp_path):
    """A store the CLI's user may not read (a real EACCES: uid 65534 on a root-owned 0600
    key) is one line naming the key file and what to do, not a PermissionError."""
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    root = Path(tempfile.mkdtemp(prefix="kms-eacces-"))
    try:
        data = root / "data"
        assert agent.cli("store", "put", "a", "--data-dir", str(data), stdin=b"v").returncode == 0
        for path in (root, data, data / "keys", data / "secrets"):
            path.chmod(0o755)
        for argv, names in (
            (["store", "get", "a"], f"cannot read store file {data}/secrets/"),
            (["store", "key", "list"], f"cannot read the store key {data}/keys/default.json"),
        ):
            code, err = _cli_as_nobody([*argv, "--data-dir", str(data)])
            assert "Traceback" not in err, err
            assert code == 1, err
            assert names in err and ": permission denied" in err, err
            assert "hint: run kms-agent as the store's owner" in err
    finally:
        shutil.rmtree(root)


def test_agent_with_an_unreadable_key_exits_with_one_line(agent):
    """The agent does not start on a key it cannot read: exit 1 naming the file, no traceback."""
    data = agent.root / "store"
    assert agent.cli("store", "put", "a", "--data-dir", str(data), stdin=b"v").returncode == 0
    key = data / "keys" / "default.json"
    key.unlink()
    key.mkdir()
    result = agent.cli("run", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    _no_traceback(result)
    assert result.returncode == 1
    assert f"cannot read the store key {key}".encode() in result.stderr, result.stderr


def test_one_unreadable_secret_file_spoils_no_listing(agent):
    """A secret file that cannot be read: `store list` and GET /secrets list the others."""
    for name in ("a", "b", "c"):
        agent.cli("store", "put", name, stdin=PLANTED.encode())
    secrets_dir = agent.root / "data" / "kms-agent" / "secrets"
    victim = secrets_dir / f"{hashlib.sha256(b'b').hexdigest()}.json"
    victim.unlink()
    victim.mkdir()
    listed = agent.cli("store", "list")
    _no_traceback(listed)
    assert (listed.returncode, listed.stdout) == (0, b"a\nc\n")
    assert b"store_file_skipped" in listed.stderr
    agent.start()
    status, body = agent.curl("/secrets")
    assert status == 200, body
    assert "b" not in json.dumps(json.loads(body)).replace('"names"', "")
    status, body = agent.curl("/secrets/b")
    assert status == 500
    assert json.loads(body)["error"]["code"] == "StoreIOError"
