"""Run ``kms-agent`` as a real process and talk to it with curl, as an app container does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kms_agent.config import DEFAULT_TOKEN_ENV
from tests.conftest import PLANTED

START_TIMEOUT = 20.0


class AgentProcess:
    """One ``kms-agent run`` process with its own data and runtime dirs. ``command`` is how
    ``kms-agent`` is started (by default this interpreter's ``-m kms_agent``)."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str] | None = None,
        command: Sequence[str] = (sys.executable, "-m", "kms_agent"),
    ) -> None:
        self.root = root
        self.command = list(command)
        base = {k: v for k, v in os.environ.items() if not k.startswith("KMS_AGENT_")}
        for var in DEFAULT_TOKEN_ENV:
            base.pop(var, None)
        self.env = {
            **base,
            "XDG_DATA_HOME": str(root / "data"),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "KMS_AGENT_METRICS_LISTEN": "127.0.0.1:0",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    # ---------------------------------------------------------------- process

    def cli(self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None):
        """Run a ``kms-agent`` command with this agent's environment."""
        return subprocess.run(
            [*self.command, *args],
            input=stdin,
            capture_output=True,
            env={**self.env, **(env or {})},
            timeout=60,
            check=False,
        )

    def start(self, *args: str, listen: str | None = "127.0.0.1:0") -> AgentProcess:
        """Start ``run`` (with ``--listen`` unless ``listen`` is None) and wait until ready."""
        self.proc = subprocess.Popen(
            [*self.command, *args, "run", *(("--listen", listen) if listen else ())],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._pumper = threading.Thread(target=self._pump, daemon=True)
        self._pumper.start()
        ready = self.wait_for(lambda e: e.get("event") == "ready", START_TIMEOUT)
        self.address = ready["listen"][0]
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0
    ) -> dict[str, Any]:
        """Block until a JSON log line after index ``start`` satisfies ``pred``."""
        seen = start

        def check() -> dict[str, Any] | None:
            nonlocal seen
            while seen < len(self.lines):
                line = self.lines[seen]
                seen += 1
                try:
                    event: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue
                if pred(event):
                    return event
            return None

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = check()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._cond.wait(remaining)
        tail = "\n".join(self.lines[-30:])
        raise AssertionError(f"agent log never showed the awaited event; last lines:\n{tail}")

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the agent (unless ``sig`` is None) and wait for its exit code."""
        assert self.proc is not None
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._pumper.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    # ---------------------------------------------------------------- client

    @property
    def token(self) -> str:
        """The generated token, or $KMS_TOKEN; empty when the agent uses token files."""
        if self.env.get("KMS_TOKEN"):
            return self.env["KMS_TOKEN"]
        path = self.root / "run" / "kms-agent" / "token"
        return path.read_text().strip() if path.exists() else ""

    def curl(self, path: str, *args: str, token: str | None = None, header: str = "X-KMS-Token"):
        """(status, body bytes) of ``curl`` against the agent."""
        cmd = ["curl", "-s", "-g", "-o", "-", "-w", "\n%{http_code}"]
        if token is None:
            token = self.token
        if token:
            cmd += ["-H", f"{header}: {token}"]
        cmd += [*args, f"http://{self.address}{path}"]
        out = subprocess.run(cmd, capture_output=True, timeout=30, check=True).stdout
        body, _, status = out.rpartition(b"\n")
        return int(status), body


@pytest.fixture(name="agent_factory")
def _agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    made: list[AgentProcess] = []

    def make(env: dict[str, str] | None = None, name: str = "a") -> AgentProcess:
        agent = AgentProcess(tmp_path / name, env)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        if agent.proc is not None:
            agent.stop()
        log = "\n".join(agent.lines)
        assert PLANTED not in log, "a planted secret value reached the agent's log"
        if agent.token:
            assert agent.token not in log, "the caller token reached the agent's log"
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture(name="agent")
def _agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    """An agent with no config at all, as after the README's first command."""
    return agent_factory()
