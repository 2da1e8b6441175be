"""README.md's ```sh and ```python blocks run as pasted, in order, against a real agent.

The README is read as a reader would use it: in the repository's directory, with the agent
installed in ``.venv`` and started by ``.venv/bin/kms-agent run`` (its first block). Here
``.venv`` is a symlink to this interpreter's venv in a temporary directory, HOME and the XDG
dirs are temporary, and the agent is started by the test.

Markers, HTML comments on the lines just above a block's opening fence:

* ``<!-- not-run: REASON -->``: the block is not run (only installs may be, besides the
  README's first two blocks, the set-up commands, which are never run here).
* ``<!-- prints: TEXT -->``: the block's standard output shows TEXT, after what the marker
  before it matched (two equal markers: TEXT twice).

A block is run with ``bash -e -o pipefail`` (Python blocks with ``.venv/bin/python``) and
must exit 0. Blocks that start no server of their own run in document order against one
agent; a block that starts servers in the background (a line ending in ``&``) runs alone,
without that agent, and everything it started is stopped when it ends. The README's
addresses are fixed (127.0.0.1:2025 and others), so every run gets a network namespace of
its own when one can be made (as root); elsewhere those ports must be free, or the test
skips saying which is taken.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_agent.config import DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN
from tests.conftest import PLANTED
from tests.e2e.conftest import AgentProcess

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUNS = ("sh", "python")
BLOCK_TIMEOUT = 120.0
_MARKER = re.compile(r"<!--\s*(not-run|prints):\s*(.*?)\s*-->")
_FENCE = re.compile(r"```(\S*)\s*$")
_BACKGROUND = re.compile(r"(?<!&)&\s*$")
_PORT = re.compile(r"(?:127\.0\.0\.1|localhost):(\d+)")
#: Kills a block's background jobs when it ends, and waits for them.
_EPILOGUE = "trap 'j=$(jobs -p); [ -z \"$j\" ] || kill $j 2>/dev/null || true; wait' EXIT\n"


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced block of README.md."""

    line: int  # of its opening fence, 1-based
    lang: str
    code: str
    not_run: str | None
    prints: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"

    @property
    def starts_servers(self) -> bool:
        return any(_BACKGROUND.search(line) for line in self.code.splitlines())


def parse(text: str) -> list[Block]:
    """Every fenced block with the markers on the lines just above it."""
    blocks: list[Block] = []
    markers: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.fullmatch(line.strip())
        fence = _FENCE.fullmatch(line)
        if marker:
            markers.append((marker[1], marker[2]))
        elif fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            not_run = [reason for kind, reason in markers if kind == "not-run"]
            blocks.append(
                Block(
                    line=i + 1,
                    lang=fence[1],
                    code="\n".join(lines[i + 1 : end]) + "\n",
                    not_run=not_run[0] if not_run else None,
                    prints=tuple(t for kind, t in markers if kind == "prints"),
                )
            )
            markers = []
            i = end
        elif line.strip() and markers:
            raise AssertionError(f"README.md:{i + 1}: a marker that no block follows: {markers}")
        i += 1
    return blocks


#: The README's first two blocks are the set-up commands (install and run the agent;
#: install the test extras and run the suite): the test starts that agent itself, and
#: .ci/run runs the second on a clean clone.
SETUP_REASON = "a set-up command: this test starts its agent, and .ci/run runs the suite"
BLOCKS = [
    Block(b.line, b.lang, b.code, SETUP_REASON, b.prints) if i < 2 else b
    for i, b in enumerate(parse(README.read_text(encoding="utf-8")))
]
MARKED = [b for b in BLOCKS if b.not_run is not None or b.prints]
NOT_RUN = [b for b in BLOCKS if b.lang in RUNS and b.not_run is not None]
IN_ORDER = [b for b in BLOCKS if b.lang in RUNS and b.not_run is None and not b.starts_servers]
ALONE = [b for b in BLOCKS if b.lang in RUNS and b.not_run is None and b.starts_servers]


# --------------------------------------------------------------------------- where blocks run


@contextlib.contextmanager
def _namespace() -> Iterator[list[str] | None]:
    """A network namespace with only loopback up, held open by a process: yields the argv
    prefix that runs a command inside it, or None when none can be made (not root, no
    unshare/nsenter/ip)."""
    tools = ("unshare", "nsenter", "ip")
    if os.geteuid() != 0 or not all(shutil.which(t) for t in tools):
        yield None
        return
    holder = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        up = holder.stdout.readline().strip() == "up"
        yield ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"] if up else None
    finally:
        holder.stdin.close()  # cat ends, and the namespace with it
        holder.wait(10)
        holder.stdout.close()


def _busy_port(blocks: list[Block]) -> int | None:
    """The first port the blocks name, or an agent with its defaults listens on, that
    something here listens on."""
    defaults = (DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN)
    named = [p for b in blocks for p in _PORT.findall(b.code)]
    ports = sorted({int(p) for p in named} | {int(a.rsplit(":", 1)[1]) for a in defaults})
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return port
    return None


@contextlib.contextmanager
def _place(blocks: list[Block]) -> Iterator[list[str]]:
    """The argv prefix the blocks run under: a namespace of their own, or this host when
    the ports they name are free here (else the test skips)."""
    with _namespace() as prefix:
        if prefix is None:
            busy = _busy_port(blocks)
            if busy is not None:
                pytest.skip(
                    f"127.0.0.1:{busy}, which the README uses, is taken here, and no network "
                    "namespace can be made (needs root, unshare, nsenter and ip)"
                )
        yield prefix or []


@dataclass
class Workdir:
    """A temporary repository directory (``.venv`` is this interpreter's venv) and the agent
    environment under ``root`` that its blocks run in."""

    path: Path
    root: Path

    def agent(self, prefix: list[str]) -> AgentProcess:
        """The agent as the README's first block starts it, with this environment (its
        metrics on their default address too, where `kms-agent health` looks)."""
        kms_agent = str(self.path / ".venv" / "bin" / "kms-agent")
        agent = AgentProcess(self.root, {"HOME": str(self.root / "home")}, [*prefix, kms_agent])
        del agent.env["KMS_AGENT_METRICS_LISTEN"]
        return agent

    @property
    def env(self) -> dict[str, str]:
        # pip kept off the index: a block's pip install may only find what is installed
        return {**self.agent([]).env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def run(self, block: Block, prefix: list[str]) -> tuple[int, str, str]:
        """Run one block there; its exit code, standard output and standard error."""
        n = block.line
        if block.lang == "python":
            script = self.path / f"block-{n}.py"
            script.write_text(block.code)
            argv = [*prefix, str(self.path / ".venv" / "bin" / "python"), script.name]
        else:
            script = self.path / f"block-{n}.sh"
            script.write_text(_EPILOGUE + block.code)
            argv = [*prefix, "bash", "-e", "-o", "pipefail", script.name]
        out, err = self.path / f"block-{n}.out", self.path / f"block-{n}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:  # files: servers keep pipes open
            proc = subprocess.Popen(
                argv,
                cwd=self.path,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            try:
                code = proc.wait(BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = -1
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever the block left behind
                proc.wait(10)
        return code, out.read_text(errors="replace"), err.read_text(errors="replace")


def _check(block: Block, code: int, out: str, err: str) -> None:
    shown = f"{block.where} ({block.lang}) exited {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert code == 0, shown
    assert "Traceback" not in out + err, shown
    rest = out
    for text in block.prints:
        at = rest.find(text)
        assert at >= 0, f"{block.where} did not print {text!r} (in order)\n{shown}"
        rest = rest[at + len(text) :]


@pytest.fixture(name="workdir")
def _workdir(tmp_path) -> Workdir:
    """The temporary repository directory, and the environment the blocks run in: a
    temporary HOME and XDG dirs, no KMS_AGENT_* or token variables."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    if sys.prefix == sys.base_prefix or not (Path(sys.prefix) / "bin" / "kms-agent").exists():
        pytest.skip("the README's blocks call .venv/bin/...: run the tests from the agent's venv")
    work = tmp_path / "repo"
    work.mkdir()
    (work / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (tmp_path / "home").mkdir()
    return Workdir(work, tmp_path)


# --------------------------------------------------------------------------- the tests


def test_the_readme_has_blocks_of_each_kind_and_markers_only_on_them():
    """The parser finds shell and Python blocks to run, at least one server block, a reason
    on every not-run block, and markers only above blocks this test runs; no command hides
    in an indented code block, where it would not see it."""
    setup = BLOCKS[:2]
    assert [b.line for b in setup] == [5, 11], "the README opens with its two set-up commands"
    assert "kms-agent run" in setup[0].code and "pytest" in setup[1].code
    assert any(b.lang == "sh" for b in IN_ORDER)
    assert any(b.lang == "python" for b in IN_ORDER)
    assert ALONE
    for block in MARKED:
        assert block.lang in RUNS, f"{block.where}: markers on a {block.lang!r} block"
    for block in NOT_RUN:
        assert block.not_run, f"{block.where}: not-run needs a reason"
        assert not block.prints, f"{block.where}: prints on a block that is not run"
    outside, fenced = [], False
    for n, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    ") and line.strip():
            outside.append(n)
    assert outside == [], f"indented code blocks at README.md lines {outside}: fence them"


def test_blocks_not_run_are_the_set_up_commands_and_installs():
    """The blocks this test does not run are the two set-up commands and installs into an
    application's venv (run by test_client_dist), each with its reason."""
    assert NOT_RUN[:2] == BLOCKS[:2]
    for block in NOT_RUN[2:]:
        assert "pip install" in block.code, f"{block.where}: only installs may go unrun"
        assert block.not_run, f"{block.where}: not-run needs a reason"


def test_blocks_run_in_order_against_the_agent(workdir):
    """Every block that starts no server exits 0 and prints what its markers say, run in
    document order against `.venv/bin/kms-agent run` (default address, generated token);
    the agent's log shows no traceback, token or planted value."""
    with _place(IN_ORDER) as prefix:
        agent = workdir.agent(prefix)
        try:
            agent.start(listen=None)
            assert agent.address == DEFAULT_LISTEN
            for block in IN_ORDER:
                _check(block, *workdir.run(block, prefix))
        finally:
            if agent.proc is not None:
                agent.stop()
    log = "\n".join(agent.lines)
    assert "Traceback" not in log, log[-3000:]
    assert PLANTED not in log
    assert agent.token and agent.token not in log


@pytest.mark.parametrize("block", ALONE, ids=[b.where for b in ALONE])
def test_block_that_starts_its_own_servers(workdir, block):
    """A block that starts servers in the background exits 0 and prints what its markers
    say; all it started is stopped when it ends. It needs the tools it calls from .venv/bin
    (the test extras)."""
    for tool in sorted(set(re.findall(r"\.venv/bin/([\w.-]+)", block.code))):
        if not (workdir.path / ".venv" / "bin" / tool).exists():
            pytest.skip(f"{block.where} calls .venv/bin/{tool}, not installed here (test extras)")
    with _place([block]) as prefix:
        _check(block, *workdir.run(block, prefix))
