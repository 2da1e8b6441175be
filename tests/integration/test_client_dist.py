"""kms-agent-client installed alone, as an application installs it: a fresh venv gets the
client and httptools and none of the server's dependencies, reads secrets from a running
agent, and type-checks against the package's own hints (py.typed).

Slow-ish (marked ``slow``): one venv and one ``pip install ./client`` from the package index
for the module, about 20 s; part of the normal suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kms_agent.store import LocalStore
from tests.conftest import PLANTED, TOKEN, running_agent

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: Distributions the server needs and an application reading secrets must not get.
SERVER_ONLY = ("aiohttp", "cryptography", "watchfiles", "prometheus-client", "structlog")


def _env() -> dict[str, str]:
    """This environment without anything that would put the repository on the path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(name="venv_python", scope="module")
def _venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv into which only ``pip install <copy of client/>`` went."""
    root = tmp_path_factory.mktemp("client-dist")
    source = root / "client"  # a copy: the build leaves nothing in the checkout
    shutil.copytree(
        ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=_env())
    python = venv / "bin" / "python"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        check=False,
    )
    assert pip.returncode == 0, f"pip install ./client failed:\n{pip.stdout}\n{pip.stderr}"
    return python


def _run(python: Path, code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in the venv's interpreter, isolated (no cwd, no PYTHONPATH, no user site)."""
    return subprocess.run(
        [str(python), "-I", "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        cwd=cwd,
        check=False,
    )


INSPECT = """
import importlib.metadata as md, importlib.util, json
import kms_agent_client
files = md.files("kms-agent-client") or []
print(json.dumps({
    "dists": sorted(d.metadata["Name"].lower() for d in md.distributions()),
    "requires": md.requires("kms-agent-client"),
    "typed": any(str(f).endswith("kms_agent_client/py.typed") for f in files),
    "server_importable": importlib.util.find_spec("kms_agent") is not None,
    "client_file": kms_agent_client.__file__,
}))
"""


def test_the_client_installs_alone_with_httptools_only(venv_python, tmp_path):
    """The venv holds kms-agent-client and httptools, none of the server's dependencies;
    kms_agent is not importable there; the installed package carries py.typed."""
    listed = subprocess.run(
        [str(venv_python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=True,
    )
    pip_names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"kms-agent-client", "httptools"} <= pip_names
    out = _run(venv_python, INSPECT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    for name in SERVER_ONLY:
        assert name not in pip_names and name not in seen["dists"], name
    assert "kms-agent" not in seen["dists"]
    assert seen["requires"] == ["httptools>=0.6"]
    assert seen["typed"]
    assert not seen["server_importable"]
    assert seen["client_file"].startswith(str(venv_python.parents[1]))


READ = """
import json, sys
from kms_agent_client import Client, ClientError
address, name = sys.argv[1:]
with Client(address) as agent:  # the token from $KMS_TOKEN
    value = agent.get_text(name)
    field = agent.get_json(name + "-json")["password"]
    try:
        agent.get("no-such-secret")
    except ClientError as exc:
        missing = [exc.status, exc.code, exc.not_found, str(exc)]
print(json.dumps({"value": value, "field": field, "missing": missing}))
"""


async def test_the_alone_client_reads_from_a_running_agent(venv_python, tmp_path):
    """From the fresh venv, Client() reads a stored secret and a JSON one from a running
    agent, and a missing secret is a ClientError 404 SecretNotFound."""
    local = LocalStore(tmp_path / "d")
    local.init()
    local.put("db-password", PLANTED.encode())
    local.put("db-password-json", json.dumps({"password": PLANTED + "-j"}).encode())
    async with running_agent(tmp_path) as agent:
        proc = await asyncio.create_subprocess_exec(
            str(venv_python),
            "-I",
            "-c",
            READ,
            agent.addresses[0],
            "db-password",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**_env(), "KMS_TOKEN": TOKEN},
            cwd=tmp_path,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    got = json.loads(stdout)
    assert got["value"] == PLANTED
    assert got["field"] == PLANTED + "-j"
    status, code, not_found, message = got["missing"]
    assert (status, code, not_found) == (404, "SecretNotFound", True)
    assert TOKEN not in message


TYPED = """
from kms_agent_client import Client, ClientError

agent = Client(token="t" * 32)
reveal_type(agent.get("x"))
reveal_type(agent.get_text("x", version_stage="ACSPrevious"))
reveal_type(ClientError("m").not_found)
count: int = agent.get("x")
"""


def test_the_installed_client_is_typed(venv_python, tmp_path):
    """mypy, told to use the fresh venv, takes the package's own hints: it knows get()
    returns bytes and flags assigning it to an int (no "missing stubs" complaint)."""
    pytest.importorskip("mypy", reason="mypy is in the test extras")
    (tmp_path / "app.py").write_text(TYPED)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            f"--python-executable={venv_python}",
            "app.py",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=tmp_path,
        check=False,
    )
    text = out.stdout + out.stderr
    assert "missing library stubs or py.typed" not in text, text
    revealed = re.findall(r'Revealed type is "(?:builtins\.)?(\w+)"', text)
    assert revealed == ["bytes", "str", "bool"], text
    assert 'Incompatible types in assignment (expression has type "bytes"' in text, text
    assert out.returncode == 1  # that one error, on purpose
