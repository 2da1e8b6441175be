"""A KMS instance ClientKey: the key id and RSA private key that sign dkms-gcs requests.

The file is the JSON the console downloads when the ClientKey is created,
``{"KeyId": "KAAP.…", "PrivateKeyData": "<base64 PKCS#12>"}``; the PKCS#12 is opened with a
password read from a file or an environment variable, never from the configuration itself
(the SDK's ``openapi_credential/client.py`` reads the same two fields). A password file's
trailing newline is not part of the password.

Every failure is a :class:`~kms_agent.errors.ConfigError` of one line naming the setting,
the file and what to do; none carries the password or key bytes, and neither does the
:class:`ClientKey`'s ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.serialization import pkcs12

from kms_agent.errors import ConfigError

#: A key id is sent as a header: printable ASCII without spaces.
_KEY_ID = re.compile(r"[!-~]{1,256}")


@dataclass(frozen=True, slots=True)
class ClientKey:
    key_id: str
    private_key: RSAPrivateKey = field(repr=False, compare=False)
    path: str
    #: When the ClientKey's certificate stops being valid (None if the file has none).
    not_after: datetime | None = None

    def public_key(self) -> RSAPublicKey:
        return self.private_key.public_key()

    def __repr__(self) -> str:
        return f"ClientKey(key_id={self.key_id!r}, path={self.path!r}, private_key=<redacted>)"

    __str__ = __repr__


def load_client_key(
    path: str | Path,
    *,
    password_file: str | Path | None = None,
    password_env: str | None = None,
    environ: Mapping[str, str],
    where: str = "client_key_file",
) -> ClientKey:
    """Read and open the ClientKey at ``path``; exactly one of ``password_file`` (a file
    holding the password) and ``password_env`` (the name of a variable in ``environ``).
    ``where`` is the setting's dotted name, for messages."""
    file = Path(path).expanduser()
    password = _password(password_file, password_env, environ, where)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{where}: cannot read {file} ({_why(exc)}); give the ClientKey JSON file "
            "downloaded when the ClientKey was created"
        ) from None
    not_client_key = f"{where}: {file} is not a ClientKey file (JSON with KeyId and PrivateKeyData)"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{not_client_key}: invalid JSON at line {exc.lineno} column {exc.colno}; "
            "download the ClientKey again"
        ) from None
    if not isinstance(document, dict):
        raise ConfigError(f"{not_client_key}: the JSON is not an object")
    key_id, data = document.get("KeyId"), document.get("PrivateKeyData")
    if not isinstance(key_id, str) or not isinstance(data, str):
        missing = "KeyId" if not isinstance(key_id, str) else "PrivateKeyData"
        raise ConfigError(f"{not_client_key}: {missing} is missing or not a string")
    if not _KEY_ID.fullmatch(key_id):
        raise ConfigError(f"{not_client_key}: KeyId is not printable ASCII without spaces")
    try:
        der = base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{where}: {file}: PrivateKeyData is not base64; download the ClientKey again"
        ) from None
    try:
        key, certificate, _ = pkcs12.load_key_and_certificates(der, password)
    except ValueError as exc:
        if "deserialize" in str(exc):
            raise ConfigError(
                f"{where}: {file}: PrivateKeyData is not PKCS#12; download the ClientKey again"
            ) from None
        raise ConfigError(
            f"{where}: {file}: the password does not open its PKCS#12 (wrong password, or "
            "a damaged file); give the password shown when the ClientKey was created"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        found = "no private key" if key is None else f"a key of type {type(key).__name__}"
        raise ConfigError(
            f"{where}: {file}: its PKCS#12 holds {found}, not an RSA private key; "
            "give a ClientKey of the KMS instance"
        )
    not_after = certificate.not_valid_after_utc if certificate is not None else None
    return ClientKey(key_id, key, str(file), not_after)


def _password(
    password_file: str | Path | None,
    password_env: str | None,
    environ: Mapping[str, str],
    where: str,
) -> bytes:
    if (password_file is None) == (password_env is None):
        raise ConfigError(
            f"{where}: give the ClientKey's password in exactly one of a password file or "
            "an environment variable (never in the configuration)"
        )
    if password_env is not None:
        value = environ.get(password_env)
        if not value:
            raise ConfigError(
                f"{where}: the environment variable {password_env} holding the ClientKey's "
                "password is not set or empty"
            )
        return value.encode("utf-8")
    pw_file = Path(str(password_file)).expanduser()
    try:
        text = pw_file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{where}: cannot read the ClientKey password file {pw_file} ({_why(exc)})"
        ) from None
    if not text:
        raise ConfigError(f"{where}: the ClientKey password file {pw_file} is empty")
    return text.encode("utf-8")


def _why(exc: Exception) -> str:
    """The reason, never the content: ``strerror`` for OS errors, the class otherwise."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
