"""Process lifecycle: systemd notify protocol, SIGHUP reload, hardening."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


class NotifyListener:
    """A $NOTIFY_SOCKET: collects the datagrams the agent sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(15)
        self.seen: list[str] = []

    def until(self, line: str) -> list[str]:
        """Read datagrams until one carries ``line``; return the messages read meanwhile."""
        got: list[str] = []
        while True:
            msg = self.sock.recv(4096).decode()
            got.append(msg)
            self.seen.append(msg)
            if line in msg.split("\n"):
                return got


def test_systemd_notify_ready_reload_watchdog_stopping(agent_factory, tmp_path):
    """READY=1 once serving, WATCHDOG=1 at half of WATCHDOG_USEC, RELOADING=1 then READY=1
    on SIGHUP, STOPPING=1 on SIGTERM."""
    listener = NotifyListener(tmp_path / "notify.sock")
    agent = agent_factory(
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    )
    try:
        agent.start()
        listener.until("READY=1")
        assert agent.curl("/readyz")[0] == 200
        listener.until("WATCHDOG=1")
        listener.until("WATCHDOG=1")
        agent.proc.send_signal(signal.SIGHUP)
        reload_msgs = listener.until("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reload_msgs[-1].split("\n"))
        listener.until("READY=1")
        agent.proc.send_signal(signal.SIGTERM)
        listener.until("STOPPING=1")
        assert agent.stop(sig=None) == 0  # the SIGTERM above is enough
    finally:
        listener.sock.close()
    reloaded = agent.wait_for(lambda e: e.get("event") == "config_reloaded", 5)
    assert reloaded["reason"] == "sighup"


def test_core_dumps_off_and_not_dumpable(agent):
    """The running agent has RLIMIT_CORE 0 and says it made itself non-dumpable."""
    agent.start()
    limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    starting = agent.wait_for(lambda e: e.get("event") == "starting", 5)
    assert starting["core_dumps_off"] is True
    assert starting["not_dumpable"] is True


def test_harden_really_clears_the_dumpable_flag():
    """harden() leaves PR_GET_DUMPABLE at 0 (checked in a fresh interpreter)."""
    code = (
        "import ctypes, ctypes.util; from kms_agent.systemd import harden; harden();"
        "libc = ctypes.CDLL(ctypes.util.find_library('c')); print(libc.prctl(3, 0, 0, 0, 0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=30)
    assert out.stdout.strip() == b"0"


def test_health_command_and_probes_on_the_metrics_listener(agent):
    """`kms-agent health` exits 0 against a ready agent, via the metrics listener that also
    answers /healthz and /readyz (kubelet probes reach the pod IP, not loopback)."""
    agent.start()
    metrics = agent.wait_for(lambda e: e.get("event") == "ready", 1)["metrics"][0]
    ok = agent.cli("health", "--agent", metrics)
    assert (ok.returncode, ok.stdout.strip()) == (0, b"ready")
    status = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{metrics}/healthz"],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    assert status == b"200"
    agent.stop()
    down = agent.cli("health", "--agent", metrics)
    assert down.returncode == 2
