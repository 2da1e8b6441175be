"""Alibaba's dkms-gcs SDK (``alibabacloud-dkms-gcs`` 1.0.2, the "KMS Instance SDK") as a
judge of the emulator's ClientKey protocol, with the two ways it cannot run here as shipped
worked around and nothing else changed.

1. Its ``openapi_util/client.py`` imports pyOpenSSL at module level and the package pins
   ``pyopenssl<23.3.0``; no such pyOpenSSL imports against the ``cryptography>=42`` this
   project needs (pip resolves it to pyOpenSSL 22.0.0, whose import fails on
   ``_lib.GEN_EMAIL``, and which also breaks ``aliyunsdkcore``'s vendored requests). So the
   SDK is installed without its dependencies and, if pyOpenSSL is absent, the import is
   given a stand-in ``OpenSSL.crypto`` for the duration of that one import (removed from
   ``sys.modules`` again). Its only use there is opening a ClientKey's PKCS#12.
2. That PKCS#12 path hands the signer a PKCS#8 key under an ``RSA PRIVATE KEY`` label,
   which current ``cryptography`` refuses to load. So clients here are built with the SDK's
   other documented credential, ``access_key_id`` + ``private_key`` (PEM); the test opens the
   ClientKey file with ``cryptography``, as the agent will.

Everything the emulator judges — headers, date, body hash, string to sign, RSA signature,
protobuf request and response, TLS with a CA file, error parsing, retries — is the SDK's.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.emulators.alibaba_kms import ClientKeyFile

#: How the judge is installed (its other dependencies are in the test extras).
INSTALL = "pip install --no-deps alibabacloud-dkms-gcs==1.0.2"


def _import_sdk() -> None:
    """Import the SDK's modules once (with the pyOpenSSL stand-in if needed)."""
    if "openapi_util.client" in sys.modules:
        return
    try:
        from OpenSSL import crypto  # noqa: F401
    except Exception:  # absent, or a pyOpenSSL that cannot import against this cryptography
        for name in [n for n in sys.modules if n == "OpenSSL" or n.startswith("OpenSSL.")]:
            del sys.modules[name]
        package, stub = types.ModuleType("OpenSSL"), types.ModuleType("OpenSSL.crypto")
        package.crypto = stub  # type: ignore[attr-defined]
        sys.modules["OpenSSL"], sys.modules["OpenSSL.crypto"] = package, stub
        try:
            import openapi_util.client  # noqa: F401
        finally:
            del sys.modules["OpenSSL"], sys.modules["OpenSSL.crypto"]


def sdk() -> Any:
    """The SDK's ``sdk.client`` module, or a skip naming the install command."""
    try:
        _import_sdk()
        import sdk.client
    except ImportError as exc:
        pytest.skip(f"alibabacloud-dkms-gcs is not installed ({exc}); {INSTALL}")
    return sdk.client


def pkcs1_pem(client_key: ClientKeyFile) -> str:
    """The ClientKey's RSA key as PKCS#1 PEM, opened from its PKCS#12 with the password."""
    pem = client_key.private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return pem.decode().strip()


def client(endpoint: str, key_id: str, private_key_pem: str, ca_file: Path | None = None) -> Any:
    """A dkms-gcs SDK client for ``endpoint`` (``host:port``) over HTTPS, trusting
    ``ca_file`` (the SDK's ``ca_file_path``) or, without one, the SDK's default bundle."""
    sdk()
    from openapi.models import Config
    from sdk.client import Client

    return Client(
        Config(
            endpoint=endpoint,
            protocol="https",
            access_key_id=key_id,
            private_key=private_key_pem,
            ca_file_path=str(ca_file) if ca_file else None,
        )
    )


def get_secret_value(dkms: Any, name: str, *, retry: bool = True, **options: Any) -> Any:
    """GetSecretValue through the SDK. ``retry=False`` turns its retries off; otherwise its
    own retry rule runs, with no back-off sleep (``backoff_policy="no"``)."""
    from openapi_util.models import RuntimeOptions
    from sdk.models import GetSecretValueRequest

    runtime = RuntimeOptions(autoretry=retry, backoff_policy="no")
    return dkms.get_secret_value_with_options(
        GetSecretValueRequest(secret_name=name, **options), runtime
    )
