"""deploy/README.md: its install and readiness commands are ones that work."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from kms_agent import cli

README = Path(__file__).resolve().parents[2] / "deploy" / "README.md"


def _commands() -> list[str]:
    text = README.read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    return lines


def test_pip_installs_from_this_repository_not_an_index():
    """No index has kms-agent: every pip install in deploy/README.md installs a local path."""
    installs = [c for c in _commands() if re.search(r"\bpip install\b", c)]
    assert installs
    for command in installs:
        parts = command.split("&&")[-1].split()
        target = parts[parts.index("install") + 1 :]
        assert all(t.startswith((".", "/")) for t in target if not t.startswith("-")), command


def test_readiness_wait_is_a_real_command():
    """The `kms-agent health --wait` it tells scripts to run parses with today's CLI."""
    waits = [c for c in _commands() if "health --wait" in c]
    assert waits
    for command in waits:
        args = cli._parser().parse_args(shlex.split(command)[1:])
        assert args.command == "health"
        assert args.wait == 30
