"""Token sources and checking."""

from __future__ import annotations

import stat

import pytest

from kms_agent.auth import (
    Authenticator,
    ensure_generated_token,
    load_tokens,
    new_token,
    warn_if_exposed,
)
from kms_agent.config import AuthConfig
from kms_agent.errors import ConfigError, Forbidden, Unauthorized
from tests.conftest import TOKEN


def raw(headers: dict[str, str]) -> dict[bytes, bytes]:
    """Headers as the protocol hands them to the authenticator."""
    return {k.lower().encode(): v.encode() for k, v in headers.items()}


HEADERS = ("X-KMS-Token", "X-Aws-Parameters-Secrets-Token", "X-Vault-Token")


def test_env_token_plain_and_file_form(tmp_path):
    """$KMS_TOKEN is read as a token or, with file://, as a token file; the first variable
    that is set holds the token (KMS_TOKEN before AWS_TOKEN before AWS_SESSION_TOKEN), as
    the AWS and Alibaba agents read theirs."""
    path = tmp_path / "tok"
    other = new_token()
    path.write_text(f"# rotated 2026-11-24\n{other}\n")
    tokens = load_tokens(AuthConfig(), {"KMS_TOKEN": TOKEN, "AWS_TOKEN": f"file://{path}"})
    assert tokens.tokens == (TOKEN.encode(),)
    tokens = load_tokens(AuthConfig(), {"AWS_SESSION_TOKEN": TOKEN, "AWS_TOKEN": f"file://{path}"})
    assert tokens.tokens == (other.encode(),)
    assert tokens.files == (path,)
    tokens = load_tokens(AuthConfig(), {"AWS_CONTAINER_AUTHORIZATION_TOKEN": "test-token-123"})
    assert tokens.tokens == (b"test-token-123",)  # the AWS agent's own test token: 14 characters


def test_token_file_with_several_tokens_for_rotation(tmp_path):
    """Every non-comment line of a token file is a live token."""
    a, b = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(f"{a}\n\n  {b}  \n")
    auth = Authenticator(HEADERS, load_tokens(AuthConfig(token_files=(str(path),)), {}))
    auth.check_raw(raw({"X-KMS-Token": a}))
    auth.check_raw(raw({"X-Vault-Token": b}))


@pytest.mark.parametrize("bad", ["short", "has space inside the token!", "tab\tinside-the-token-x"])
def test_weak_or_malformed_tokens_are_refused(tmp_path, bad):
    """Tokens under 16 characters or with odd characters fail config, naming the line."""
    path = tmp_path / "tokens"
    path.write_text(f"{new_token()}\n{bad}\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_tokens(AuthConfig(token_files=(str(path),)), {})


def test_missing_token_file_is_named(tmp_path):
    """A configured token file that does not exist is a config error naming the key."""
    with pytest.raises(ConfigError, match=r"auth.token_files\[0\]"):
        load_tokens(AuthConfig(token_files=(str(tmp_path / "nope"),)), {})


def test_generated_token_file_is_0640_and_kept_across_restarts(tmp_path):
    """The generated token file is 0640 and an existing one is reused."""
    path = ensure_generated_token(tmp_path / "run")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    first = path.read_text()
    assert len(first.strip()) >= 43
    assert ensure_generated_token(tmp_path / "run").read_text() == first


def test_check_missing_wrong_and_right(tmp_path):
    """No token is 401, a wrong one 403, the right one in any accepted header passes."""
    auth = Authenticator(HEADERS, load_tokens(AuthConfig(), {"KMS_TOKEN": TOKEN}))
    with pytest.raises(Unauthorized):
        auth.check_raw({})
    with pytest.raises(Forbidden):
        auth.check_raw(raw({"X-KMS-Token": TOKEN + "x"}))
    with pytest.raises(Forbidden):
        auth.check_raw(raw({"X-KMS-Token": TOKEN[:-1]}))
    with pytest.raises(Forbidden):
        auth.check_raw(raw({"X-KMS-Token": "ünïcode-token-value"}))
    for header in HEADERS:
        auth.check_raw(raw({header: TOKEN}))


def test_update_swaps_tokens(tmp_path):
    """After update() the old token is refused and the new one accepted."""
    auth = Authenticator(HEADERS, load_tokens(AuthConfig(), {"KMS_TOKEN": TOKEN}))
    fresh = new_token()
    auth.update(load_tokens(AuthConfig(), {"KMS_TOKEN": fresh}))
    auth.check_raw(raw({"X-KMS-Token": fresh}))
    with pytest.raises(Forbidden):
        auth.check_raw(raw({"X-KMS-Token": TOKEN}))


def test_reprs_redact_tokens():
    """Neither the token set nor the authenticator shows a token in its repr."""
    tokens = load_tokens(AuthConfig(), {"KMS_TOKEN": TOKEN})
    assert TOKEN not in repr(tokens)
    assert TOKEN not in repr(Authenticator(HEADERS, tokens))


@pytest.mark.parametrize(
    ("mode", "allowed", "warned"),
    [
        (0o640, 0o640, False),
        (0o600, 0o640, False),
        (0o644, 0o640, True),
        (0o660, 0o640, True),
        (0o640, 0o600, True),
        (0o600, 0o600, False),
    ],
)
def test_exposed_file_warning(tmp_path, log_capture, mode, allowed, warned):
    """A file granting group/others more than allowed is warned about, naming path and mode."""
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    before = len(log_capture.getvalue())
    assert warn_if_exposed(path, "token file", allowed) is warned
    logged = log_capture.getvalue()[before:]
    assert ("file_exposed" in logged) is warned
    if warned:
        assert str(path) in logged
        assert oct(mode) in logged


def test_named_tokens_identify_their_caller(tmp_path):
    """`NAME:TOKEN` lines name the caller (principal token:NAME); a bare token is
    token:default; a Bearer header is read like the token headers."""
    a, b, c = new_token(), new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(f"ci-deploy:{a}\nweb.frontend: {b}\n{c}\n")
    auth = Authenticator(HEADERS, load_tokens(AuthConfig(token_files=(str(path),)), {}))
    assert auth.identify(raw({"X-KMS-Token": a})).principals == ("token:ci-deploy",)
    assert auth.identify(raw({"Authorization": f"Bearer {b}"})).principals == (
        "token:web.frontend",
    )
    assert auth.identify(raw({"X-Vault-Token": c})).principals == ("token:default",)
    peer = ("unix:uid:1001", "unix:gid:1001")
    assert auth.identify(raw({"X-KMS-Token": a}), peer).principals == ("token:ci-deploy", *peer)
    assert auth.identify({}, peer, peer_only=True).principals == peer
    with pytest.raises(Unauthorized):
        auth.identify({}, peer)  # without policies a peer still needs a token
    assert a not in repr(auth.token_set) and a not in repr(auth)


@pytest.mark.parametrize("line", ["bad name:" + "x" * 20, ":" + "x" * 20, "ok:short"])
def test_bad_named_token_lines_are_refused_by_line(tmp_path, line):
    """A malformed name or token is a ConfigError naming the file's line."""
    path = tmp_path / "tokens"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_tokens(AuthConfig(token_files=(str(path),)), {})
