"""Fixtures shared by every test.

Secret values used across the suite contain ``PLANTED``; every log line written by an
in-process agent is captured, and the session fails if ``PLANTED`` or a test token ever
appears in one. End-to-end agents check their own process logs the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl

from kms_agent import logging as agent_logging
from kms_agent.config import ListenAddress, LoggingConfig
from kms_agent.errors import AgentError, SecretNotFound
from kms_agent.model import (
    ALIBABA_STAGES,
    LOCAL_NAMES,
    NameRule,
    SecretMetadata,
    SecretRecord,
    SecretValue,
    Stages,
)
from kms_agent.providers import Changed, ProviderBase
from kms_agent.state import Phase
from kms_agent.upstream import UpstreamStats

#: A marker in every secret value the tests store. It must never reach a log line.
PLANTED = "planted-" + secrets.token_hex(6)
#: The token in-process test apps accept.
TOKEN = "test-token-" + secrets.token_hex(12)

_LOG = io.StringIO()


@pytest.fixture(name="log_capture", scope="session", autouse=True)
def _log_capture() -> Iterator[io.StringIO]:
    """All in-process agent logs of the session; checked for planted secrets at the end."""
    agent_logging.configure(LoggingConfig(level="debug"), stream=_LOG)
    yield _LOG
    text = _LOG.getvalue()
    assert PLANTED not in text, "a planted secret value appeared in an agent log line"
    assert TOKEN not in text, "a caller token appeared in an agent log line"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


def make_record(
    name: str, value: str, *, version: str = "v1", source: str = "scripted"
) -> SecretRecord:
    return SecretRecord(
        name=name,
        value=SecretValue(value.encode()),
        data_type="text",
        version_id=version,
        version_stages=("ACSCurrent",),
        created=time.time(),
        source=source,
    )


@dataclass
class ScriptedProvider(ProviderBase):
    """A provider whose answers the test scripts: values, failures, a gate to stall on.

    It is a :class:`~kms_agent.providers.Provider` (mypy checks it against the protocol);
    credentials, sensitive files and ``get_as`` are :class:`ProviderBase`'s."""

    name: str = "scripted"
    name_rule: NameRule = LOCAL_NAMES
    stages: Stages = ALIBABA_STAGES
    assume_roles: frozenset[str] = frozenset()
    stats: UpstreamStats = field(default_factory=UpstreamStats)
    values: dict[str, str] = field(default_factory=dict)
    failures: dict[str, AgentError] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    version: int = 1
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_calls(self, total: int) -> None:
        """Until the provider has been called ``total`` times in all."""
        async with self._changed:
            await self._changed.wait_for(lambda: sum(self.calls.values()) >= total)

    async def open(self) -> None:
        return None

    async def get(
        self, name: str, *, version_id: str | None = None, version_stage: str | None = None
    ) -> SecretRecord:
        self.calls[name] += 1
        self.started.set()
        async with self._changed:
            self._changed.notify_all()
        if self.gate is not None:
            await self.gate.wait()
        if name in self.failures:
            raise self.failures[name]
        if name not in self.values:
            raise SecretNotFound(f"secret {name!r} does not exist")
        return make_record(name, self.values[name], version=f"v{self.version}", source=self.name)

    async def describe(self, name: str) -> SecretMetadata:
        record = await self.get(name)
        return SecretMetadata(
            name, self.name, record.created, ((record.version_id, ("ACSCurrent",)),)
        )

    async def list_names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.values if n.startswith(prefix))

    async def check(self) -> None:
        return None

    def changes(self) -> AsyncIterator[Changed] | None:
        return None

    async def close(self) -> None:
        return None

    async def fetch(self, key: tuple[str, str, str | None, str | None]) -> SecretRecord:
        """The cache's fetch function, bound to this provider."""
        return await self.get(key[1], version_id=key[2], version_stage=key[3])


def no_session() -> aiohttp.ClientSession:
    """A session factory for checks that must open none (config parsing, choosing a path)."""
    raise AssertionError("a session was asked for where none may be opened")


@pytest.fixture(name="provider")
def _provider() -> ScriptedProvider:
    return ScriptedProvider()


# --------------------------------------------------------------------------- emulators


@pytest.fixture(name="kms")
def _kms():
    """A fresh Alibaba KMS emulator (not yet serving)."""
    from tests.emulators.alibaba_kms import KmsEmulator

    return KmsEmulator()


@pytest.fixture(name="kms_url")
async def _kms_url(aiohttp_server, kms) -> str:
    """The emulator serving on 127.0.0.1: KMS, STS and ECS metadata on one base URL."""
    server = await aiohttp_server(kms.app(), host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(name="csms")
def _csms():
    """A fresh Huawei CSMS emulator (not yet serving)."""
    from tests.emulators.huawei_csms import CsmsEmulator

    return CsmsEmulator()


@pytest.fixture(name="csms_url")
async def _csms_url(aiohttp_server, csms) -> str:
    """The CSMS emulator and its ECS metadata service on one 127.0.0.1 base URL."""
    server = await aiohttp_server(csms.app(), host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}"


# --------------------------------------------------------------------------- real peers


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_until(cmd: list[str], ready: str, env: dict[str, str] | None = None):
    """Start a server and block until a line containing ``ready`` appears on its output."""
    import os
    import subprocess
    import threading

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    seen = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if ready in line:
                seen.set()
        seen.set()

    threading.Thread(target=pump, daemon=True).start()
    if not seen.wait(30) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} did not start: {''.join(lines[-20:])}")
    return proc


def _bin(name: str) -> str:
    import shutil
    import sys
    from pathlib import Path

    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (test extras)")
    return found


@pytest.fixture(name="moto", scope="session")
def _moto():
    """A moto server on 127.0.0.1 that checks SigV4 signatures and IAM policies after
    the first three calls, which create the IAM user whose keys the tests use."""
    import boto3

    port = _free_port()
    proc = _start_until(
        [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        "Running on",
        env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"},
    )
    url = f"http://127.0.0.1:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="agent")
    iam.put_user_policy(
        UserName="agent",
        PolicyName="sm",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["secretsmanager:*"], "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="agent")["AccessKey"]
    yield {"url": url, "ak": key["AccessKeyId"], "sk": key["SecretAccessKey"]}
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


@pytest.fixture(name="moto_open", scope="session")
def _moto_open():
    """A moto server that accepts any credentials (for STS exchanges)."""
    port = _free_port()
    proc = _start_until([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], "Running on")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


@pytest.fixture(name="bao", scope="session")
def _bao():
    """An OpenBao dev server on 127.0.0.1 (root token "root", KV v2 at secret/)."""
    port = _free_port()
    proc = _start_until(
        [
            _bin("bao"),
            "server",
            "-dev",
            "-dev-root-token-id=root",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        "OpenBao server started",
    )
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


# --------------------------------------------------------------------------- in-process agent


class FrontClient:
    """An aiohttp session on one in-process secrets listener (the agent's own protocol and
    pipeline over a test's state)."""

    def __init__(self, session: aiohttp.ClientSession, port: int, listeners) -> None:
        self.session = session
        self.port = port
        self.listeners = listeners

    async def get(self, path: str, **kwargs) -> aiohttp.ClientResponse:
        return await self.request("GET", path, **kwargs)

    async def request(self, method: str, path: str, **kwargs) -> aiohttp.ClientResponse:
        """``path`` is sent exactly as given (not normalised by the client)."""
        url = yarl.URL(f"http://127.0.0.1:{self.port}{path}", encoded=True)
        resp = await self.session.request(method, url, **kwargs)
        await resp.read()
        return resp


@contextlib.asynccontextmanager
async def serving(state, dialect: str = "native"):
    """``state`` served on 127.0.0.1 by a secrets listener speaking ``dialect``."""
    from kms_agent.listeners import SecretsListeners

    listeners = SecretsListeners(state)
    await listeners.start(((dialect, ListenAddress(host="127.0.0.1", port=0)),))
    port = int(listeners.addresses[0].rsplit(":", 1)[1])
    session = aiohttp.ClientSession()
    try:
        yield FrontClient(session, port, listeners)
    finally:
        await session.close()
        await listeners.stop(1.0)


@pytest.fixture(name="serve")
async def _serve():
    """``await serve(state, dialect="native")``: a FrontClient, closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def serve(state, dialect: str = "native") -> FrontClient:
            return await stack.enter_async_context(serving(state, dialect))

        yield serve


@contextlib.asynccontextmanager
async def running_agent(tmp_path, text: str = "", env=None, sources=None, loader: bool = False):
    """A started Agent from config ``text`` on 127.0.0.1 ephemeral ports, stopped after."""
    from kms_agent.agent import Agent
    from kms_agent.config import load

    path = tmp_path / "kms.toml"
    path.write_text(text)
    environ = {
        "KMS_TOKEN": TOKEN,
        "KMS_AGENT_SERVER_LISTEN": "127.0.0.1:0",
        "KMS_AGENT_METRICS_LISTEN": "127.0.0.1:0",
        "KMS_AGENT_DATA_DIR": str(tmp_path / "d"),
        # forced refreshes right after a read go upstream (coalescing is tested alone)
        "KMS_AGENT_CACHE_REFRESH_MIN_INTERVAL": "0",
        **(env or {}),
    }
    agent = Agent(
        load(path, environ=environ),
        environ=environ,
        sources=sources,
        loader=(lambda: load(path, environ=environ)) if loader else None,
    )
    await agent.start()
    try:
        yield agent
    finally:
        if agent.state.phase is not Phase.DRAINING:
            await agent.stop()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw stream: status, headers (lower-case), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


@pytest.fixture(name="tmpfs")
def _tmpfs(tmp_path):
    """A 200 KiB tmpfs (root only; CI runs as root), unmounted at the end."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=200k,mode=0700", "tmpfs", str(mnt)]
    mounted = subprocess.run(mount, capture_output=True, check=False, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def moto_source(
    moto: dict[str, Any], *, match: str = "*", endpoint: str | None = None, extra: str = ""
) -> str:
    """A ``[[sources]]`` table for an aws source over the moto fixture's server."""
    return f"""
[[sources]]
name = "aws"
provider = "aws"
region = "us-east-1"
endpoint = "{endpoint or moto["url"]}"
match = ["{match}"]
timeout_seconds = 5
{extra}
[sources.credentials]
access_key_id = "{moto["ak"]}"
secret_access_key = "{moto["sk"]}"
"""


# --------------------------------------------------------------------------- KMS instance

#: A KMS instance id in Alibaba's shape (``kst-``, a region code, then an id).
INSTANCE_ID = "kst-hzz65f1e2b3c4d5e6f7a8b"


@pytest.fixture(name="kms_instance")
def _kms_instance():
    """A fresh emulator of a KMS instance (its dedicated gateway; not yet serving)."""
    from tests.emulators.alibaba_kms import KmsEmulator

    return KmsEmulator(instance_id=INSTANCE_ID)


@pytest.fixture(name="instance_tls")
def _instance_tls(kms_instance):
    """A new CA per test (no client trusts it by accident) and a certificate for the
    instance's host name, localhost and 127.0.0.1."""
    from tests.emulators.alibaba_kms import make_instance_tls

    return make_instance_tls(kms_instance.instance_host)


def close_sdk_connections() -> None:
    """Close the connections the vendor SDKs keep in class-level pools across tests."""
    import sys

    for module, name in (("Tea.core", "TeaCore"), ("darabonba.core", "DaraCore")):
        core = getattr(sys.modules.get(module), name, None)
        sessions = getattr(core, "_sessions", {})
        for session in sessions.values():
            session.close()
        sessions.clear()


@pytest.fixture(name="kms_instance_url")
async def _kms_instance_url(aiohttp_server, kms_instance, instance_tls):
    """The instance emulator on TLS at 127.0.0.1: RAM-auth OpenAPI and dkms-gcs on ``/``."""
    server = await aiohttp_server(
        kms_instance.app(), host="127.0.0.1", ssl=instance_tls.server_context()
    )
    yield f"https://127.0.0.1:{server.port}"
    close_sdk_connections()
    # A TLS connection still open when the server stops waits for the peer's close_notify,
    # which a pooled client never sends, and outlives the test's loop: end them here.
    for handler in server.runner.server.connections:
        if handler.transport is not None:
            handler.transport.abort()


@pytest.fixture(name="instance_ca_file")
def _instance_ca_file(tmp_path, instance_tls):
    """The instance CA as a PEM file."""
    return instance_tls.write_ca(tmp_path / "instance-ca.pem")
