"""kms_agent_client as a package of its own: the server's defaults are its, it imports
nothing of the server, and the old import path still works."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import kms_agent_client
from kms_agent import auth, config
from kms_agent.errors import ConfigError

#: The server's dependencies, none of which the client may load.
SERVER_ONLY = (
    "kms_agent",
    "aiohttp",
    "cryptography",
    "watchfiles",
    "prometheus_client",
    "structlog",
)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_RUNTIME_DIR": "/run/user/7"},
        {"XDG_DATA_HOME": "/data/home"},
        {"XDG_DATA_HOME": "/data/home", "XDG_RUNTIME_DIR": "/run/user/7"},
        {kms_agent_client.RUNTIME_DIR_ENV: "/srv/run", "XDG_RUNTIME_DIR": "/run/user/7"},
    ],
)
def test_the_client_looks_for_the_token_where_the_agent_writes_it(env):
    """With the same environment, the client's first token file is the one an agent started
    with its defaults generates (runtime dir from the env override, XDG, or the data dir)."""
    cfg = config.load(environ=env)
    written = cfg.runtime_path / auth.TOKEN_FILE_NAME
    assert kms_agent_client.token_files(env)[0] == written


def test_the_servers_defaults_are_the_clients():
    """Address, first token header and first token variable of a config with no settings
    are what a Client() uses by default."""
    cfg = config.load(environ={"XDG_DATA_HOME": "/nonexistent"})
    assert cfg.server.listen == (kms_agent_client.DEFAULT_ADDRESS,)
    assert cfg.auth.headers[0] == kms_agent_client.DEFAULT_HEADER
    assert cfg.auth.token_env[0] == kms_agent_client.TOKEN_ENV


def test_an_empty_listener_list_names_the_default_address():
    """The error for no listener at all suggests the default address, as the client uses."""
    with pytest.raises(ConfigError, match=re.escape(f'like "{kms_agent_client.DEFAULT_ADDRESS}"')):
        config.load(environ={"XDG_DATA_HOME": "/nonexistent"}, overrides={"server": {"listen": []}})


def test_importing_the_client_loads_nothing_of_the_server():
    """A fresh interpreter that imports kms_agent_client has loaded no server module."""
    names = ", ".join(repr(n) for n in SERVER_ONLY)
    code = (
        "import json, sys, kms_agent_client\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ({names},))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, timeout=60, text=True
    )
    assert json.loads(out.stdout) == []


def test_the_old_import_path_is_the_same_client():
    """`from kms_agent.client import ...` (kept for old imports) gives the package's objects."""
    from kms_agent import client as old

    for name in kms_agent_client.__all__:
        assert getattr(old, name) is getattr(kms_agent_client, name), name
    assert old.Client is kms_agent_client.Client
