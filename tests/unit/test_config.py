"""Configuration loading: defaults, precedence, strictness, and the documented example."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from kms_agent import cli
from kms_agent.config import DEFAULT_TTL, PROVIDERS, SOURCE_KEYS, field_docs, load, source_config
from kms_agent.errors import ConfigError
from kms_agent.providers.options import PROVIDERS as SOURCE_OPTIONS
from kms_agent.providers.options import AlibabaOptions, AwsOptions

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "tests" / "fixtures" / "invalid-configs").glob("*.toml"))


def test_defaults_need_no_file(tmp_path):
    """With no file and no env, the agent serves the local store on loopback."""
    cfg = load(environ={"XDG_DATA_HOME": str(tmp_path)})
    assert cfg.server.listen == ("127.0.0.1:2025",)
    assert [(d, str(a)) for d, a in cfg.server.listeners] == [("native", "127.0.0.1:2025")]
    assert cfg.cache.ttl == DEFAULT_TTL
    assert [(s.name, s.provider, s.match) for s in cfg.sources] == [("local", "local", ("*",))]
    assert cfg.data_dir == str(tmp_path / "kms-agent")
    assert cfg.runtime_dir == cfg.data_dir


def test_runtime_dir_follows_xdg_runtime_dir(tmp_path):
    """$XDG_RUNTIME_DIR/kms-agent holds the token when set."""
    cfg = load(environ={"XDG_DATA_HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/7"})
    assert cfg.runtime_dir == "/run/user/7/kms-agent"


def test_precedence_file_then_env_then_flags(tmp_path):
    """The env overrides the file; CLI overrides beat both."""
    path = tmp_path / "c.toml"
    path.write_text('[cache]\nttl = "2m"\nmax_entries = 10\n[server]\nlisten = "127.0.0.1:1"\n')
    env = {"KMS_AGENT_CACHE_MAX_ENTRIES": "20", "KMS_AGENT_SERVER_LISTEN": "127.0.0.1:2"}
    cfg = load(path, environ=env, overrides={"server": {"listen": "127.0.0.1:3"}})
    assert cfg.cache.ttl == 120
    assert cfg.cache.max_entries == 20
    assert cfg.server.listen == ("127.0.0.1:3",)
    assert cfg.path == str(path)


def test_listeners_each_speak_a_dialect(tmp_path):
    """server.listen takes one address or a list, each ``[DIALECT@]ADDRESS``; an unknown
    dialect is named with the ones allowed."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:2025", "aws@127.0.0.1:2773", '
        '"vault@127.0.0.1:8200", "kms@unix:/run/kms.sock"]\n'
    )
    cfg = load(path, environ={})
    assert [(d, str(a)) for d, a in cfg.server.listeners] == [
        ("native", "127.0.0.1:2025"),
        ("aws", "127.0.0.1:2773"),
        ("vault", "127.0.0.1:8200"),
        ("kms", "unix:/run/kms.sock"),
    ]
    env = {"KMS_AGENT_SERVER_LISTEN": "aws@127.0.0.1:1,127.0.0.1:2"}
    assert [d for d, _ in load(environ=env).server.listeners] == ["aws", "native"]
    with pytest.raises(ConfigError, match="names no dialect; use one of native, aws, kms, vault"):
        load(environ={"KMS_AGENT_SERVER_LISTEN": "grpc@127.0.0.1:1"})
    with pytest.raises(ConfigError, match=r"server.listen\[1\]: '10.0.0.1:1' is not a loopback"):
        load(environ={"KMS_AGENT_SERVER_LISTEN": "127.0.0.1:1,10.0.0.1:1"})


def test_config_path_from_env(tmp_path):
    """$KMS_AGENT_CONFIG names the file when --config is not given."""
    path = tmp_path / "c.toml"
    path.write_text("[logging]\nlevel = 'debug'\n")
    assert load(environ={"KMS_AGENT_CONFIG": str(path)}).logging.level == "debug"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KMS_AGENT_CACHE_TTL": "soon"},
            r"cache.ttl \(from \$KMS_AGENT_CACHE_TTL\): 'soon' is not a duration",
        ),
        ({"KMS_AGENT_SERVER_ALLOW_NON_LOOPBACK": "maybe"}, "is not a boolean"),
        ({"KMS_AGENT_CACHE_MAX_ENTRIES": "1.5"}, "is not a whole number"),
        ({"KMS_AGENT_CACHE_TLL": "5"}, r"\$KMS_AGENT_CACHE_TLL: unknown setting"),
    ],
)
def test_bad_env_values_name_the_variable(env, message):
    """Errors from the environment name the variable and the key it sets."""
    with pytest.raises(ConfigError, match=message):
        load(environ=env)


def test_env_lists_and_booleans():
    """Lists from env are comma-separated; booleans accept true/false/1/0."""
    cfg = load(
        environ={
            "KMS_AGENT_CACHE_PREFETCH": "a, b!c ,",
            "KMS_AGENT_LOGGING_ACCESS_LOG": "0",
            "KMS_AGENT_SERVER_ALLOW_NON_LOOPBACK": "true",
            "KMS_AGENT_SERVER_LISTEN": "0.0.0.0:2025",
        }
    )
    assert cfg.cache.prefetch == ("a", "b!c")
    assert cfg.logging.access_log is False
    assert cfg.server.address.host == "0.0.0.0"


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_config_files_fail_check_config_naming_the_key(path, capsys):
    """Each invalid fixture fails `check-config` with exit 2 and the expected message."""
    expected = re.match(r"# expect: (.*)", path.read_text())
    assert expected, f"{path.name} has no '# expect:' first line"
    expect = expected.group(1)
    code = cli.main(["--config", str(path), "check-config"], environ={})
    err = capsys.readouterr().err
    assert code == 2
    assert expect in err
    assert "Traceback" not in err


def test_check_config_accepts_the_example_and_shows_it(capsys):
    """config.example.toml is valid; --show prints the effective values."""
    code = cli.main(
        ["--config", str(ROOT / "config.example.toml"), "check-config", "--show"], environ={}
    )
    out = capsys.readouterr().out
    assert code == 0
    assert '"listen": [\n      "127.0.0.1:2025"\n    ]' in out


def test_missing_config_file_is_named(capsys):
    """A --config path that does not exist is reported, not a traceback."""
    assert cli.main(["--config", "/nonexistent/kms.toml", "check-config"], environ={}) == 2
    assert "/nonexistent/kms.toml" in capsys.readouterr().err


def test_example_documents_every_key_with_its_default():
    """Every setting appears in config.example.toml with its default value."""
    text = (ROOT / "config.example.toml").read_text()
    sections: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        if m := re.fullmatch(r"\[([\w.]+)\]", line):
            current = m.group(1)
        elif m := re.fullmatch(r"# (\w+) = (.*)", line):
            sections[f"{current}.{m.group(1)}" if current else m.group(1)] = m.group(2)
    for dotted, default in field_docs().items():
        assert dotted in sections, f"{dotted} is not documented in config.example.toml"
        if dotted in ("data_dir", "runtime_dir"):
            continue
        shown = tomllib.loads(f"x = {sections[dotted]}")["x"]
        expected = list(default) if isinstance(default, tuple) else default
        assert shown == expected, f"{dotted}: documented {shown!r}, default {default!r}"


def test_unix_listen_address():
    """unix:/path is accepted as a loopback-only listener."""
    cfg = load(environ={"KMS_AGENT_SERVER_LISTEN": "unix:/run/kms-agent/agent.sock"})
    assert cfg.server.address.unix_path == "/run/kms-agent/agent.sock"
    assert cfg.server.address.is_loopback


def _source_file(tmp_path: Path, provider: str, settings: str) -> Path:
    path = tmp_path / "kms.toml"
    path.write_text(f'[[sources]]\nname = "s"\nprovider = "{provider}"\n{settings}\n')
    return path


@pytest.mark.parametrize(
    ("provider", "settings", "message"),
    [
        ("aws", "region = 5", r"sources\.s\.region: 5 is not a string"),
        (
            "vault",
            'auth = "ldap"',
            r"sources\.s\.auth: 'ldap' is not allowed; use one of 'token', 'approle', 'kubernetes'",
        ),
        (
            "alibaba",
            'region = "cn-hangzhou"\ngateway = "private"',
            r"sources\.s\.gateway: 'private' is not allowed; use one of 'shared', 'dedicated'",
        ),
        ("huawei", "timeout_seconds = true", r"sources\.s\.timeout_seconds: True is not a number"),
        ("vault", "max_attempts = 2.5", r"sources\.s\.max_attempts: 2\.5 is not a whole number"),
        (
            "huawei",
            'endpoints = "https://kms.example"',
            r"sources\.s\.endpoints: 'https://kms\.example' is not a list of strings",
        ),
        (
            "alibaba",
            'region = "cn-hangzhou"\naccount_id = 1.5',
            r"sources\.s\.account_id: 1\.5 is not a string or a whole number",
        ),
        (
            "aws",
            'region = "us-east-1"\nassume_roles = ["reader"]',
            r"sources\.s\.assume_roles\[0\]: 'reader' is not a role ARN",
        ),
        (
            "alibaba",
            'region = "cn-hangzhou"\nrate_limit_qps = 0',
            r"sources\.s\.rate_limit_qps: 0 must be above 0 and at most 450",
        ),
        (
            "vault",
            'auth = "approle"\nrole_id = "r"',
            r"sources\.s: approle auth needs role_id and secret_id",
        ),
        ("alibaba", 'auth = "client_key"\nregion = "x"', r"sources\.s\.auth: \"client_key\""),
        ("huawei", 'project_id = "p"', r"sources\.s\.region: give the region"),
        ("local", 'path = ""', r"sources\.s\.path: '' is not a directory path"),
    ],
)
def test_a_bad_source_setting_fails_the_load_naming_its_key(
    tmp_path: Path, provider: str, settings: str, message: str
) -> None:
    """A source's provider settings are checked when the config loads, like every other
    section: a wrong type, a value outside a choice or a bound, or settings that do not go
    together is an error naming sources.NAME.KEY (not left for the provider to find)."""
    with pytest.raises(ConfigError, match=f"^{message}"):
        load(_source_file(tmp_path, provider, settings), environ={})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_unknown_source_setting_lists_what_its_provider_takes(
    tmp_path: Path, provider: str
) -> None:
    """A key no provider setting has is refused, and the message lists what this
    provider's table takes: its options class's fields and the source's own keys."""
    with pytest.raises(ConfigError) as info:
        load(_source_file(tmp_path, provider, "regoin = 1"), environ={})
    prefix = "sources.s.regoin: unknown setting; allowed here: "
    assert info.value.message.startswith(prefix)
    allowed = info.value.message.removeprefix(prefix).split(", ")
    takes = {f.name for f in fields(SOURCE_OPTIONS[provider])}
    assert set(allowed) == takes | set(SOURCE_KEYS)
    assert allowed == sorted(allowed)
    assert ("rate_limit_qps" in allowed) == (provider != "local")
    assert ("assume_roles" in allowed) == (provider == "aws")


def test_a_credentials_setting_that_is_not_a_table_is_not_echoed(tmp_path: Path) -> None:
    """``credentials`` must be a table; a string there (maybe a key pasted in the wrong
    place) is refused by its type, its value not repeated."""
    settings = 'region = "cn-hangzhou"\ncredentials = "LTAI-not-echoed"'
    with pytest.raises(ConfigError, match=r"^sources\.s\.credentials: expected a table") as info:
        load(_source_file(tmp_path, "alibaba", settings), environ={})
    assert "LTAI-not-echoed" not in info.value.message


def test_source_settings_are_typed_with_defaults_that_follow_other_settings() -> None:
    """The loader gives providers typed settings: lists as tuples, a number or a string
    account id as given, and the quota default (and cap) that fits the gateway."""
    shared = AlibabaOptions.of(source_config("s", "alibaba", {"region": "cn-hangzhou"}).options)
    assert (shared.qps, shared.max_qps() is not None, shared.account_id) == (100, True, "*")
    dedicated = AlibabaOptions.of(
        source_config(
            "s",
            "alibaba",
            {"gateway": "dedicated", "rate_limit_qps": 1000, "account_id": 1234567890},
        ).options
    )
    assert (dedicated.qps, dedicated.max_qps(), dedicated.account_id) == (1000, None, 1234567890)
    assert (
        AlibabaOptions.of(source_config("s", "alibaba", {"gateway": "dedicated"}).options).qps
        == 200
    )
    aws = AwsOptions.of(
        source_config("s", "aws", {"endpoints": ["https://a.example", "https://b.example"]}).options
    )
    assert (aws.endpoints, aws.qps, aws.region) == (
        ("https://a.example", "https://b.example"),
        50,
        None,
    )
    with pytest.raises(ConfigError, match=r"^sources\.s\.provider: 'gcp' is not a provider"):
        source_config("s", "gcp", {})


def test_a_source_repr_shows_no_credential() -> None:
    """A source's repr (in a log line or a traceback) holds no token, secret id or
    credentials table."""
    planted = "planted-" + "z" * 16
    table = {
        "auth": "approle",
        "role_id": "r",
        "secret_id": planted,
        "token": planted,
        "credentials": {"secret": planted},
    }
    text = repr(source_config("v", "vault", table))
    assert "role_id='r'" in text
    assert planted not in text
